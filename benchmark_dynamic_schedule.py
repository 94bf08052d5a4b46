#!/usr/bin/env python3
"""Benchmark a dynamic DFlash block-size scheduler vs the baseline and fixed sizes (see --help)."""
from dflash.bench.dynamic_cli import main
from dflash.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
