#!/usr/bin/env bash
# Everything this project measures on a lent GPU with the embedded pair, in one call.
# Usage on the GPU machine: OUT=/some/dir bash scripts/gpu_validation.sh [bench|dynamic|multiround|embedded|all]
# (the Qwen3-4B-shaped engine timings are `python -m dflash.perf`, see docs/PERFORMANCE.md).
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
PY=${PY:-python3}
what=${1:-all}
pair=(--model-name-or-path embedded --draft-name-or-path embedded)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format='commit %H %cd' >>"$OUT/gpu.txt" 2>/dev/null
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $?"
  grep -v -i warn "$OUT/$name.log" | tail -n 14
}
if [[ $what == all || $what == bench ]]; then
  for ds in builtin-code builtin-math; do
    run "bench_$ds" 90 $PY benchmark.py --dataset $ds --max-samples 8 --max-new-tokens 256 "${pair[@]}" \
      --output-json "$OUT/bench_$ds.json" --save-outputs-path "$OUT/bench_$ds.jsonl"
  done
fi
if [[ $what == all || $what == dynamic ]]; then
  # docs/DYNAMIC.md's H100 command (runs of 2026-11-27 12:41-15:23; SAMPLES=24 for the larger ones); per-sample
  # JSONL goes to $JSONL_DIR so that $OUT stays within what a device call brings back
  JSONL_DIR=${JSONL_DIR:-/tmp/dflash_gpu}; mkdir -p "$JSONL_DIR"
  for policy in ${POLICIES:-costmodel}; do
    for ds in builtin-math builtin-code builtin-chat; do
      run "dynamic_${ds}_$policy" 200 $PY benchmark_dynamic_schedule.py --dataset $ds --max-samples ${SAMPLES:-16} "${pair[@]}" \
        --max-new-tokens 128 --candidate-block-sizes 8,12,16 --policy $policy --compare-static --repeats 3 \
        --output-json "$OUT/dynamic_${ds}_$policy.json" --save-outputs-path "$JSONL_DIR/dynamic_${ds}_$policy.jsonl"
    done
  done
fi
if [[ $what == all || $what == multiround ]]; then
  run multiround 120 $PY benchmark_multiround_spec.py --dataset builtin-code --max-samples 6 "${pair[@]}" \
    --max-new-tokens 128 --temperature 1.0 --round-block-sizes 16,12 --mode both \
    --output-json "$OUT/multiround.json" --save-outputs-path "$OUT/multiround.jsonl"
fi
if [[ $what == all || $what == embedded ]]; then
  run perf_embedded 120 $PY -m dflash.perf --only-embedded --engines fast,hf --out-dir "$OUT"
fi
