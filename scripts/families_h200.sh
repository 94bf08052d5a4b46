#!/usr/bin/env bash
# Issue 23, acceptance 4, on one H200: the MoE and hybrid families against the weight-read floor.
# Usage on the GPU machine: OUT=/some/dir bash scripts/families_h200.sh [family ...]
# One process per family (each frees its GPU memory; a crash, OOM or timeout is reported and the
# next family runs). Writes $OUT/families_<family>.{json,log} and $OUT/families.json (all rows).
# Real sizes, random bf16 weights: Qwen3-30B-A3B (61 GB), gpt-oss-20b (42 GB), Qwen3.5-9B (20 GB).
set -uo pipefail
OUT=${OUT:-outputs/families}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
PY=${PY:-python3}
families=("$@")
[[ ${#families[@]} -gt 0 ]] || families=(qwen3_moe gpt_oss qwen3_5)
declare -A limit=([qwen3_moe]=80 [gpt_oss]=70 [qwen3_5]=90)  # seconds; ~4 minutes in all
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
git log -1 --format='commit %H %cd' >>"$OUT/gpu.txt" 2>/dev/null
failed=()
for f in "${families[@]}"; do
  echo "== $f"
  rm -f "$OUT/families_$f.json"
  timeout "${limit[$f]:-90}" $PY -m dflash.bench.families --family "$f" --iters 15 --loop-tokens 24 \
    --check-tokens 32 --json "$OUT/families_$f.json" >"$OUT/families_$f.log" 2>&1
  rc=$?
  grep -v -i -E "warn|falling back" "$OUT/families_$f.log" | tail -n 12
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 ]] && why="timeout after ${limit[$f]:-90} s" || why="exit $rc"
    echo "== $f FAILED ($why); last lines of $OUT/families_$f.log:"
    tail -n 5 "$OUT/families_$f.log"
    failed+=("$f")
  fi
done
# all rows in one pandas-readable list (pd.read_json("$OUT/families.json"))
$PY - "$OUT" "${families[@]}" <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), []
for f in sys.argv[2:]:
    p = out / f"families_{f}.json"
    rows += json.loads(p.read_text()) if p.exists() else [{"family": f, "error": "no result (see its log)"}]
(out / "families.json").write_text(json.dumps(rows, indent=1))
from dflash.bench.families import table
print(table(rows))
PY
[[ ${#failed[@]} -eq 0 ]] || { echo "FAILED: ${failed[*]}"; exit 1; }
