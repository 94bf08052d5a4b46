#!/usr/bin/env bash
# Issue 23: Qwen3-MoE and GPT-OSS on the fast CUDA engine, in one device call (~7 min):
#   1. CUDA tests: tests/engine/test_moe_fast.py (MoE kernels vs the torch twin, row
#      invariance, sinks in decode_attention, fast engine spec == AR / == generate),
#      test_family_lossless.py and test_fast_engine.py (nothing else regressed);
#   2. python -m dflash.bench.families --family qwen3_moe,gpt_oss: real shapes, random bf16
#      weights, engine auto (now "fast"), AR step / b16 cycle against the weight-read floor,
#      greedy spec == AR.
# Usage on the GPU machine: OUT=/some/dir bash scripts/moe_fast_h200.sh
# Results: $OUT/summary.txt (PASS/FAIL lines), $OUT/*.log, $OUT/families.json; exit 1 on a FAIL.
set -uo pipefail
OUT=${OUT:-outputs/moe_fast_h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format="commit %H %cd" 2>/dev/null | tee -a "$OUT/gpu.txt"
failed=0
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [[ $rc == 0 ]]; then note "PASS $name"; else note "FAIL $name (exit $rc; see $name.log)"; failed=1; fi
  grep -v -E "Warning|warnings.warn" "$OUT/$name.log" | tail -n 25
}
run tests_moe 150 $PY -m pytest -q -rs -x tests/engine/test_moe_fast.py
run tests_fast_engine 120 $PY -m pytest -q -rs tests/engine/test_fast_engine.py \
  tests/engine/test_families.py
run tests_family_lossless 180 $PY -m pytest -q -rs tests/engine/test_family_lossless.py
run families 200 $PY -m dflash.bench.families --family qwen3_moe,gpt_oss --iters 15 \
  --loop-tokens 24 --check-tokens 32 --json "$OUT/families.json"
if [[ -f "$OUT/families.json" ]]; then
  $PY - "$OUT/families.json" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
for r in json.load(open(sys.argv[1])):
    if "error" in r:
        print(f"FAIL {r['family']}: {r['error']}")
        continue
    ok = r["engine"] == "fast" and r["greedy_identical"]
    print(f"{'PASS' if ok else 'FAIL'} {r['family']}: engine {r['engine']}, AR {r['ar_step_ms']:.2f} ms "
          f"(floor {r['floor_ar_ms']:.2f}, {r['floor_share_ar']:.0%}), b16 cycle {r['cycle16_ms']:.2f} ms "
          f"({r['floor_share_cycle16']:.0%} of floor), greedy == AR {r['greedy_identical']}")
PYEOF
fi
grep -q "^FAIL" "$SUMMARY" && failed=1
echo "== summary"; cat "$SUMMARY"
exit $failed
