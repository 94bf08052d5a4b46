"""``python -m dflash.launch benchmark|sweep``: the shell wrappers' logic (``dflash.bench.launch``)."""
import sys

from .bench.launch import main
from .errors import run_cli

if __name__ == "__main__":
    _kind = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.argv[0] = {"benchmark": "run_benchmark.sh", "sweep": "run_block_sweep.sh"}.get(
        _kind, "dflash.launch")
    run_cli(main)
