export PYTHONPATH=. PYTHONUNBUFFERED=1
for i in 1 2 3; do for e in 0 1; do echo "=== early_kv=$e run $i"; DFLASH_EARLY_KV=$e python -m dflash.perf --engines fast --skip-embedded --block-sizes 16 --iters 20 --out-dir /tmp/p > /tmp/log 2>&1; grep -E "^fast" /tmp/log || tail -5 /tmp/log; done; done
python -m pytest -q tests/test_layer_kernels.py tests/test_fast_engine.py 2>&1 | tail -2
python -m dflash.perf --only-embedded --engines fast 2>&1 | grep -E "identical|speedup|tokens_per_s" | head -8
