#!/usr/bin/env python
"""SGLang DFlash throughput benchmark: baseline vs DFLASH servers over a concurrency sweep.

    python benchmark_sglang.py --dataset-name aime25 --target-model Qwen/Qwen3-4B \\
        --draft-model z-lab/Qwen3-4B-DFlash-b16 --concurrencies 1,2,4 --output-md sglang_quick.md

Run it with the Python of the SGLang environment (docs/SGLANG.md); ``--dry-run`` prints the
exact launch commands, ``--base-url`` benchmarks a server that is already running. The logic
lives in dflash/serving.py.
"""
import importlib.util
import os
import sys


def _serving():
    # dflash/__init__.py imports the torch decoder; the benchmark client needs none of it (and
    # must also run where torch is absent, with --base-url), so load the package without it.
    here = os.path.dirname(os.path.abspath(__file__))
    if "dflash" not in sys.modules:
        pkg_dir = os.path.join(here, "dflash")
        spec = importlib.util.spec_from_file_location(
            "dflash", os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir])
        sys.modules["dflash"] = importlib.util.module_from_spec(spec)
    from dflash import serving
    return serving


if __name__ == "__main__":
    _serving().cli()
