"""Python cost of a block-size policy per decoding cycle (select + update), in microseconds.

Matters where a cycle is a fraction of a millisecond (a small pair on a GPU). Synthetic
cycles: geometric acceptance runs, cycle times with 5% noise. With --per-generation N the
policy is reset (costs kept) every N cycles, as between prompts: short generations are where
the cost model re-decides after every cycle.
Usage: python scripts/scheduler_overhead.py [--cycles 20000] [--per-generation 30]
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash.decoding.result import FixedPolicy  # noqa: E402
from dflash.decoding.scheduler import CostModelScheduler, EWMAScheduler  # noqa: E402


def per_cycle_us(policy, cycles: int, per_generation: int = 0) -> float:
    rnd = random.Random(0)
    t0 = time.perf_counter()
    for i in range(cycles):
        if per_generation and i % per_generation == 0 and i:
            if isinstance(policy, CostModelScheduler):
                policy.reset(keep_costs=True)
            elif hasattr(policy, "reset"):
                policy.reset()
        b = policy.select(i)
        tau = min(b, 1 + int(rnd.expovariate(0.15)))
        policy.update(tau, 0.0004 * (1 + 0.05 * rnd.random()), b, i)
    return (time.perf_counter() - t0) / cycles * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=20000)
    p.add_argument("--candidates", default="8,12,16")
    p.add_argument("--per-generation", type=int, default=0,
                   help="reset the policy every N cycles, like a new prompt (0 = never)")
    args = p.parse_args()
    cands = [int(c) for c in args.candidates.split(",")]
    for name, make in (("fixed (b=16)", lambda: FixedPolicy(max(cands))),
                       ("ewma", lambda: EWMAScheduler(cands)),
                       ("costmodel", lambda: CostModelScheduler(cands))):
        print(f"{name:14s} {per_cycle_us(make(), args.cycles, args.per_generation):6.1f} us/cycle (incl. ~0.5 us of harness)")


if __name__ == "__main__":
    main()
