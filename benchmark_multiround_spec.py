#!/usr/bin/env python3
"""Multi-round exact speculative sampling vs single-round vs target-only sampling (see --help)."""
from dflash.errors import run_cli
from dflash.bench.multiround_cli import main

if __name__ == "__main__":
    run_cli(main)
