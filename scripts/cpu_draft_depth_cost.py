"""CPU cost of a b=16 draft forward by number of draft layers, in AR steps of the embedded target.

Random drafts of 1-4 layers at the embedded target's width (float32, 1 torch thread, the CPU
draft engine), context 200; also the target's 16- and 8-token verify. Thread CPU time,
medians. A cycle's cost decides the tau a draft needs for a given speedup on this CPU
(speedup ~= tau / (verify + draft + ~0.13 steps of append and acceptance)).

    .venv/bin/python scripts/cpu_draft_depth_cost.py [--threads 2]

With ``--threads N`` > 1 the timings are wall-clock (thread CPU time would miss the other
threads' work), so they need a quiet machine.
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash.bench import common as bench  # noqa: E402
from dflash.engine.cpu import CpuDraftEngine  # noqa: E402
from dflash.model.draft import DFlashDraft  # noqa: E402
from dflash.engine.static import StaticTargetEngine, decoder_parts  # noqa: E402
from dflash.training.train_draft import init_draft_weights, make_draft_config  # noqa: E402


def median_ms(fn, n: int = 60, clock=time.thread_time) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = clock()
        fn()
        times.append(clock() - t)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    pair = bench.load_pair("embedded", "embedded", torch.device("cpu"), "float32")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    timed = functools.partial(median_ms, clock=clock)
    target = pair.target
    embed, _, _, lm_head, _ = decoder_parts(target)
    layers = pair.draft.target_layer_ids
    engine = StaticTargetEngine(target, layers, 1024)
    ctx = 200
    ids = torch.randint(3, target.config.vocab_size - 1, (1, ctx))
    _, feats = engine.forward(ids, torch.arange(ctx), kv_len=ctx)
    ar = timed(lambda: engine.forward(ids[:, -1:], torch.tensor([ctx]), kv_len=ctx + 1))
    verify = {t: timed(lambda t=t: engine.forward(ids[:, -t:], torch.arange(ctx, ctx + t),
                                                      kv_len=ctx + t)) for t in (16, 8)}
    print(f"AR step {ar:.2f} ms; verify 16 tokens {verify[16] / ar:.2f} steps, "
          f"8 tokens {verify[8] / ar:.2f} steps")
    block = torch.full((1, 16), pair.draft.mask_token_id)
    block[0, 0] = int(ids[0, -1])
    pos = torch.arange(ctx, ctx + 16)
    for n_layers in (1, 2, 3, 4):
        cfg = make_draft_config(target, num_layers=n_layers, block_size=16,
                                mask_token_id=pair.draft.mask_token_id, target_layer_ids=layers)
        draft = DFlashDraft(cfg)
        init_draft_weights(draft, seed=0)
        eng = CpuDraftEngine(draft.float().eval(), embed, lm_head, 1024)
        eng.append_context(feats, torch.arange(ctx))
        ms = timed(lambda: eng.propose_logits(block, pos, kv_len=ctx + 16))
        cycle = verify[16] / ar + ms / ar + 0.13
        print(f"draft {n_layers} layer(s): {ms:.2f} ms = {ms / ar:.2f} steps; cycle ~{cycle:.2f} "
              f"steps, so 1.5x needs tau >= {1.5 * cycle:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
