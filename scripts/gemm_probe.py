"""Probe: skinny bf16 GEMM variants at the Qwen3-4B shapes (M = tokens per forward)."""
import torch, triton.testing as tt
torch.manual_seed(0)
shapes = {"qkv": (4096 + 2048, 2560), "o": (2560, 4096), "gate_up": (2 * 9728, 2560), "down": (2560, 9728)}
for name, (n, k) in shapes.items():
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wt = w.t().contiguous()
    row = [name]
    for m in (1, 2, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = tt.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=20, rep=100, return_mode="median")
        b = tt.do_bench(lambda: x @ wt, warmup=20, rep=100, return_mode="median")
        xp = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        c = tt.do_bench(lambda: torch.nn.functional.linear(xp, w), warmup=20, rep=100, return_mode="median")
        floor = n * k * 2 / 3.0e12 * 1e3
        row.append(f"M={m}: lin {a*1e3:.0f}us xWt {b*1e3:.0f}us pad64 {c*1e3:.0f}us floor {floor*1e3:.0f}us")
    print(" | ".join(row), flush=True)
