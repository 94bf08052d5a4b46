"""What a change of block size costs the fused greedy cycle (small pair, CUDA).

The H100 dynamic runs show a cycle right after a change of size costing ~10-20 us more than
one at the same size. This separates the possible causes, timing each cycle as the decoding
loop does (launch, then the one host read): the same graph replayed; two separately captured
graphs of the same size alternating (a different graph exec, identical kernels); sizes 8 and
16 alternating (different graphs and grid shapes); and size 8 repeated. Positions restart
every few cycles so the cache never fills; the tokens are meaningless, the work is real.

    python scripts/graph_switch_cost.py --cycles 2000
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dflash.bench import common as bench  # noqa: E402
from dflash.decoding.loop import SpeculativeDecoder  # noqa: E402


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=2000, help="timed cycles per pattern")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    pair = bench.load_pair("embedded", "embedded", dev, "bfloat16")
    dec = SpeculativeDecoder(pair.target, pair.draft)
    ids = torch.randint(3, pair.target.config.vocab_size - 1, (1, args.context), device=dev)
    dec.reserve(args.context + 600)
    dec.generate(ids, 64, block_size=16)  # prefill, and the (16, 16) graph
    target, draft = dec.engines.ensure(args.context + 600)
    cycle = dec._greedy_cycle(target, draft, pair.draft.mask_token_id)
    last = ids[0, -1:].clone()
    cycle.begin(last, args.context)
    for key in ((16, 16), (8, 16)):
        cycle.run(*key)
    twin = cycle._capture(16, 16)  # a second graph exec of the same cycle

    def replay(key):
        if key == "twin":
            twin[0].replay()
            return twin[1]
        return cycle.run(*key)

    patterns = {
        "16 repeated": [(16, 16)],
        "16 / twin 16 alternating": [(16, 16), "twin"],
        "8of16 / 16 alternating": [(8, 16), (16, 16)],
        "8of16 repeated": [(8, 16)],
    }
    out = {}
    for name, seq in list(patterns.items()) * 2:  # twice, interleaved: the second pass counts
        times = {str(k): [] for k in seq}
        for i in range(args.cycles + 50):
            if i % 16 == 0:
                cycle.begin(last, args.context)  # restart positions: the cache never fills
            key = seq[i % len(seq)]
            t0 = time.perf_counter()
            packed = replay(key)
            packed.tolist()
            dt = time.perf_counter() - t0
            if i >= 50:
                times[str(key)].append(dt * 1e6)
        out[name] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    for name, med in out.items():
        print(f"{name:28s} median us per cycle: " + ", ".join(f"{k}: {v}" for k, v in med.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch":
                                               torch.__version__, "median_us": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
