"""The target's forward pass over a preallocated (static) KV cache.

The target engine runs the Hugging Face model's own modules (norms, projections, MLPs, rotary
table) layer by layer, writing keys/values into fixed buffers at explicit positions. Because a
query at position p only sees cache slots <= p, rolling back a rejected suffix is free: the
stale slots are overwritten before anything can see them. Every forward is a pure function of
(token ids, positions) plus the cache, so on CUDA it can be captured once per shape as a CUDA
graph and replayed (see ``engine/graphs.py``); on CPU it runs eagerly, same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..model.ops import rope, rope_cos_sin
from .graphs import (FusedLayer, GraphCache, attention_residual, maybe_compile, post_attention,
                     pre_attention)
from .cuda.kernels import attention_supported, decode_attention, linear
from .cuda.layer import fused_layers, layer_kernels_enabled, layer_supported

_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def text_decoder(model):
    """The decoder stack (embed_tokens, layers, norm) of a causal LM; of a multimodal
    checkpoint, its text model."""
    inner = model.model if hasattr(model, "model") else model.base_model
    for name in ("language_model", "text_model"):
        if not hasattr(inner, "layers") and hasattr(inner, name):
            inner = getattr(inner, name)
    return inner


def decoder_parts(model):
    """(embed, layers, final_norm, lm_head, rotary) of an HF Qwen3/Llama-style causal LM.

    ``embed`` is the model's own embedding module (Gemma-style scaling included)."""
    inner = text_decoder(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else model.lm_head
    return (inner.embed_tokens, inner.layers, getattr(inner, "norm", None), head,
            getattr(inner, "rotary_emb", None))


def layer_windows(cfg, n_layers: int) -> list[int | None]:
    """Per layer, the sliding-window width (a query at p sees keys p - w < s <= p, HF's rule)
    or None for full attention, from ``layer_types`` + ``sliding_window`` as HF reads them
    (no ``layer_types`` but a ``sliding_window``: every layer slides, as HF's caches assume)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window:
        return [None] * n_layers
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:n_layers]]


class StaticTargetEngine:
    """Target forward over a static KV cache; returns logits and selected-layer features."""

    name = "static"

    def __init__(self, model, feature_layer_ids: list[int], capacity: int, *, fused: bool = False,
                 compile: bool = False, graphs: bool = False):
        self.model = model
        self.embed, self.layers, self.norm, self.lm_head, rotary = decoder_parts(model)
        cfg = text_config(model)
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.feature_layer_ids = list(feature_layer_ids)
        self._wanted = set(self.feature_layer_ids)
        # Layer id L-1's feature is the final-normed state (HF's hidden_states[L]), as the
        # reference takes hidden_states[id + 1].
        self._last = len(self.layers) - 1
        self.windows = layer_windows(cfg, len(self.layers))
        self.sliding = any(w is not None for w in self.windows)
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.capacity = capacity
        shape = (1, self.n_kv, capacity, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # The rotary table for every slot, computed once by the model's own rotary module.
        positions = torch.arange(capacity, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = rotary(probe, positions)
        if cos.shape[-1] * 2 == self.head_dim:  # GPT-OSS: half-width tables (same rotation)
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        self.cos, self.sin = cos[0], sin[0]
        # Attention sinks (GPT-OSS): a per-head logit in every softmax, attending to nothing.
        self.sinks = [getattr(l.self_attn, "sinks", None) for l in self.layers]
        self.slots = torch.arange(capacity, device=self.device)
        # Fast path (CUDA): fused GEMMs, compiled elementwise math, one CUDA graph per shape.
        self.fused = fused and getattr(cfg, "hidden_act", "silu") == "silu"
        if self.fused:
            self.fused_layers = [FusedLayer(l, self.n_heads, self.n_kv, self.head_dim)
                                 for l in self.layers]
            self._pre = maybe_compile(pre_attention, compile)
            self._post = maybe_compile(post_attention, compile)
            self._attn_res = maybe_compile(attention_residual, compile)
            self._chain_ok: dict = {}  # token count -> whether every layer runs in the chain
        self.graphs = graphs
        self._graphed = GraphCache(lambda ids, pos: self._forward(ids, pos, None), graphs)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                cache_slots: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None):
        """See ``_forward``. With graphs on, plain steps replay a CUDA graph per token count."""
        if self.graphs and cache_slots is None and kv_len is None:
            return self._graphed(input_ids, positions)
        return self._forward(input_ids, positions, kv_len, cache_slots, tree_mask)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                 cache_slots: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None):
        """input_ids [1, T] at ``positions`` [T] -> (logits [1, T, V], features [1, T, n_f*H]).

        ``kv_len`` (eager only) limits attention to the first kv_len slots; None (graph mode)
        attends over the whole buffer with a positional mask. For tree verification, tokens
        may share positions: ``cache_slots`` [T] (contiguous, ascending) says where their keys
        go, and ``tree_mask`` [T, T] (bool, True = may attend) which new tokens see each other;
        every slot before ``cache_slots[0]`` is committed context and visible to all.
        """
        whole_buffer = kv_len is None and cache_slots is None
        kv_len = self.capacity if kv_len is None else kv_len
        h = self.embed(input_ids)
        # Decode-sized graph steps: the whole layer in Triton kernels (dflash/layer_kernels.py).
        if self.fused and whole_buffer and layer_kernels_enabled() and self._chain(h[0]):
            x, captured = fused_layers(h[0], self.fused_layers, self.norm.weight, positions,
                                       positions, self.k_cache, self.v_cache, self.cos, self.sin,
                                       capture=self._wanted, n_heads=self.n_heads, n_kv=self.n_kv,
                                       head_dim=self.head_dim, eps=self.eps,
                                       windows=self.windows if self.sliding else None,
                                       sinks=self.sinks if any(
                                           s is not None for s in self.sinks) else None)
            feats = torch.cat([captured[l] for l in self.feature_layer_ids], dim=-1)
            return linear(x, self.lm_head.weight)[None], feats[None]
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        keys = self.slots[:kv_len]
        if cache_slots is None:
            cache_slots = positions
            mask = (keys[None, :] <= positions[:, None])[None, None]
            key_pos = keys
        else:
            mask = (keys[None, :] < cache_slots[0]).expand(len(cache_slots), -1).clone()
            rel = keys - cache_slots[0]
            inside = (rel >= 0) & (rel < len(cache_slots))
            mask[:, inside] = tree_mask[:, rel[inside]]
            mask = mask[None, None]
            key_pos = keys.clone()  # committed slots hold their own position, tree slots theirs
            key_pos[inside] = positions[rel[inside]]
        masks = {None: mask}
        for w in set(self.windows) - {None}:  # sliding layers: keys within the window only
            masks[w] = mask & (key_pos[None, :] > positions[:, None] - w)[None, None]
        captured = {}
        t = input_ids.shape[1]
        for i, layer in enumerate(self.layers):
            if self.fused:
                fl = self.fused_layers[i]
                q, k, v = self._pre(h, cos, sin, fl.ln1, fl.wqkv, fl.bqkv, fl.qn, fl.kn,
                                    sizes=fl.sizes, n_heads=self.n_heads, n_kv=self.n_kv,
                                    head_dim=self.head_dim, eps=self.eps)
            else:
                q, k, v = self._pre_attention_modules(layer, h, cos, sin)
            self.k_cache[i].index_copy_(2, cache_slots, k)
            self.v_cache[i].index_copy_(2, cache_slots, v)
            win = self.windows[i]
            if self.fused and whole_buffer and attention_supported(q, self.k_cache[i]):
                out = decode_attention(q, self.k_cache[i], self.v_cache[i], positions,
                                       window=win, sinks=self.sinks[i])
            elif self.sinks[i] is not None:
                out = _sink_attention(q, self.k_cache[i][:, :, :kv_len],
                                      self.v_cache[i][:, :, :kv_len], masks[win], self.sinks[i])
            elif self.fused and kv_len == t and q.is_cuda and win is None:
                # A fresh prompt: plain causal attention. cuDNN is skipped because it builds
                # a new plan (~70 ms) for every prompt length, which lands in TTFT.
                with sdpa_kernel(_PREFILL_BACKENDS):
                    out = F.scaled_dot_product_attention(
                        q, self.k_cache[i][:, :, :t], self.v_cache[i][:, :, :t], is_causal=True,
                        enable_gqa=self.n_heads != self.n_kv)
                out = out.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim)
            else:
                out = F.scaled_dot_product_attention(
                    q, self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len],
                    attn_mask=masks[win], enable_gqa=self.n_heads != self.n_kv)
                out = out.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim)
            if self.fused and self.fused_layers[i].moe is not None:
                fl = self.fused_layers[i]
                h, x = self._attn_res(h, out, fl.wo, fl.ln2, eps=self.eps, bo=fl.bo)
                h = h + self._moe(layer, fl.moe, x, whole_buffer)
            elif self.fused:
                fl = self.fused_layers[i]
                h = self._post(h, out, fl.wo, fl.ln2, fl.wgu, fl.wd, eps=self.eps,
                               gu_chunk=fl.gu_chunk, bo=fl.bo)
            else:
                attn = layer.self_attn
                h = h + attn.o_proj(out)
                mlp = layer.mlp(layer.post_attention_layernorm(h))
                h = h + (mlp[0] if isinstance(mlp, tuple) else mlp)  # MoE: (out, router scores)
            if i in self._wanted and i != self._last:
                captured[i] = h
        h = self.norm(h)
        if self._last in self._wanted:
            captured[self._last] = h
        logits = linear(h, self.lm_head.weight) if self.fused else self.lm_head(h)
        return logits, torch.cat([captured[l] for l in self.feature_layer_ids], dim=-1)

    def _chain(self, x: torch.Tensor) -> bool:
        """Whether every layer runs in the Triton layer chain at x's token count."""
        key = (x.shape[0], x.dtype, x.device.type)
        if key not in self._chain_ok:
            self._chain_ok[key] = all(layer_supported(fl, x, self.k_cache[0], self.cos)
                                      for fl in self.fused_layers)
        return self._chain_ok[key]

    @staticmethod
    def _moe(layer, moe, x, whole_buffer):
        """An MoE layer's MLP on its normed input x [1, T, H]: ``cuda.moe`` (capture-safe)
        for graph steps and off-GPU; the model's own block for eager CUDA steps (prefill, tree
        verify: any T, HF's numerics; its routing syncs with the host, no graph sees it)."""
        if whole_buffer or not x.is_cuda:
            return moe(x)
        out = layer.mlp(x)
        return out[0] if isinstance(out, tuple) else out

    def _pre_attention_modules(self, layer, h, cos, sin):
        """The model's own modules (exact HF numerics; used on CPU and by the tests)."""
        attn, t = layer.self_attn, h.shape[1]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, t, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(1, t, self.n_kv, self.head_dim)
        v = attn.v_proj(x).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy cached keys/values from slots ``src`` to ``dst`` (committing a tree path)."""
        for k, v in zip(self.k_cache, self.v_cache):
            k.index_copy_(2, dst, k.index_select(2, src))
            v.index_copy_(2, dst, v.index_select(2, src))


def _sink_attention(q, k, v, mask, sinks):
    """Softmax attention with one extra per-head logit (the sink) that takes probability mass
    but adds no value, as GPT-OSS's eager attention: q [1, H, T, D], k/v [1, Hkv, S, D], mask
    [1, 1, T, S] bool -> [1, T, H * D]."""
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(1, h, 1, 1).expand(1, h, t, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(1, t, h * d)
