export PYTHONPATH=. PYTHONUNBUFFERED=1
run() { echo "=== skip=$1 early=$2"; DFLASH_PROBE_SKIP=$1 DFLASH_PDL_EARLY=$2 python -m dflash.perf --engines fast --skip-embedded --block-sizes 16 --iters 20 --contexts 512,2048 --out-dir /tmp/p 2>&1 | grep -E "^fast"; }
run none none
run combine none
run partial none
run none combine
run none partial,combine
run none rope,partial,combine
run none norm
run none rope
run none none
run none norm,rope,partial,combine
