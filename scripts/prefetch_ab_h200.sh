#!/usr/bin/env bash
# Issue 26: the skinny GEMMs' L2 weight prefetch before the PDL wait, A/B in one device call
# (~3 min): the Triton layer tests (bitwise row invariance, chain vs unfused), then
# `python -m dflash.perf` on the Qwen3-4B shape with DFLASH_PREFETCH=0 and =1, interleaved twice
# (clock drift hits both alike); one line per run: AR step at each context, b16 cycle, c(16).
# Usage on the GPU machine: OUT=/some/dir bash scripts/prefetch_ab_h200.sh [shape]
set -uo pipefail
OUT=${OUT:-outputs/prefetch_ab}
SHAPE=${1:-qwen3-4b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.
PY=${PY:-python3}
timeout 150 $PY -m pytest -q -x tests/engine/test_layer_kernels.py >"$OUT/test_layer_kernels.log" 2>&1
echo "test_layer_kernels rc $? ($(tail -1 "$OUT/test_layer_kernels.log"))" | tee "$OUT/summary.txt"
for round in 1 2; do
  for p in 0 1; do
    dir="$OUT/$SHAPE/prefetch${p}_round$round"
    DFLASH_PREFETCH=$p timeout 120 $PY -m dflash.perf --shape "$SHAPE" --engines fast --skip-embedded \
      --skip-dflash2 --contexts 512,2048 --block-sizes 16 --iters 30 --prefill-lengths '' \
      --out-dir "$dir" >"$dir.log" 2>&1
    $PY - "$dir" "$p" "$round" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys, pathlib
d, p, r = sys.argv[1:]
try:
    e = json.loads((pathlib.Path(d) / "perf.json").read_text())["engines"][0]
    print(f"prefetch={p} round {r}: AR {e.get('ar_step_ms')} ms, b16 cycle "
          f"{e.get('cycle_ms', {}).get('16')}, c(16) {e.get('c_of_b', {}).get('16')}")
except Exception as exc:  # the log says why
    print(f"prefetch={p} round {r}: no result ({exc})")
PYEOF
  done
done
