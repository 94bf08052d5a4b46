"""CUDA-graph capture of fixed-shape steps, and the fused (optionally compiled) layer math.

A decoding step is a pure function of its tensor inputs plus the static KV caches it writes,
so it can be captured once per input shape and replayed: one launch instead of hundreds, and
no Python between kernels. Graph outputs are static buffers, overwritten by the next replay
of the same graph; callers consume them before that.
"""
from __future__ import annotations

import sys

import torch

from ..model.ops import rms_norm, rope
from .cuda.kernels import linear
from .cuda.layer import gate_up_chunk, interleave_gate_up, layer_kernels_enabled
from .cuda.moe import MoEWeights


class _Captured:
    def __init__(self, fn, args, pool):
        self.inputs = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles, allocates workspaces)
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def run(self, args):
        for dst, src in zip(self.inputs, args):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphCache:
    """Calls ``fn(*tensors)`` through one CUDA graph per distinct input shape (or eagerly).

    The graphs of one cache share a memory pool that lives as long as the cache (a pool
    shared across engines outlives the graphs of a deleted engine and trips the allocator)."""

    def __init__(self, fn, enabled: bool):
        self.fn, self.enabled = fn, enabled
        self.graphs: dict = {}
        self._pool = None

    def __call__(self, *args):
        if not self.enabled or not args[0].is_cuda:  # CPU: same fixed-shape semantics, eagerly
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = self.graphs[key] = _Captured(self.fn, args, self._pool)
        return graph.run(args)


# ----------------------------------------------------------------------------- fused layer math
class FusedLayer:
    """One decoder layer's weights, with q/k/v and gate/up concatenated into single GEMMs.

    An MoE layer (``moe``: its ``cuda.moe.MoEWeights``) keeps the attention weights only; its
    MLP runs through ``moe``, and ``wgu`` / ``wd`` are None."""

    def __init__(self, layer, n_heads, n_kv, head_dim):
        attn, mlp = layer.self_attn, layer.mlp
        self.sizes = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
        self.wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.bqkv = torch.cat(biases).detach() if biases[0] is not None else None
        self.wo = attn.o_proj.weight.detach()
        self.bo = attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None
        self.qn = attn.q_norm.weight.detach() if getattr(attn, "q_norm", None) is not None else None
        self.kn = attn.k_norm.weight.detach() if getattr(attn, "k_norm", None) is not None else None
        self.ln1 = layer.input_layernorm.weight.detach()
        self.ln2 = layer.post_attention_layernorm.weight.detach()
        self.moe = None if hasattr(mlp, "gate_proj") else MoEWeights.from_block(mlp)
        self.wgu = self.wd = self.gu_chunk = None
        if self.moe is not None:
            return
        self.wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        self.wd = mlp.down_proj.weight.detach()
        # The layer kernels' SwiGLU epilogue wants gate and up rows interleaved in chunks.
        self.gu_chunk = gate_up_chunk(self) if layer_kernels_enabled() else None
        if self.gu_chunk:
            self.wgu = interleave_gate_up(self.wgu, self.gu_chunk)


def fusable_mlp(mlp) -> bool:
    """Whether ``FusedLayer`` runs this MLP: a bias-free SwiGLU (gate/up/down) or an MoE
    block that ``MoEWeights`` implements."""
    if hasattr(mlp, "gate_proj"):
        return all(getattr(mlp, n).bias is None for n in ("gate_proj", "up_proj", "down_proj"))
    return MoEWeights.from_block(mlp) is not None


def pre_attention(h, cos, sin, ln1, wqkv, bqkv, qn, kn, *, sizes, n_heads, n_kv, head_dim, eps):
    """Norm, fused q/k/v projection, per-head q/k norms, rotary -> q, k [1,h,T,D], v."""
    t = h.shape[1]
    qkv = linear(rms_norm(h, ln1, eps), wqkv, bqkv)
    q, k, v = qkv.split(sizes, dim=-1)
    q = q.view(1, t, n_heads, head_dim)
    k = k.view(1, t, n_kv, head_dim)
    if qn is not None:
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    q = rope(q.transpose(1, 2), cos, sin)
    k = rope(k.transpose(1, 2), cos, sin)
    return q, k, v.view(1, t, n_kv, head_dim).transpose(1, 2)


def post_attention(h, attn_out, wo, ln2, wgu, wd, *, eps, gu_chunk=None, bo=None):
    """Output projection of attn_out [1, T, H*D] + residual, norm, fused SwiGLU MLP + residual.

    ``gu_chunk``: wgu's gate/up rows are interleaved in chunks of this many (FusedLayer).
    ``bo``: the output projection's bias (GPT-OSS)."""
    h, x = attention_residual(h, attn_out, wo, ln2, eps=eps, bo=bo)
    gu = linear(x, wgu)
    if gu_chunk:
        gu = gu.unflatten(-1, (-1, 2, gu_chunk))
        gate, up = gu[..., 0, :].flatten(-2), gu[..., 1, :].flatten(-2)
    else:
        gate, up = gu.chunk(2, dim=-1)
    return h + linear(torch.nn.functional.silu(gate) * up, wd)


def attention_residual(h, attn_out, wo, ln2, *, eps, bo=None):
    """(h + attn_out @ wo^T (+ bo), its post-attention norm): the MLP's residual and input."""
    h = h + linear(attn_out, wo, bo)
    return h, rms_norm(h, ln2, eps)


def draft_context_kv(features, cos, sin, fc_w, norm_w, wkv, kn, *, n_kv, head_dim, eps):
    """Draft conditioning: target features [1, T, n_f*H] -> per layer (k, v) [1, kv, T, D].

    ``wkv``/``kn``: per draft layer, the concatenated k/v projection and the k-norm weight."""
    t = features.shape[1]
    ctx = rms_norm(linear(features, fc_w), norm_w, eps)
    out = []
    for w, knorm in zip(wkv, kn):
        k, v = linear(ctx, w).view(1, t, 2 * n_kv, head_dim).split(n_kv, dim=2)
        k = rope(rms_norm(k, knorm, eps).transpose(1, 2), cos, sin)
        out.append((k, v.transpose(1, 2)))
    return out


def maybe_compile(fn, enabled: bool):
    """torch.compile with dynamic token count; falls back to eager if compilation fails."""
    if not enabled:
        return fn
    compiled = torch.compile(fn, dynamic=True)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not stop a benchmark
            if state["fn"] is fn:
                raise
            print(f"note: torch.compile failed ({type(err).__name__}); running uncompiled",
                  file=sys.stderr)
            state["fn"] = fn
            return fn(*args, **kwargs)

    return call
