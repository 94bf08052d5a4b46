#!/usr/bin/env bash
# DFlash benchmark over several tasks (and block sizes); settings from environment variables.
#   FAST=1 NPROC=1 ./run_benchmark.sh
#   FAST=1 NPROC=1 TASKS="aime25:4" MAX_NEW_TOKENS=128 ./run_benchmark.sh
# Every variable, its default and the outputs: docs/WRAPPERS.md (logic: dflash/launch.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m dflash.launch benchmark "$@"
