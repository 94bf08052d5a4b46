"""``python -m dflash.train``: the draft training recipe (``dflash.training.train_draft``)."""
import sys

from .training.train_draft import main
from .errors import run_cli

if __name__ == "__main__":
    sys.argv[0] = "dflash.train"
    run_cli(main)
