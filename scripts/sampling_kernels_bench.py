"""Micro-benchmark of the sampling cycle's Triton kernels (dflash/engine/cuda/sampling.py)
against the torch path of ``SamplingCycle``: see ``main``. GPU; on CPU under
TRITON_INTERPRET=1 with a small --vocab it runs each cell once."""
from __future__ import annotations

import argparse
import json
import time

import torch

from dflash.decoding import sampling as torch_sampling
from dflash.engine.cuda.sampling import (dense_accept, dense_propose, mode, new_rng, sparse_accept,
                                         sparse_law)


def main(argv=None) -> None:
    """``PYTHONPATH=. python scripts/sampling_kernels_bench.py [--vocab 151936] [--iters 200]``: microseconds
    per CUDA-graph replay of one cycle's sampling steps (draft law + proposals, target law,
    acceptance + residual; no model) for the kernels and for the torch path of
    SamplingCycle, b in 1, 4, 8, 16, bf16 logits; the unfiltered law at T = 1 over dense
    chunks, and T = 0.7 / top_p 0.9 / top_k 50 over stage-1 configs (NG, G). One JSON line
    per cell. On CPU (TRITON_INTERPRET=1, small --vocab) it runs each cell once, eagerly."""
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16
    gen = torch.Generator(dev).manual_seed(0)

    def timed(fn):
        if not cuda:
            fn()
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            graph.replay()
        torch.cuda.synchronize()
        return 1e6 * (time.perf_counter() - t0) / args.iters

    def torch_step(p_logits, q_logits, t, top_p, top_k):
        def law(x):
            if 0 < top_k < min(x.shape[-1], torch_sampling.TOPK_CANDIDATES_MAX + 1):
                return torch_sampling.sparse_filtered(x, t, top_p, top_k)
            return None, torch_sampling.filtered_probs(x, t, top_p, top_k)

        def step():
            b = p_logits.shape[0]
            q_ids = q = None
            props = torch.zeros(0, dtype=torch.int64, device=dev)
            if b > 1:
                q_ids, q = law(q_logits)
                props = torch_sampling.sample(q, gen, q_ids)
            p_ids, p = law(p_logits)
            if b == 1:
                q_ids, q = (None if p_ids is None else p_ids[:0]), p[:0]
            return torch_sampling.speculative_accept(props, q, p, gen, q_ids, p_ids)
        return step

    def kernel_step(p_logits, q_logits, t, top_p, top_k, rng, knob):
        def step():
            b = p_logits.shape[0]
            if mode(p_logits.shape[1], top_p, top_k) == "dense":
                props = lse = None
                if b > 1:
                    props, lse = dense_propose(q_logits, t, rng, chunk=knob)
                return dense_accept(p_logits, props, q_logits if b > 1 else None, lse, t, rng,
                                    chunk=knob)
            qi = qp = props = None
            if b > 1:
                qi, qp, props = sparse_law(q_logits, t, top_p, top_k, rng, config=knob)
            pi, pp, _ = sparse_law(p_logits, t, top_p, top_k, config=knob)
            return sparse_accept(props, qi, qp, pi, pp, rng)
        return step

    small = args.vocab < 4096
    settings = {"t1": ((1.0, 1.0, 0), [64, 256] if small else [2048, 4096, 8192]),
                "t0.7_p0.9_k50": ((0.7, 0.9, 50), [(64, 2)] if small else
                                  [(512, 16), (1024, 16), (256, 16), (512, 8), (1024, 8),
                                   (2048, 4)])}
    rng = new_rng(dev)
    rng[0] = 12345
    for name, ((t, top_p, top_k), knobs) in settings.items():
        for b in (1, 4, 8, 16):
            g = torch.Generator().manual_seed(b)
            p_logits = (torch.randn(b, args.vocab, generator=g) * 3).to(dev, dtype)
            q_logits = (torch.randn(max(b - 1, 1), args.vocab, generator=g) * 3).to(dev, dtype)
            q_logits = q_logits[:b - 1]
            row = {"setting": name, "b": b,
                   "torch_us": timed(torch_step(p_logits, q_logits, t, top_p, top_k))}
            for knob in knobs:
                row[f"kernels_us[{knob}]"] = timed(
                    kernel_step(p_logits, q_logits, t, top_p, top_k, rng, knob))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
