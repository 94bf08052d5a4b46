#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call (writes under $OUT).
# Usage on the GPU machine: OUT=/some/dir bash scripts/gpu_validation.sh [perf|bench|dynamic|multiround|all]
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
what=${1:-all}
pair=(--model-name-or-path embedded --draft-name-or-path embedded)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $what == all || $what == perf ]]; then
  timeout 360 $PY -m dflash.perf --out-dir "$OUT/perf" 2>&1 | tee "$OUT/perf.log"
fi
if [[ $what == all || $what == bench ]]; then
  for ds in builtin-code builtin-math; do
    timeout 90 $PY benchmark.py --dataset $ds --max-samples 8 --max-new-tokens 256 "${pair[@]}" \
      --output-json "$OUT/bench_$ds.json" --save-outputs-path "$OUT/bench_$ds.jsonl" 2>&1 | tee "$OUT/bench_$ds.log"
  done
fi
if [[ $what == all || $what == dynamic ]]; then
  for ds in builtin-math builtin-code builtin-chat; do
    for policy in costmodel ewma; do
      timeout 100 $PY benchmark_dynamic_schedule.py --dataset $ds --max-samples 8 "${pair[@]}" \
        --max-new-tokens 256 --candidate-block-sizes 8,12,16 --policy $policy --compare-static \
        --save-outputs-path "$OUT/dynamic_${ds}_$policy.jsonl" 2>&1 | tee "$OUT/dynamic_${ds}_$policy.log"
    done
  done
fi
if [[ $what == all || $what == multiround ]]; then
  for mode in tree faithful; do
    timeout 120 $PY benchmark_multiround_spec.py --dataset builtin-code --max-samples 6 "${pair[@]}" \
      --max-new-tokens 128 --temperature 1.0 --round-block-sizes 16,12 --mode $mode \
      --save-outputs-path "$OUT/multiround_$mode.jsonl" 2>&1 | tee "$OUT/multiround_$mode.log"
  done
fi
