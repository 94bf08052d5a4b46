#!/usr/bin/env bash
# DFlash 2 on the fast CUDA engine (issue 22, acceptance 3), in one device call (~3-4 min):
#   1. the DFlash 2 kernel/chain tests (tests/engine/test_dflash2_kernels.py) and the DFlash 1
#      layer-kernel tests (the chain's DFlash 1 path must be unchanged);
#   2. python -m dflash.perf, fast engine, context 512, b16 only: the DFlash 1 row plus the
#      DFlash 2 row (cycle ratio, c(b), greedy == AR).
# Usage on the GPU machine: OUT=/some/dir bash scripts/dflash2_h200.sh
# Results: $OUT/summary.txt (PASS/FAIL lines), $OUT/*.log, $OUT/perf/{perf.json,PERFORMANCE.md}.
set -uo pipefail
OUT=${OUT:-outputs/dflash2_h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format="commit %H %cd" 2>/dev/null | tee -a "$OUT/gpu.txt"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [[ $rc == 0 ]]; then note "PASS $name"; else note "FAIL $name (exit $rc; see $name.log)"; fi
  grep -v -i warn "$OUT/$name.log" | tail -n 25
  return $rc
}
run tests_dflash2 150 $PY -m pytest -q -rs --durations=10 tests/engine/test_dflash2_kernels.py
run tests_layer_kernels 120 $PY -m pytest -q -x tests/engine/test_layer_kernels.py
run perf 300 $PY -m dflash.perf --engines fast --contexts 512 --block-sizes 16 --iters 20 \
  --skip-embedded --out-dir "$OUT/perf"
if [[ -f "$OUT/perf/perf.json" ]]; then
  $PY - "$OUT/perf/perf.json" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1])).get("dflash2")
if not r:
    print("FAIL dflash2 row: missing from perf.json (see perf.log)")
    sys.exit()
b = str(r["block_size"])
for name in ("dflash1", "dflash2"):
    d = r[name]
    print(f"{name}: draft {d['draft_ms']:.3f} ms, cycle b1 {d['cycle_ms']['1']:.3f} ms, "
          f"b{b} {d['cycle_ms'][b]:.3f} ms, c({b}) {d['c_of_b']:.3f}, tau {d['mean_tau']:.2f}")
    ok = d["greedy_identical_to_ar"]
    print(("PASS" if ok else "FAIL") + f" {name} greedy == AR"
          + ("" if ok else f" (first divergence {d['first_divergence']})"))
print(("PASS" if r["within_target"] else "FAIL")
      + f" cycle ratio DFlash 2 / DFlash 1 at b{b}: {r['cycle_ratio']:.3f} (target <= {r['target_ratio']})")
print(("PASS" if r["layer_chain_supported"] else "FAIL") + " DFlash 2 runs the Triton layer chain")
PYEOF
fi
echo "== summary"; cat "$SUMMARY"
