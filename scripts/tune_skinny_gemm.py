"""Tune dflash.engine.cuda.kernels' skinny GEMM for the Qwen3-4B target/draft shapes, against cuBLAS.

Each candidate is timed the way a decoding step runs it: a CUDA graph of calls over enough
copies of the weight that none of it stays in L2. Prints per shape the cuBLAS time, the best
config per M and the best config shared by M = 1 and M = 16 (what dflash.engine.cuda.gemm_configs.tuned_table()
holds: one config per (N, K) keeps each row's arithmetic independent of M). Writes JSON.
Usage (GPU): python scripts/tune_skinny_gemm.py --out tune.json
"""
import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from dflash.engine.cuda import kernels

SHAPES = {  # name: (N, K)
    "qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728),
    "lm_head": (151936, 2560), "draft_fc": (2560, 12800), "draft_kv": (1024, 2560),
}
TILES = [(16, 128), (16, 256), (16, 512), (32, 64), (32, 128), (32, 256), (32, 512),
         (64, 64), (64, 128), (64, 256), (128, 64), (128, 128)]


def graph_time_us(calls, reps=10):
    """Median per-call time (us) of a CUDA graph that runs ``calls`` back to back."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    for _ in range(2):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    del g
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tune_skinny_gemm.json")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--write-table", default=None, help="also write the shared configs here "
                   "(dflash/engine/cuda/configs/skinny_gemm_h100.json is what dflash.engine.cuda.kernels loads)")
    args = p.parse_args()
    torch.manual_seed(0)
    ms = [int(m) for m in args.ms.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    t_start = time.time()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        mb = n * k * 2 / 1e6
        copies = max(1, int(200 // mb) + 1)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        floor_us = mb / 3.0e6 * 1e6  # at 3.0 TB/s
        res = {"N": n, "K": k, "MB": mb, "floor_us_3TBs": floor_us, "cublas_us": {}, "cands": []}
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in ms}
        for m in ms:
            res["cublas_us"][m] = graph_time_us([lambda w=w, x=xs[m]: F.linear(x, w) for w in ws])
            ref = F.linear(xs[m].float(), ws[0].float())
        for (bn, bk), split, warps, stages in itertools.product(TILES, (1, 2, 4, 8, 16), (4, 8), (3, 4)):
            if k % (split * bk) or bn * bk > 16384 or (warps == 8 and bn < 64):
                continue
            progs = -(-n // bn) * split
            if progs < sms // 2 or progs > 40000:
                continue
            cfg = (bn, bk, split, warps, stages)
            row = {"cfg": cfg}
            try:
                for m in ms:
                    y = kernels.skinny_matmul(xs[m], ws[0], cfg)
                    err = (y.float() - F.linear(xs[m].float(), ws[0].float())).abs().max().item()
                    if err > 0.05:
                        raise RuntimeError(f"wrong result, max err {err}")
                    row[m] = graph_time_us([lambda w=w, x=xs[m]: kernels.skinny_matmul(x, w, cfg)
                                            for w in ws])
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                row["error"] = str(e)[:200]
            res["cands"].append(row)
        ok = [r for r in res["cands"] if "error" not in r]
        for m in ms:
            best = min(ok, key=lambda r: r[m])
            res[f"best_m{m}"] = {"cfg": best["cfg"], "us": best[m]}
        shared = min(ok, key=lambda r: sum(r[m] / res[f"best_m{m}"]["us"] for m in ms))
        res["best_shared"] = {"cfg": shared["cfg"], **{f"us_m{m}": shared[m] for m in ms}}
        report["shapes"][name] = res
        print(f"{name} N={n} K={k} {mb:.0f}MB floor {floor_us:.0f}us | cuBLAS "
              + " ".join(f"M{m}={res['cublas_us'][m]:.0f}" for m in ms) + " | best "
              + " ".join(f"M{m}={res[f'best_m{m}']['us']:.0f}{res[f'best_m{m}']['cfg']}" for m in ms)
              + f" | shared {shared['cfg']} " + " ".join(f"M{m}={shared[m]:.0f}" for m in ms)
              + f" | {len(ok)}/{len(res['cands'])} ok, {time.time() - t_start:.0f}s", flush=True)
        del ws
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.write_table:
        table = {"gpu": report["gpu"], "note": "written by scripts/tune_skinny_gemm.py",
                 "configs": {f"{r['N']},{r['K']}": (list(r["best_shared"]["cfg"])
                                                    if sum(r["best_shared"][f"us_m{m}"] for m in ms)
                                                    < sum(r["cublas_us"][m] for m in ms) else None)
                             for r in report["shapes"].values()}}
        with open(args.write_table, "w") as f:
            json.dump(table, f, indent=1)
    print("TUNED = {" + ", ".join(f"({r['N']}, {r['K']}): {tuple(r['best_shared']['cfg'])}"
                                  for r in report["shapes"].values()) + "}")


if __name__ == "__main__":
    main()
