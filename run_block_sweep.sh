#!/usr/bin/env bash
# One dataset across several DFlash block sizes -> logs/sweep_<tag>/summary.csv + plot.
#   DATASET=aime25 MAX_SAMPLES=8 MAX_NEW_TOKENS=256 BLOCK_SIZES="4 8 12 16" NPROC=1 ./run_block_sweep.sh
#   ... SKIP_BASELINE=1 ./run_block_sweep.sh   (one shared baseline pass instead of one per size)
# Every variable, its default and the outputs: docs/WRAPPERS.md (logic: dflash/launch.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m dflash.launch sweep "$@"
