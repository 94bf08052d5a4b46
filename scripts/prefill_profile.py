"""Where a fast-engine prefill spends its time (issue 26: TTFT against the compute floor).

Usage (GPU, ~1 min): PYTHONPATH=. python scripts/prefill_profile.py [--tokens 512,2048] [--out f.json]

Qwen3-4B shape, random bf16 weights. Per prompt length: the wall time of one prefill (synced),
the GPU busy time inside it (sum of kernel times from torch.profiler), so wall - busy is what
the host adds, and the top kernels and CPU ops. Prints one JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dflash.bench.perf import QWEN3_4B, build_models, time_ms
from dflash.decoding.loop import SpeculativeDecoder


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    target, _ = build_models(QWEN3_4B, device, torch.bfloat16)
    lengths = [int(x) for x in args.tokens.split(",")]
    dec = SpeculativeDecoder(target, None, engine="fast")
    dec.reserve(max(lengths) + 64)
    tgt = dec.engines.target_engine
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lengths": {}}
    for n in lengths:
        ids = torch.randint(0, target.config.vocab_size - 2, (1, n), device=device)
        pos = torch.arange(n, device=device)
        step = lambda: tgt.forward(ids, pos, kv_len=n)  # noqa: E731
        wall = time_ms(step, device, 5, warmup=2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        by_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]
        by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
        report["lengths"][n] = {
            "wall_ms": round(wall, 2), "gpu_busy_ms": round(gpu_us / 1000, 2),
            "kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1000, 3))
                        for e in by_gpu],
            "cpu_ops": [(e.key[:90], e.count, round(e.self_cpu_time_total / 1000, 3))
                        for e in by_cpu]}
        print(f"{n} tokens: wall {wall:.2f} ms, GPU busy {gpu_us / 1000:.2f} ms", flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
