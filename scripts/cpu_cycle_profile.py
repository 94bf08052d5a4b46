"""Where a speculative cycle's time goes on CPU (embedded pair, static engine).

Runs the greedy decoding loop of ``SpeculativeDecoder.generate`` with timers around each
stage (draft forward, target verify, acceptance + host read, draft context append,
bookkeeping) and the plain autoregressive step on the same engine, interleaved prompt by
prompt in one process, and prints each stage in milliseconds and in autoregressive steps.
``--draft-engines generic cpu`` compares ``engine.draft.DraftEngine`` with
``engine.cpu.CpuDraftEngine`` (what the CPU static engine now uses) side by side.

Timers read this thread's CPU time by default (``--clock thread``): with one torch thread
that is the work done, unaffected by other jobs taking the core away (they still pollute
caches, so repeat and compare ratios). ``--clock wall`` reads the wall clock instead.

    .venv/bin/python scripts/cpu_cycle_profile.py --dataset builtin-math --samples 8
    .venv/bin/python scripts/cpu_cycle_profile.py --dataset humaneval --samples 8
    .venv/bin/python scripts/cpu_cycle_profile.py --samples 1 --torch-profile
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash.bench import common as bench  # noqa: E402
from dflash.engine.cpu import CpuDraftEngine  # noqa: E402
from dflash.datasets import load_prompts  # noqa: E402
from dflash.engine.draft import DraftEngine  # noqa: E402
from dflash.engine.static import StaticTargetEngine, decoder_parts  # noqa: E402
from dflash.decoding.sampling import greedy_accept  # noqa: E402

STAGES = ("draft", "verify", "accept", "append", "book", "cycle")


def timed_generate(target, draft, ids, max_new, b, mask_id, stops, acc, clk):
    """Greedy generation (mirrors decoding.SpeculativeDecoder.generate) with stage timers.

    Returns (output ids, decode time after the first token, per-cycle tau list)."""
    ids = ids.reshape(-1)
    p = ids.numel()
    pos0 = torch.arange(p)
    logits, feats = target.forward(ids[None], pos0, kv_len=p)
    last = logits[0, -1:].argmax(-1)
    out = [int(last.item())]
    if b > 1:
        draft.append_context(feats, pos0)
    start, taus = p, []
    stopped = out[0] in stops
    t_all = clk()
    while not stopped and len(out) < max_new:
        t0 = clk()
        pos = torch.arange(start, start + b)
        kv = start + b
        if b > 1:
            block = torch.full((1, b), mask_id, dtype=ids.dtype)
            block[0, 0] = last[0]
            d_logits = draft.propose_logits(block, pos, kv_len=kv)[0]
            proposals = d_logits.argmax(dim=-1)
            verify_ids = torch.cat([last, proposals])[None]
        else:
            proposals = last[:0]
            verify_ids = last[None]
        t1 = clk()
        t_logits, t_feats = target.forward(verify_ids, pos, kv_len=kv)
        t2 = clk()
        accepted, nxt = greedy_accept(proposals, t_logits[0])
        packed = torch.cat([accepted.reshape(1), proposals, nxt]).tolist()
        a = packed[0]
        new = packed[1:1 + a] + [packed[b + a]]
        tau = a + 1
        t3 = clk()
        if b > 1:
            draft.append_context(t_feats[:, :tau], pos[:tau])
        t4 = clk()
        last = nxt[a:a + 1]
        start += tau
        for tok in new:
            out.append(tok)
            if tok in stops or len(out) >= max_new:
                stopped = tok in stops
                break
        t5 = clk()
        for k, v in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            acc[k].append(v)
        taus.append(tau)
    return out[:max_new], clk() - t_all, taus


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="builtin-math")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--draft-engines", nargs="+", default=["generic", "cpu"],
                    choices=["generic", "cpu"])
    ap.add_argument("--torch-profile", action="store_true", help="also a per-op table")
    args = ap.parse_args()

    clk = time.thread_time if args.clock == "thread" else time.perf_counter
    pair = bench.load_pair("embedded", "embedded", torch.device("cpu"), "float32")
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads > 1:
        print("note: --clock thread misses the other threads' work; use --clock wall")
    stops = set(bench.stop_token_ids(pair))
    prompts, src = load_prompts(args.dataset, args.samples, offline_fallback=True)
    enc = [torch.tensor(bench.encode_chat(pair.tokenizer, [{"role": "user", "content": r["turns"][0]}]))
           for r in prompts]
    cap = -(-(max(e.numel() for e in enc) + args.max_new + 65) // 256) * 256
    draft = pair.draft
    ids_l = draft.target_layer_ids
    targets = {"static": StaticTargetEngine(pair.target, ids_l, cap)}
    embed, _, _, lm_head, _ = decoder_parts(pair.target)
    makers = {"generic": DraftEngine, "cpu": CpuDraftEngine}
    drafts = {name: makers[name](draft, embed, lm_head, cap) for name in args.draft_engines}
    mask_id = draft.mask_token_id
    for t in targets.values():  # warm-up
        for d in drafts.values():
            timed_generate(t, d, enc[0], 32, 1, mask_id, stops, defaultdict(list), clk)
            timed_generate(t, d, enc[0], 32, args.block, mask_id, stops, defaultdict(list), clk)

    acc = defaultdict(lambda: defaultdict(list))  # (target, draft or "baseline") -> stage -> s
    tot, toks, taus = defaultdict(float), defaultdict(int), defaultdict(list)
    outs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for j, ids in enumerate(enc):
                for tname, t in targets.items():
                    key = (tname, "baseline")
                    ref, s, _ = timed_generate(t, None, ids, args.max_new, 1, mask_id, stops,
                                               acc[key], clk)
                    if outs.setdefault(j, ref) != ref:
                        print(f"note: {tname} baseline output differs from the first engine's "
                              f"on prompt {j}")
                    tot[key] += s
                    toks[key] += len(ref) - 1
                    for dname, d in drafts.items():
                        key = (tname, dname)
                        o, s, tt = timed_generate(t, d, ids, args.max_new, args.block, mask_id,
                                                  stops, acc[key], clk)
                        assert o == ref, f"{key}: speculative output differs from the baseline"
                        tot[key] += s
                        toks[key] += len(o) - 1
                        taus[key] += tt
    print(f"{args.dataset} ({src}): {len(enc)} prompts x {args.repeats}, {args.threads} torch "
          f"thread(s), {args.clock} clock, block {args.block}; speculative outputs identical "
          "to their baseline's")
    for tname in targets:
        base = acc[(tname, "baseline")]
        step = statistics.mean(base["cycle"])
        tpot_base = tot[(tname, "baseline")] / toks[(tname, "baseline")]
        print(f"== target engine {tname}: AR step {1e3 * step:.3f} ms (median "
              f"{1e3 * statistics.median(base['cycle']):.3f}), baseline TPOT "
              f"{1e3 * tpot_base:.3f} ms")
        print(f"{'stage':8s}" + "".join(f"{d + ' draft ms':>18s}{'AR steps':>10s}" for d in drafts))
        for k in STAGES:
            row = f"{k:8s}"
            for dname in drafts:
                m = statistics.mean(acc[(tname, dname)][k])
                row += f"{1e3 * m:18.3f}{m / step:10.2f}"
            print(row)
        for dname in drafts:
            key = (tname, dname)
            tau = sum(taus[key]) / len(taus[key])
            tpot = tot[key] / toks[key]
            cyc = statistics.mean(acc[key]["cycle"]) / step
            print(f"  {dname} draft: tau {tau:.2f}, cycle {cyc:.2f} AR steps, TPOT "
                  f"{1e3 * tpot:.3f} ms: speedup {tpot_base / tpot:.2f}x (tau / cycle = "
                  f"{tau / cyc:.2f}x)")

    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        for (tname, t), (dname, d) in itertools.product(targets.items(), drafts.items()):
            for b in (1, args.block):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    timed_generate(t, d, enc[0], 96, b, mask_id, stops, defaultdict(list), clk)
                print(f"--- torch.profiler, target {tname}, draft {dname}, block {b}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
