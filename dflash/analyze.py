"""``python -m dflash.analyze``: the analysis of block-size sweeps (``dflash.bench.analyze``)."""
import sys

from .bench.analyze import main
from .errors import run_cli

if __name__ == "__main__":
    sys.argv[0] = "dflash.analyze"
    run_cli(main)
