"""Probe (CUDA): the 144 dependent skinny GEMMs of one AR step alone, and variants of them.

Runs the GEMM chain of one Qwen3-4B AR step (36 layers x q/k/v, o, gate/up + SwiGLU, down;
the tuned configs, PDL, one CUDA graph, no small kernels in between) with the engine's kernel
and with variants, to find where the time over the weight-read floor goes:
  engine      the engine's own launch (dflash.engine.cuda.layer._gemm), the reference
  tiled       weights re-laid out so each program's tiles are one contiguous stream
              ([N/BN, SPLIT, K/(SPLIT BK), BN, BK]); evict: evict-first hint on weight loads
  regD        weights double-buffered in registers by hand, D tiles ahead (no cp.async);
              +prewait: the first tiles loaded before the PDL wait
  waitloop    the PDL wait moved into the K loop (an impure asm whose 0 result the x address
              depends on): Triton's pipeliner then issues the first stages' weight copies
              before the wait, and loads x synchronously in the loop; +S: S more stages
  x-ahead     as waitloop, with x loaded one step ahead in registers
Each variant is checked bitwise against the engine's products (M = 1 and 16), then
timed in alternation (median of --rounds x --iters replays). Results: docs/PERFORMANCE.md.

Usage: python scripts/gemm_chain_probe.py [--variants engine,x-ahead] [--rounds 3]
"""
import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from dflash.engine.cuda.gemm_configs import config_for
from dflash.engine.cuda.kernels import pdl_enter, pdl_opts, use_pdl
from dflash.engine.cuda.layer import _gemm
from dflash.bench.perf import copy_bandwidth, time_ms

SHAPES = [("qkv", 6144, 2560), ("o", 2560, 4096), ("gate_up", 19456, 2560), ("down", 2560, 9728)]
LAYERS = 36


@triton.jit
def _wait_token(PDL: tl.constexpr):
    """The PDL wait (+ trigger) as an impure asm whose result (0) later addresses depend on:
    Triton's pipeliner leaves it (and the loads it feeds) in the loop, while it hoists the
    weight loads of the first stages in front of the loop, i.e. before the wait."""
    if PDL:
        return tl.inline_asm_elementwise(
            "griddepcontrol.wait; griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        return 0


@triton.jit
def _store_out(acc, out_ptr, pid_n, pid_k, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PARTIAL: tl.constexpr, SWIGLU: tl.constexpr):
    """The engine kernel's three epilogues: fp32 split-K partials, SwiGLU, or the product."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    if PARTIAL:
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok)
    elif SWIGLU:
        half: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
        y = gate / (1.0 + tl.exp(-gate)) * up
        offs_h = pid_n * half + tl.arange(0, half)
        tl.store(out_ptr + offs_m[:, None] * (N // 2) + offs_h[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=m_ok)
    else:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, PARTIAL: tl.constexpr, SWIGLU: tl.constexpr,
                 TILED: tl.constexpr, EVICT: tl.constexpr, WAIT_IN_LOOP: tl.constexpr,
                 X_AHEAD: tl.constexpr, PDL: tl.constexpr):
    """The engine's skinny GEMM loop (dflash/engine/cuda/kernels.py) with the probe's options."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    x_rows = x_ptr + offs_m[:, None] * K
    if TILED:  # this program's tiles, one after another: [BLOCK_N, BLOCK_K] each
        w_tile = (w_ptr + (pid_n * SPLIT + pid_k) * k_per_split * BLOCK_N
                  + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + offs_k[None, :])
    else:
        w_rows = w_ptr + offs_n[:, None] * K
    if not WAIT_IN_LOOP:
        pdl_enter(PDL)
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    iters = k_per_split // BLOCK_K
    x_next = tl.zeros((BLOCK_M, BLOCK_K), dtype=x_ptr.dtype.element_ty)
    for i in range(0, iters):
        k0 = k_start + i * BLOCK_K
        if TILED:
            ptr = w_tile + i * BLOCK_N * BLOCK_K
        else:
            ptr = w_rows + (k0 + offs_k)[None, :]
        if EVICT:
            w = tl.load(ptr, eviction_policy="evict_first")
        else:
            w = tl.load(ptr)
        if X_AHEAD:  # x of the next step loaded one step ahead, in registers
            tok = _wait_token(PDL)
            x0 = tl.load(x_rows + (k0 + offs_k)[None, :] + tok, mask=m_ok & (i == 0), other=0.0)
            x = x0 + x_next  # one of the two is zero
            x_next = tl.load(x_rows + (k0 + BLOCK_K + offs_k)[None, :] + tok,
                             mask=m_ok & (i + 1 < iters), other=0.0)
        elif WAIT_IN_LOOP:
            tok = _wait_token(PDL)
            x = tl.load(x_rows + (k0 + offs_k)[None, :] + tok, mask=m_ok, other=0.0)
        else:
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    _store_out(acc, out_ptr, pid_n, pid_k, M, N, BLOCK_M, BLOCK_N, PARTIAL, SWIGLU)


@triton.jit
def _gemm_regpipe_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PARTIAL: tl.constexpr, SWIGLU: tl.constexpr, DEPTH: tl.constexpr,
                         PREWAIT: tl.constexpr, PDL: tl.constexpr):
    """Weights double-buffered in registers by hand (DEPTH tiles ahead), the first ones loaded
    before the PDL wait (they do not depend on the previous kernel)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    x_rows = x_ptr + offs_m[:, None] * K
    w_rows = w_ptr + offs_n[:, None] * K + k_start + offs_k[None, :]
    iters = k_per_split // BLOCK_K
    if not PREWAIT:
        pdl_enter(PDL)
    w0 = tl.load(w_rows)
    if DEPTH == 2:
        w1 = tl.load(w_rows + BLOCK_K)
    if PREWAIT:
        pdl_enter(PDL)
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, iters):
        cur = w0
        if DEPTH == 2:
            w0 = w1
            w1 = tl.load(w_rows + (i + 2) * BLOCK_K, mask=i + 2 < iters, other=0.0)
        else:
            w0 = tl.load(w_rows + (i + 1) * BLOCK_K, mask=i + 1 < iters, other=0.0)
        x = tl.load(x_rows + (k_start + i * BLOCK_K + offs_k)[None, :], mask=m_ok, other=0.0)
        acc += tl.dot(x, tl.trans(cur))
    _store_out(acc, out_ptr, pid_n, pid_k, M, N, BLOCK_M, BLOCK_N, PARTIAL, SWIGLU)


# name -> options of the probe kernels; "engine" is the engine's own launch (dflash.engine.cuda.layer._gemm)
VARIANTS = {
    "engine": None,
    "tiled": dict(tiled=True), "evict": dict(evict=True), "tiled+evict": dict(tiled=True, evict=True),
    "reg1": dict(depth=1), "reg1+prewait": dict(depth=1, prewait=True),
    "reg2": dict(depth=2), "reg2+prewait": dict(depth=2, prewait=True),
    "waitloop": dict(wait_in_loop=True), "waitloop+1": dict(wait_in_loop=True, stages=1),
    "waitloop+2": dict(wait_in_loop=True, stages=2),
    "x-ahead": dict(wait_in_loop=True, x_ahead=True),
    "x-ahead+1": dict(wait_in_loop=True, x_ahead=True, stages=1),
    "x-ahead-1": dict(wait_in_loop=True, x_ahead=True, stages=-1),
}


def tile_layout(w, bn, bk, split):
    n, k = w.shape
    return (w.view(n // bn, bn, split, k // (split * bk), bk).permute(0, 2, 3, 1, 4)
            .contiguous().view(n, k))


def build(tiled):
    dev = torch.device("cuda")
    torch.manual_seed(0)  # the same weights in both layouts
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, n, k in SHAPES:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            bn, bk, split, _, _ = config_for(n, k)
            layer[name] = tile_layout(w, bn, bk, split) if tiled else w
        layers.append(layer)
    return layers


def chain(weights, x_in, m, label):
    """One AR step's GEMMs (layers of ``weights``) launched as variant ``label``."""
    opt = VARIANTS[label]
    layers = weights[bool(opt and opt.get("tiled"))]
    pdl = use_pdl(x_in["qkv"].device)
    outs = []
    for layer in layers:
        for name, n, k in SHAPES:
            partial, swiglu = name in ("o", "down"), name == "gate_up"
            x, w = x_in[name], layer[name]
            if opt is None:
                outs.append(_gemm(x, w, swiglu=swiglu, partial=partial))
                continue
            bn, bk, split, warps, stages = config_for(n, k)
            split = split if partial else 1  # as in _gemm
            if partial:
                out = torch.empty((split, m, n), device="cuda", dtype=torch.float32)
            else:
                out = torch.empty((m, n // 2 if swiglu else n), device="cuda", dtype=torch.bfloat16)
            args = (x, w, out, m, n, k, k // split)
            common = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, PARTIAL=partial, SWIGLU=swiglu,
                          PDL=pdl, num_warps=warps, **pdl_opts(pdl))
            if "depth" in opt:
                _gemm_regpipe_kernel[(n // bn, split)](*args, DEPTH=opt["depth"],
                                                       PREWAIT=opt.get("prewait", False),
                                                       num_stages=1, **common)
            else:
                _gemm_kernel[(n // bn, split)](
                    *args, SPLIT=split, TILED=opt.get("tiled", False), EVICT=opt.get("evict", False),
                    WAIT_IN_LOOP=opt.get("wait_in_loop", False), X_AHEAD=opt.get("x_ahead", False),
                    num_stages=stages + opt.get("stages", 0), **common)
            outs.append(out)
    return outs


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="gemm_chain_probe.json")
    p.add_argument("--variants", default="engine,tiled,reg2+prewait,waitloop,x-ahead",
                   help="comma list of: " + ",".join(VARIANTS))
    args = p.parse_args()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    nbytes = LAYERS * sum(n * k * 2 for _, n, k in SHAPES)
    floor = nbytes / bw * 1e3
    print(f"copy {bw / 1e12:.3f} TB/s; {nbytes / 1e9:.2f} GB of layer weights; floor {floor:.3f} ms",
          flush=True)
    weights = {False: build(False)}
    if any(VARIANTS[v] and VARIANTS[v].get("tiled") for v in chosen):
        weights[True] = build(True)
    one = {tiled: layers[:1] for tiled, layers in weights.items()}
    # every variant computes the engine's products bitwise (same tiles, same order)
    for m in (1, 16):
        x_in = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for name, n, k in SHAPES}
        ref = chain(one, x_in, m, "engine")
        for label in chosen:
            got = chain(one, x_in, m, label)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got))
            print(f"check M={m} {label}: max |diff| {diff:.3g}", flush=True)
    graphs = {}
    for m in (1, 16):
        x_in = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for name, n, k in SHAPES}
        for label in chosen:
            graphs[(label, m)] = graph_of(lambda: chain(weights, x_in, m, label))
    results = {label: {1: [], 16: []} for label in chosen}
    for _ in range(args.rounds):  # alternated, so drift hits every variant alike
        for m in (1, 16):
            for label in chosen:
                results[label][m].append(time_ms(graphs[(label, m)].replay, dev, args.iters))
    print(f"\n{'variant':16s} {'M=1 ms (runs)':34s} {'rate':>9s} {'M=16 ms':>8s}")
    for label in chosen:
        t1 = statistics.median(results[label][1])
        t16 = statistics.median(results[label][16])
        runs = " ".join(f"{t:.3f}" for t in results[label][1])
        print(f"{label:16s} {t1:.3f} ({runs}) {nbytes / t1 / 1e9:7.2f} TB/s {t16:8.3f}")
    # where did the pipeliner put the wait? (the TTGIR of one wait-in-loop kernel)
    try:
        for kern in _gemm_kernel.device_caches[0][0].values():
            src = kern.asm.get("ttgir", "")
            if "griddepcontrol.wait; griddepcontrol" in src:
                lines = [line.strip()[:110] for line in src.splitlines() if any(
                    t in line for t in ("scf.for", "async_copy_global", "inline_asm", "tt.load",
                                        "async_wait"))]
                print("\n".join(lines[:24]))
                break
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        print("no TTGIR:", e)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "copy_Bps": bw, "bytes": nbytes,
                   "floor_ms": floor, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
