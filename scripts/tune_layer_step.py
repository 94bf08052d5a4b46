"""Tune the skinny GEMM configs where they run: inside the fast engine's CUDA-graphed step.

scripts/tune_skinny_gemm.py times each GEMM alone (with its own K-split reduce kernel, no
PDL). In the layer kernels the split-K partials are reduced by the residual/norm kernel that
runs anyway, q/k/v and gate/up run unsplit, gate/up carries the SwiGLU epilogue, and every
kernel overlaps its launch with the previous one, so the best config differs. This script
builds the Qwen3-4B-shaped target (random bf16 weights) with the fast engine and, shape by
shape (coordinate descent, two passes), replays the whole AR step (T=1) and verify step
(T=16) graph for each candidate config, keeping the one with the lowest T=1 + T=16 time.
Prints every candidate and writes the winners as a table for dflash.engine.cuda.gemm_configs.

Usage (GPU): python scripts/tune_layer_step.py --out tune_layer.json [--write-table PATH]
A table written as dflash/engine/cuda/configs/skinny_gemm_<model>.json (e.g. skinny_gemm_a100.json) is
used on every GPU whose name contains <model>.
"""
import argparse
import itertools
import json
import time

import torch

from dflash.engine.cuda import gemm_configs
from dflash.engine.static import StaticTargetEngine
from dflash.engine.graphs import GraphCache
from dflash.engine.cuda.layer import interleave_gate_up
from dflash.bench.perf import QWEN3_4B, build_models, time_ms

SHAPES = {"gate_up": (19456, 2560), "down": (2560, 9728), "qkv": (6144, 2560), "o": (2560, 4096)}


def candidates(name, n, k):
    """First pass: tiles x K splits at 4 stages (pass 2 varies the stages of the leaders)."""
    partial = name in ("o", "down")  # split-K partials go to the residual/norm kernel
    out = []
    for bn, bk, split in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                           (1, 2, 4, 8) if partial else (1,)):
        if k % (split * bk) or bn * bk > 16384 or (partial and bk == 64):
            continue
        if name == "gate_up" and (bn < 32 or (n // 2) % (bn // 2)):
            continue
        progs = -(-n // bn) * split
        if progs < 80 or progs > 800:
            continue
        out.append((bn, bk, split, 8 if bn == 128 else 4, 4))
    return out


def deinterleave(w, chunk):
    k = w.shape[1]
    pairs = w.reshape(-1, 2, chunk, k)
    return torch.cat([pairs[:, 0].reshape(-1, k), pairs[:, 1].reshape(-1, k)])


def set_config(eng, name, cfg):
    n, k = SHAPES[name]
    gemm_configs.tuned_table()[(n, k)] = tuple(cfg)
    gemm_configs.config_for.cache_clear()
    if name == "gate_up":
        chunk = cfg[0] // 2
        for fl in eng.fused_layers:
            if fl.gu_chunk != chunk:
                fl.wgu = interleave_gate_up(deinterleave(fl.wgu, fl.gu_chunk), chunk)
                fl.gu_chunk = chunk


def measure(eng, ctx, iters):
    eng._graphed = GraphCache(lambda ids, pos: eng._forward(ids, pos, None), True)
    dev = eng.device
    one, p1 = torch.randint(0, 1000, (1, 1), device=dev), torch.tensor([ctx], device=dev)
    blk, p16 = torch.randint(0, 1000, (1, 16), device=dev), torch.arange(ctx, ctx + 16, device=dev)
    t1 = time_ms(lambda: eng.forward(one, p1), dev, iters)
    t16 = time_ms(lambda: eng.forward(blk, p16), dev, iters)
    return t1, t16


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tune_layer_step.json")
    p.add_argument("--write-table", default=None)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    dev = torch.device("cuda")
    target, draft = build_models(QWEN3_4B, dev, torch.bfloat16)
    eng = StaticTargetEngine(target, draft.target_layer_ids, 2400, fused=True, compile=True,
                             graphs=True)
    del draft
    ids = torch.randint(0, 1000, (1, args.ctx), device=dev)
    eng.forward(ids, torch.arange(args.ctx, device=dev), kv_len=args.ctx)
    start = {name: gemm_configs.config_for(*SHAPES[name]) for name in SHAPES}  # loads the table
    best = dict(start)
    t1, t16 = measure(eng, args.ctx, args.iters)
    report = {"gpu": torch.cuda.get_device_name(0), "start": {k: list(v) for k, v in start.items()},
              "start_ms": [t1, t16], "trials": []}
    print(f"start {start}: T=1 {t1:.3f} ms, T=16 {t16:.3f} ms", flush=True)
    t0 = time.time()
    leaders = {}
    for ps in range(args.passes):
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            if ps == 0:
                cands = candidates(name, n, k)
            else:  # the leaders again (the other shapes have moved), and other stage counts
                cands = list(dict.fromkeys(leaders[name] + [
                    c[:4] + (s,) for c in leaders[name][:2] for s in (3, 5)]))
            rows = []
            for cfg in cands:
                try:
                    set_config(eng, name, cfg)
                    r1, r16 = measure(eng, args.ctx, args.iters)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  {name} {cfg}: error {str(e)[:120]}", flush=True)
                    continue
                rows.append((r1 + r16, r1, r16, cfg))
                report["trials"].append({"pass": ps, "shape": name, "cfg": list(cfg), "t1": r1,
                                         "t16": r16})
            rows.sort()
            leaders[name] = [r[3] for r in rows[:4]]
            for tot, r1, r16, cfg in rows[:6]:
                print(f"  pass {ps} {name} {cfg}: T=1 {r1:.3f} T=16 {r16:.3f}", flush=True)
            best[name] = rows[0][3]
            set_config(eng, name, best[name])
            print(f"pass {ps} {name}: best {best[name]} ({time.time() - t0:.0f} s)", flush=True)
    t1, t16 = measure(eng, args.ctx, args.iters)
    for name in SHAPES:  # the starting table, measured again at the end for drift
        set_config(eng, name, start[name])
    s1, s16 = measure(eng, args.ctx, args.iters)
    report.update(best={k: list(v) for k, v in best.items()}, best_ms=[t1, t16],
                  start_ms_again=[s1, s16])
    print(f"best {best}: T=1 {t1:.3f} T=16 {t16:.3f}; start again: T=1 {s1:.3f} T=16 {s16:.3f}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.write_table:
        table = json.loads(gemm_configs.table_path(torch.cuda.get_device_name(0)).read_text())
        table["gpu"] = torch.cuda.get_device_name(0)
        for name, cfg in best.items():
            table["configs"][",".join(map(str, SHAPES[name]))] = list(cfg)
        table["note"] = ("written by scripts/tune_skinny_gemm.py; the four layer shapes by "
                         "scripts/tune_layer_step.py")
        with open(args.write_table, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
