"""``python -m dflash.perf``: the decoding engines against the weight-read floor (``dflash.bench.perf``)."""
import sys

from .bench.perf import main
from .errors import run_cli

if __name__ == "__main__":
    sys.argv[0] = "dflash.perf"
    run_cli(main)
