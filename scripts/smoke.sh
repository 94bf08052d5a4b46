#!/usr/bin/env bash
# Install what is needed (./.venv) and run the FAST smoke benchmark (embedded pair without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
FAST=1 NPROC=${NPROC:-1} exec ./run_benchmark.sh
