#!/usr/bin/env python
"""SGLang DFlash throughput benchmark: baseline vs DFLASH servers over a concurrency sweep.

    python benchmark_sglang.py --dataset-name aime25 --target-model Qwen/Qwen3-4B \\
        --draft-model z-lab/Qwen3-4B-DFlash-b16 --concurrencies 1,2,4 --output-md sglang_quick.md

Run it with the Python of the SGLang environment (docs/SGLANG.md); ``--dry-run`` prints the
exact launch commands, ``--base-url`` benchmarks a server that is already running. The logic
lives in dflash/serving/.
"""
from dflash.serving.sglang import cli

if __name__ == "__main__":
    cli()
