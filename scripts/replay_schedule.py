"""Replay the block-size schedulers on real truncation-mode acceptance, without timing noise.

In truncation mode (greedy) a cycle anchored at position s drafts the same full block whatever
its block size b, so it accepts exactly min(run(s) + 1, b) where run(s) is the matching prefix
of that block. This script records run(s) for every position of each prompt's greedy output
(one target forward and one draft call per position), then replays fixed sizes and the
schedulers over it with a cycle-cost model c(b) and multiplicative noise, many seeds: the
scheduler's logic measured apart from the shared CPU's timing noise. The last cycle's tau is
cut at the recorded output (the real loop counts it whole), which does not change TPOT.

    .venv/bin/python scripts/replay_schedule.py --datasets builtin-math,builtin-code \\
        --costs 8:14.7,12:15.5,16:16.3
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash.decoding.result import FixedPolicy  # noqa: E402
from dflash.decoding.scheduler import CostModelScheduler, EWMAScheduler  # noqa: E402


def record_runs(datasets, samples, max_new, draft_block) -> dict:
    import torch

    from dflash.bench import common as bench
    from dflash.datasets import load_prompts
    from dflash.decoding.loop import SpeculativeDecoder

    pair = bench.load_pair("embedded", "embedded", torch.device("cpu"), "float32")
    stops = bench.stop_token_ids(pair)
    out = {}
    with torch.inference_mode():
        for ds in datasets:
            out[ds] = []
            for p in load_prompts(ds, samples)[0]:
                ids = bench.encode_chat(pair.tokenizer, [{"role": "user", "content": p["turns"][0]}])
                dec = SpeculativeDecoder(pair.target, pair.draft)
                res = dec.generate(torch.tensor([ids]), max_new, block_size=1, stop_token_ids=stops)
                seq, n = ids + res.output_ids, len(ids)
                dec.reserve(len(seq) + draft_block + 1)
                target, draft = dec.engines.target_engine, dec.engines.draft_engine
                pos = torch.arange(len(seq))
                _, feats = target.forward(torch.tensor([seq]), pos, kv_len=len(seq))
                draft.append_context(feats[:, :n], pos[:n])
                runs = []
                for s in range(n, len(seq)):
                    block = torch.full((1, draft_block), pair.draft.mask_token_id)
                    block[0, 0] = seq[s]
                    props = draft.propose_logits(block, torch.arange(s, s + draft_block),
                                                 kv_len=s + draft_block)[0].argmax(-1).tolist()
                    r = 0
                    while r < len(props) and s + 1 + r < len(seq) and props[r] == seq[s + 1 + r]:
                        r += 1
                    runs.append(r)
                    # the block overwrote cache slots s.. with its own keys: restore the context
                    draft.append_context(feats[:, s:s + draft_block], pos[s:s + draft_block])
                out[ds].append({"id": p["id"], "tokens": len(res.output_ids), "runs": runs})
    return out


def generate(policy, rec, costs, rng, noise, drift=0.0, switch_cost=0.0, prev=None):
    """One prompt: (decode seconds, tokens after the first, the last block size). ``drift``:
    the machine's speed also wanders (sd ``drift`` in log space: a level per prompt times a
    slow AR(1) process), as a shared CPU or a GPU host does, which pairs of neighbouring
    cycles cancel. ``switch_cost`` (seconds) is added to a cycle whose size differs from the
    previous cycle's, ``prev`` being the previous prompt's last size (on the H100 a cycle right
    after a change costs ~10-20 us more: another CUDA graph, cold instruction caches)."""
    done, elapsed, s, i = 1, 0.0, 0, 0
    level, slow = rng.gauss(0.0, drift), 0.0
    pending = None
    while done < rec["tokens"]:
        b = policy.select(i)
        if pending is not None:  # as in the decoding loop: cycle i-1 is reported after select(i)
            policy.update(*pending)
        tau = min(rec["runs"][s] + 1, b)
        slow = 0.95 * slow + rng.gauss(0.0, drift * 0.31)  # stationary sd ~ drift
        c = costs[b] * math.exp(level + slow) * max(0.5, 1.0 + noise * rng.gauss(0.0, 1.0))
        if prev is not None and b != prev:
            c += switch_cost
        prev = b
        pending = (tau, c, b, i)
        elapsed += c
        done, s, i = done + tau, s + tau, i + 1
    if pending is not None:
        policy.update(*pending)
    return elapsed, min(done, rec["tokens"]) - 1, prev


def tpot(make, records, costs, seed, noise, keep, drift=0.0, switch_cost=0.0) -> float:
    rng, policy, t, n, prev = random.Random(seed), make(), 0.0, 0, None
    for rec in records:
        if isinstance(policy, CostModelScheduler):
            policy.reset(keep_costs=True, keep_estimates=keep)
        elif isinstance(policy, EWMAScheduler):
            policy.reset(keep_estimates=keep)
        dt, dn, prev = generate(policy, rec, costs, rng, noise, drift, switch_cost, prev)
        t, n = t + dt, n + dn
    return t / max(1, n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="builtin-math,builtin-code,builtin-chat")
    ap.add_argument("--max-samples", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--costs", default="8:14.7,12:15.5,16:16.3",
                    help="cycle cost per candidate, ms (default: measured truncation-mode cycles "
                         "of the embedded pair on the 2-core CPU)")
    ap.add_argument("--noise", type=float, default=0.05, help="relative cost noise (sd)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--drift", type=float, default=0.0,
                    help="slow drift of the machine's speed (sd in log space), see generate()")
    ap.add_argument("--switch-cost", type=float, default=0.0,
                    help="extra cost of a cycle whose size differs from the previous one, ms")
    ap.add_argument("--runs-json", default=None,
                    help="reuse (or write, if missing) the recorded runs here")
    args = ap.parse_args(argv)
    costs = {int(b): float(ms) / 1000 for b, ms in (kv.split(":") for kv in args.costs.split(","))}
    cands = sorted(costs)
    path = Path(args.runs_json) if args.runs_json else None
    if path and path.exists():
        data = json.loads(path.read_text())
    else:
        data = record_runs(args.datasets.split(","), args.max_samples, args.max_new_tokens,
                           max(cands))
        if path:
            path.write_text(json.dumps(data))
    makers = {"ewma": lambda: EWMAScheduler(cands), "costmodel": lambda: CostModelScheduler(cands)}
    seeds = range(args.seeds)
    print(f"TPOT ms (mean of {args.seeds} seeds, cost noise {args.noise:.0%}, drift "
          f"{args.drift:.0%}, switch cost {args.switch_cost * 1000:.0f} us); "
          "ratio = best fixed / dynamic (> 1: dynamic faster)")
    for ds, records in data.items():
        sw = args.switch_cost / 1000
        fixed = {b: sum(tpot(lambda b=b: FixedPolicy(b), records, costs, s, args.noise, False,
                             args.drift, sw)
                        for s in seeds) / len(seeds) for b in cands}
        best = min(fixed.values())
        cells = [f"fixed {b}: {1000 * v:.2f}" for b, v in fixed.items()]
        for keep in (False, True):
            for name, make in makers.items():
                d = sum(tpot(make, records, costs, s, args.noise, keep, args.drift, sw)
                        for s in seeds) / len(seeds)
                cells.append(f"{name}{' keep' if keep else ''}: {best / d:.3f}x")
        print(f"{ds}: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
