#!/usr/bin/env bash
# Issue 26, goals 2 and 4, on one GPU: `python -m dflash.perf` for each target shape, one
# process per shape (a failure is reported and the next shape runs).
# Usage on the GPU machine: OUT=/some/dir bash scripts/perf_shapes_h200.sh [shape ...]
# Env: PERF_ARGS (extra arguments for every run), AUTOTUNE_AB=1 also runs each shape with
# DFLASH_AUTOTUNE=0 first (the heuristic configs), in the same call.
# Writes $OUT/<shape>[_heuristic]/{perf.json,PERFORMANCE.md,perf.log} and $OUT/summary.txt.
set -uo pipefail
OUT=${OUT:-outputs/perf_shapes}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
PY=${PY:-python3}
shapes=("$@")
[[ ${#shapes[@]} -gt 0 ]] || shapes=(qwen3-8b llama-3.1-8b)
ARGS=${PERF_ARGS:---engines fast --skip-embedded --skip-dflash2 --contexts 512,2048 --block-sizes 4,8,16 --iters 20}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
failed=()
run() {  # run <label> <shape> [env ...]
  local label=$1 shape=$2; shift 2
  mkdir -p "$OUT/$label"
  echo "== $label"
  env "$@" timeout 240 $PY -m dflash.perf --shape "$shape" $ARGS --out-dir "$OUT/$label" \
    >"$OUT/$label/perf.log" 2>&1 || { echo "== $label FAILED (exit $?)"; tail -n 5 "$OUT/$label/perf.log"; failed+=("$label"); }
  grep -E "^(copy|fast|hf|static|$shape)" "$OUT/$label/perf.log" | tail -n 4
}
for s in "${shapes[@]}"; do
  label=$(basename "$s")
  [[ ${AUTOTUNE_AB:-0} == 1 ]] && run "${label}_heuristic" "$s" DFLASH_AUTOTUNE=0
  run "$label" "$s" DFLASH_CACHE_DIR="$OUT/cache"
done
$PY - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("*/perf.json")):
    r = json.loads(p.read_text())
    for e in r["engines"]:
        ar = e["ar_step_ms"]; cyc = e["cycle_ms"]; big = max(cyc, key=int)
        share = {c: round(100 * r["floor_ms"] / v) for c, v in ar.items()}
        pre = {n: f"{v:.1f} ms ({100 * r['prefill_floor_ms'][n] / v:.0f}%)" for n, v in e.get("prefill_ms", {}).items()}
        print(f"{p.parent.name} {e['engine']}: floor {r['floor_ms']:.2f} ms; AR {ar} (share of copy rate % {share}); "
              f"cycle b={big} {cyc[big]:.2f} ms, c({big}) {e['c_of_b'][big]:.3f}; prefill {pre}")
PY
[[ ${#failed[@]} -eq 0 ]] || { echo "FAILED: ${failed[*]}"; exit 1; }
