"""Where a block-size policy's Python lands in a real decoding cycle (small pair, GPU or CPU).

Runs one prompt set through ``SpeculativeDecoder.generate`` at block size 16 with policies that
all pick 16 but cost different host time: the trivial FixedPolicy, FixedPolicy with a busy wait
of X us in ``update`` (which the loop runs while the GPU works on the next cycle) or in
``select`` (which runs before anything is launched), and the real schedulers (cost model,
EWMA; timed through a proxy, so the report shows their own Python per cycle on this host),
plus each smaller fixed size and a policy that switches size every cycle. Modes rotate per
prompt and repeat; the report is the median cycle time per mode, its excess over
FixedPolicy(16), and each mode's pooled cycle time against what the fixed sizes cost at the
same usage ("vs fixed mix": above 1 is what the mode adds beyond its sizes). If a busy ``update`` costs nothing while a busy ``select`` costs its
full time, the deferred update is hidden and only ``select`` is on the critical path.

    python scripts/policy_cost_gpu.py --dataset builtin-chat --samples 16 --repeats 3
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
from dflash.datasets import load_prompts  # noqa: E402
from dflash.decoding.loop import SpeculativeDecoder  # noqa: E402
from dflash.decoding.result import FixedPolicy  # noqa: E402
from dflash.decoding.scheduler import CostModelScheduler, make_scheduler  # noqa: E402


def spin(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


class Busy(FixedPolicy):
    def __init__(self, block_size, select_us=0.0, update_us=0.0):
        super().__init__(block_size)
        self.select_us, self.update_us = select_us, update_us
        self.max_block_size = block_size

    def select(self, cycle_idx):
        spin(self.select_us)
        return self.block_size

    def update(self, tau, cycle_s, block_size, cycle_idx):
        spin(self.update_us)


class Cycling(FixedPolicy):
    """Switches size every cycle: what a switch itself costs (different graphs back to back)."""

    def __init__(self, sizes):
        super().__init__(max(sizes))
        self.sizes, self.max_block_size = list(sizes), max(sizes)

    def select(self, cycle_idx):
        return self.sizes[cycle_idx % len(self.sizes)]


class Timed:
    """Wraps a policy; adds up the host time of its select and update calls."""

    def __init__(self, policy):
        self.policy = policy
        self.max_block_size = policy.max_block_size
        self.select_s = self.update_s = 0.0
        self.calls = 0

    def select(self, cycle_idx):
        t = time.perf_counter()
        b = self.policy.select(cycle_idx)
        self.select_s += time.perf_counter() - t
        self.calls += 1
        return b

    def update(self, *args):
        t = time.perf_counter()
        self.policy.update(*args)
        self.update_s += time.perf_counter() - t

    def reset(self):
        if isinstance(self.policy, CostModelScheduler):
            self.policy.reset(keep_costs=True)
        else:
            self.policy.reset()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="builtin-chat")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--candidates", default="8,12,16")
    ap.add_argument("--busy-us", default="20,60")
    ap.add_argument("--draft-block-size", type=int, default=16,
                    help="draft this many tokens whatever the block size (truncation mode, as "
                         "benchmark_dynamic_schedule.py); 0 = native")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pair = bench.load_pair("embedded", "embedded", device, "auto", False)
    dec = SpeculativeDecoder(pair.target, pair.draft)
    prompts, _ = load_prompts(args.dataset, args.samples)
    stops = bench.stop_token_ids(pair)
    ids_list = [torch.tensor([bench.encode_chat(pair.tokenizer, [{"role": "user", "content": p["turns"][0]}])],
                             device=device) for p in prompts]
    dec.reserve(max(x.shape[1] for x in ids_list) + args.max_new_tokens + 80)
    cands = [int(c) for c in args.candidates.split(",")]
    busy = [float(x) for x in args.busy_us.split(",") if x]
    modes = {"fixed16": lambda: FixedPolicy(16)}
    for b in cands[:-1]:
        modes[f"fixed{b}"] = lambda b=b: FixedPolicy(b)
    modes["cycling"] = lambda: Cycling(cands)  # a different size every cycle
    for us in busy:
        modes[f"update+{us:g}us"] = lambda us=us: Busy(16, update_us=us)
        modes[f"select+{us:g}us"] = lambda us=us: Busy(16, select_us=us)
    sched = {"costmodel": Timed(make_scheduler("costmodel", cands)),
             "ewma": Timed(make_scheduler("ewma", cands))}
    # warm-up: graphs for every size, and the cost model's cost estimates
    trunc = args.draft_block_size or None
    for b in cands:
        dec.generate(ids_list[0], 32, block_size=b, max_block_size=16, draft_block_size=trunc)
    for name, pol in sched.items():
        for x in ids_list[:4]:
            pol.reset()
            dec.generate(x, args.max_new_tokens, stop_token_ids=stops, policy=pol,
                         draft_block_size=trunc)
        pol.select_s = pol.update_s = 0.0
        pol.calls = 0
        modes[name] = lambda pol=pol: pol
    names = list(modes)
    per_mode = {n: [] for n in names}  # per prompt: list over repeats of us per cycle
    usage = {n: {} for n in names}
    totals = {n: [0.0, 0] for n in names}  # pooled decode seconds, cycles
    for i, x in enumerate(ids_list):
        rows = {n: [] for n in names}
        for r in range(args.repeats):
            k = (i + r) % len(names)
            for n in names[k:] + names[:k]:
                pol = modes[n]()
                if hasattr(pol, "reset"):
                    pol.reset()
                with bench.no_gc_pauses():
                    res = dec.generate(x, args.max_new_tokens, stop_token_ids=stops, policy=pol,
                                       draft_block_size=trunc)
                rows[n].append(1e6 * res.decode_s / max(1, len(res.cycles)))
                totals[n][0] += res.decode_s
                totals[n][1] += len(res.cycles)
                for c in res.cycles:
                    usage[n][c.block_size] = usage[n].get(c.block_size, 0) + 1
        for n in names:
            per_mode[n].append(statistics.median(rows[n]))
    base = per_mode["fixed16"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dataset": args.dataset, "samples": len(ids_list), "repeats": args.repeats,
              "modes": {}}
    # pooled cycle cost of each fixed size, and what a mixed mode would cost at its usage
    fixed_cost = {b: 1e6 * totals[f"fixed{b}"][0] / max(1, totals[f"fixed{b}"][1]) for b in cands}
    print(f"{'mode':<16} {'median us/cycle':>16} {'median excess vs fixed16 (us)':>30} "
          f"{'pooled us/cycle':>16} {'vs fixed mix':>12}  usage")
    for n in names:
        excess = statistics.median(a - b for a, b in zip(per_mode[n], base))
        pooled = 1e6 * totals[n][0] / max(1, totals[n][1])
        mix = (sum(fixed_cost[b] * k for b, k in usage[n].items()) / sum(usage[n].values())
               if all(b in fixed_cost for b in usage[n]) else float("nan"))
        row = {"median_us_per_cycle": statistics.median(per_mode[n]), "median_excess_us": excess,
               "pooled_us_per_cycle": pooled, "fixed_mix_us_per_cycle": mix, "usage": usage[n]}
        if n in sched:
            pol = sched[n]
            row["select_us_per_call"] = 1e6 * pol.select_s / max(1, pol.calls)
            row["update_us_per_call"] = 1e6 * pol.update_s / max(1, pol.calls)
        report["modes"][n] = row
        extra = (f"  select {row['select_us_per_call']:.1f} us, update {row['update_us_per_call']:.1f} us"
                 if n in sched else "")
        print(f"{n:<16} {row['median_us_per_cycle']:16.1f} {excess:30.1f} {pooled:16.1f} "
              f"{pooled / mix:12.3f}  {usage[n]}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
