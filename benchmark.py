#!/usr/bin/env python3
"""Benchmark DFlash speculative decoding vs autoregressive decoding (see --help)."""
from dflash.bench.benchmark_cli import main
from dflash.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
