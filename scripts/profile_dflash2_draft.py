"""Kernel-time breakdown of the DFlash 1 vs DFlash 2 draft step (fast engine, Qwen3-4B shape, random weights).

Usage (GPU): PYTHONPATH=. python scripts/profile_dflash2_draft.py  (torch.profiler tables + ms per propose; docs/PERFORMANCE.md 2026-12-03)
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from dflash.bench.perf import QWEN3_4B, build_models, build_dflash2_draft
from dflash.decoding.loop import SpeculativeDecoder

dev = torch.device("cuda"); dt = torch.bfloat16
target, d1 = build_models(QWEN3_4B, dev, dt)
d2 = build_dflash2_draft(QWEN3_4B, d1, dev, dt)
ctx, b = 512, 16
prompt = torch.randint(0, 1000, (1, ctx), device=dev)
for name, d in (("dflash1", d1), ("dflash2", d2)):
    dec = SpeculativeDecoder(target, d, engine="fast")
    dec.reserve(ctx + 256)
    tgt, drf = dec.engines.target_engine, dec.engines.draft_engine
    with torch.inference_mode():
        _, feats = tgt.forward(prompt, torch.arange(ctx, device=dev), kv_len=ctx)
        drf.append_context(feats, torch.arange(ctx, device=dev))
        pos = torch.arange(ctx, ctx + b, device=dev)
        block = torch.randint(0, 1000, (1, b), device=dev)
        for mode in ("graph", "eager"):
            kv = None if mode == "graph" else ctx + b
            fn = lambda: drf.propose_tokens(block, pos, kv)
            for _ in range(5): fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10): fn()
                torch.cuda.synchronize()
            print(f"===== {name} {mode}: propose_tokens x10")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
            st = torch.cuda.Event(enable_timing=True); en = torch.cuda.Event(enable_timing=True)
            st.record()
            for _ in range(50): fn()
            en.record(); torch.cuda.synchronize()
            print(f"{name} {mode}: {st.elapsed_time(en)/50:.3f} ms per propose", flush=True)
    del dec; torch.cuda.empty_cache()
