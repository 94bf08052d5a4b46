"""Kernel-level breakdown of one AR step, one verify and one draft pass (Qwen3-4B shape, GPU).

Runs the fast engine's layer code eagerly (compiled math, no CUDA graph, so the profiler sees
every kernel) and prints, per phase, the GPU time per kernel family. Usage (GPU):
  python scripts/profile_step.py [--ctx 1024] [--block 16]
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dflash.engine.draft import DraftEngine
from dflash.engine.static import StaticTargetEngine, decoder_parts
from dflash.bench.perf import QWEN3_4B, build_models


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("_gemm_kernel", "gemm(fused layer)"), ("qk_rope", "rope+kv write"),
                     ("_attn_", "attention"), ("skinny", "skinny_gemm"), ("_reduce_kernel", "skinny_reduce"),
                     ("gemv", "gemm(cublas)"), ("gemm", "gemm(cublas)"), ("cutlass", "gemm(cublas)"),
                     ("nvjet", "gemm(cublas)"), ("splitk", "gemm(cublas)"), ("fmha", "attention"),
                     ("flash", "attention"), ("attention", "attention"), ("softmax", "softmax"),
                     ("index", "index/copy"), ("copy", "index/copy"), ("cat", "index/copy"),
                     ("triton", "triton(fused)"), ("elementwise", "elementwise"),
                     ("reduce", "reduce")):
        if key in n:
            return fam
    return "other"


def breakdown(fn, reps=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    fams, kern = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            fams[family(e.name)] += us / reps
            kern[e.name][0] += us / reps
            kern[e.name][1] += 1
    return fams, kern


def show(title, fams, kern, top=12):
    total = sum(fams.values())
    print(f"\n== {title}: GPU busy {total / 1000:.3f} ms per call")
    for f, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {f:16s} {us / 1000:7.3f} ms")
    for name, (us, cnt) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / 1000:7.3f} ms  x{cnt // 5:<4d} {name[:110]}")


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--capacity", type=int, default=2304)
    args = p.parse_args()
    dev = torch.device("cuda")
    target, draft = build_models(QWEN3_4B, dev, torch.bfloat16)
    tgt = StaticTargetEngine(target, draft.target_layer_ids, args.capacity, fused=True,
                             compile=True, graphs=False)
    embed, _, _, lm_head, _ = decoder_parts(target)
    drf = DraftEngine(draft, embed, lm_head, args.capacity, fused=True, compile=True, graphs=False)
    c, b = args.ctx, args.block
    ids = torch.randint(0, 1000, (1, c), device=dev)
    _, feats = tgt.forward(ids, torch.arange(c, device=dev), kv_len=c)
    drf.append_context(feats, torch.arange(c, device=dev))
    one, pos1 = ids[:, -1:], torch.tensor([c], device=dev)
    blk, posb = torch.randint(0, 1000, (1, b), device=dev), torch.arange(c, c + b, device=dev)
    fb = feats[:, :b]
    phases = {
        "AR step (T=1, whole-buffer mask)": lambda: tgt._forward(one, pos1, None),
        f"verify (T={b}, whole-buffer mask)": lambda: tgt._forward(blk, posb, None),
        f"draft propose (b={b})": lambda: drf._propose_logits(blk, posb, None),
        f"draft append_context ({b} rows)": lambda: drf._append_context(fb, posb),
    }
    for title, fn in phases.items():
        show(title, *breakdown(fn))


if __name__ == "__main__":
    main()
