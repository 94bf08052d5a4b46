"""``DraftEngine``: the draft's forward over a static cache of projected context keys/values.

The target's features are projected once per position into every layer's key/value cache
(``append_context``); a block ``[last, MASK...]`` then attends over that cache plus itself
(``propose_logits``). Fused math and CUDA graphs as for the target (``engine/graphs.py``).

Every draft variant the reference runs is computed here: per-layer causal/windowed masks,
any ``hidden_act``, ``input_embedding_scale``, ``output_multiplier`` and softcapping. A
variant a fast path cannot do goes to the generic path of this engine (still exact): the
Triton layer chain and the decode-attention kernel need full-attention layers, the fused
SwiGLU math needs ``silu`` and no attention biases.

DFlash 2 drafts (``draft.is_dflash2``): the dynamic convolutions run on every path but the
Triton layer chain (which does not have them yet); proposals are the candidate selector's
walk over the final-normed block states (``propose_tokens``, ``_propose_greedy``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model.draft import DFlashDraft, kind_mask
from ..model.ops import rms_norm, rope, rope_cos_sin
from .cuda.dflash2 import chain_convs, dynamic_conv, select_walk, topk
from .cuda.kernels import attention_supported, decode_attention, linear
from .cuda.layer import dflash2_chain_supported, fused_layers, layer_kernels_enabled, layer_supported
from .graphs import FusedLayer, GraphCache, draft_context_kv, maybe_compile, post_attention, pre_attention


class DraftEngine:
    """Draft forward over a static cache of projected context keys/values."""

    def __init__(self, draft: DFlashDraft, embed, lm_head, capacity: int, *,
                 fused: bool = False, compile: bool = False, graphs: bool = False):
        self.draft, self.embed, self.lm_head = draft, embed, lm_head
        cfg = draft.config
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                  cfg.head_dim)
        if draft.rope_limit is not None and capacity > draft.rope_limit:
            raise UserError(f"the draft's rope type is reproduced for sequences up to "
                            f"{draft.rope_limit} positions only (HF rescales it beyond); this run "
                            f"needs up to {capacity}", "use shorter prompts or max-new-tokens")
        self.kinds = draft.attention_kinds
        # The fused layer math does SwiGLU without biases; other drafts run the modules.
        fused = fused and cfg.hidden_act == "silu" and not cfg.attention_bias
        self.fused = fused
        if fused:
            self.fused_layers = [FusedLayer(l, self.n_heads, self.n_kv, self.head_dim)
                                 for l in draft.layers]
            self._pre = maybe_compile(pre_attention, compile)
            self._post = maybe_compile(post_attention, compile)
            self._ctx_kv = maybe_compile(draft_context_kv, compile)
            attns = [l.self_attn for l in draft.layers]
            self._wkv = [torch.cat([a.k_proj.weight, a.v_proj.weight]).detach() for a in attns]
            self._kn = [a.k_norm.weight.detach() for a in attns]
            self._fused_ctx = not cfg.attention_bias
        self.graphs = graphs
        self._graphed_append = GraphCache(self._append_context, graphs)
        self._graphed_propose = GraphCache(lambda ids, pos: self._propose_logits(ids, pos, None),
                                           graphs)
        self._graphed_states = GraphCache(lambda ids, pos: self._propose_states(ids, pos, None),
                                          graphs)
        self._graphed_greedy = GraphCache(lambda ids, pos: self._propose_greedy(ids, pos, None),
                                          graphs)
        self.selector = draft.candidate_selector  # None: DFlash 1 (proposals from the logits)
        self.device, self.dtype = draft.device, draft.dtype
        self.capacity = capacity
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in draft.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in draft.layers]
        positions = torch.arange(capacity, device=self.device)
        self.cos, self.sin = rope_cos_sin(draft.inv_freq, positions, self.dtype,
                                          draft.attention_scaling)
        self.slots = positions

    def append_context(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        """Project target features [1, n, n_f*H] at ``positions`` [n] into every layer's cache."""
        if self.graphs and features.shape[1] <= 64:  # per-cycle appends; the prompt runs eagerly
            self._graphed_append(features, positions)
        else:
            self._append_context(features, positions)

    def propose_logits(self, block_ids: torch.Tensor, positions: torch.Tensor,
                       kv_len: int | None = None) -> torch.Tensor:
        """Block ``[last, MASK...]`` [1, b] at ``positions`` [b] -> logits [1, b-1, V]."""
        if self.graphs and kv_len is None:
            return self._graphed_propose(block_ids, positions)
        return self._propose_logits(block_ids, positions, kv_len)

    def _propose_greedy(self, block_ids: torch.Tensor, positions: torch.Tensor,
                        kv_len: int | None = None) -> torch.Tensor:
        """Greedy proposals [t-1] for the block (device ops only: the whole-cycle graph of
        ``decoding/fused_cycle.py`` captures it). DFlash 2: the selector's greedy walk."""
        if self.selector is None:
            return self._propose_logits(block_ids, positions, kv_len)[0].argmax(dim=-1)
        h, logits = self._propose_states(block_ids, positions, kv_len)
        return self.selector.propose(h[0], logits[0], block_ids[0, :1], 0.0, walk=select_walk,
                                     topk=topk)[0]

    def propose_tokens(self, block_ids: torch.Tensor, positions: torch.Tensor,
                       kv_len: int | None = None, temperature: float = 0.0, generator=None,
                       probs=None):
        """Proposals for the block: (tokens [t-1], q, candidate ids [t-1, k] or None).

        DFlash 1: q = ``probs(logits)`` [t-1, V] (the caller's filtered draft distribution;
        None when greedy), candidates None. DFlash 2: q [t-1, k] is the selector's (unfiltered,
        as the reference) distribution over the candidate ids at each position, given the
        proposals before it (``probs`` unused)."""
        if self.selector is None:
            logits = self.propose_logits(block_ids, positions, kv_len)[0]
            if temperature <= 0:
                return logits.argmax(dim=-1), None, None
            q = probs(logits)
            return torch.multinomial(q, 1, generator=generator).squeeze(-1), q, None
        if temperature <= 0 and self.graphs and kv_len is None:
            return self._graphed_greedy(block_ids, positions), None, None
        if self.graphs and kv_len is None:
            h, logits = self._graphed_states(block_ids, positions)
        else:
            h, logits = self._propose_states(block_ids, positions, kv_len)
        tokens, cand, q = self.selector.propose(h[0], logits[0], block_ids[0, :1], temperature,
                                                generator=generator, walk=select_walk, topk=topk)
        return tokens, q, cand

    def _append_context(self, features: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.cos[positions], self.sin[positions]
        if self.fused and self._fused_ctx:
            d = self.draft
            kvs = self._ctx_kv(features.to(self.dtype), cos, sin, d.fc.weight, d.hidden_norm.weight,
                               self._wkv, self._kn, n_kv=self.n_kv, head_dim=self.head_dim,
                               eps=self.eps)
            for i, (k, v) in enumerate(kvs):
                self.k_cache[i].index_copy_(2, positions, k)
                self.v_cache[i].index_copy_(2, positions, v)
            return
        ctx = self.draft.project_context(features.to(self.dtype))
        for i, layer in enumerate(self.draft.layers):
            k, v = layer.self_attn.project_kv(ctx, cos, sin)
            self.k_cache[i].index_copy_(2, positions, k)
            self.v_cache[i].index_copy_(2, positions, v)

    def _layer_masks(self, positions: torch.Tensor, kv_len: int | None):
        """Per layer: the mask over the keys attended ([1, 1, t, keys] bool or None) and whether
        the layer is full attention. Graph mode (``kv_len`` None) attends over the whole buffer
        with the slots past the block masked."""
        base = None if kv_len is not None else (self.slots <= positions[-1])[None, None, None]
        k_pos = self.slots if kv_len is None else self.slots[:kv_len]
        made, out = {}, []
        for kind in self.kinds:
            if kind not in made:
                m = kind_mask(positions, k_pos, *kind)
                made[kind] = base if m is None else (m[None, None] if base is None
                                                     else m[None, None] & base)
            out.append((made[kind], kind == (False, None)))
        return out

    def _propose_logits(self, block_ids: torch.Tensor, positions: torch.Tensor,
                        kv_len: int | None = None) -> torch.Tensor:
        return self._propose_states(block_ids, positions, kv_len)[1]

    def _propose_states(self, block_ids: torch.Tensor, positions: torch.Tensor,
                        kv_len: int | None = None):
        """(final-normed states [1, t-1, H] in the head's dtype or None, logits [1, t-1, V])."""
        h = self.draft.embed_block(self.embed, block_ids).to(self.dtype)
        t = block_ids.shape[1]
        # graph mode (whole buffer): every query sees the whole block
        lim = positions[-1:].expand(t).contiguous() if kv_len is None else None
        # Decode-sized graph steps: the whole layer in Triton kernels (dflash/layer_kernels.py),
        # for full-attention drafts (its attention has one limit per query, no window).
        # DFlash 2: the chain with each layer's dynamic convs (None for DFlash 1).
        convs = chain_convs(self.draft)
        if (self.fused and lim is not None and self.draft.full_attention
                and (convs is None or dflash2_chain_supported(convs, h[0]))
                and layer_kernels_enabled()
                and layer_supported(self.fused_layers[0], h[0], self.k_cache[0], self.cos)):
            x, _ = fused_layers(h[0], self.fused_layers, self.draft.norm.weight, positions, lim,
                                self.k_cache, self.v_cache, self.cos, self.sin,
                                n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim,
                                eps=self.eps, convs=convs)
            x = x[1:].to(self.lm_head.weight.dtype)
            logits = linear(x, self.lm_head.weight, self.lm_head.bias)[None]
            return (None if convs is None else x[None]), self.draft.finish_logits(logits)
        cos, sin = self.cos[positions], self.sin[positions]
        masks = self._layer_masks(positions, kv_len)
        if kv_len is None:  # positional mask over the whole buffer
            kv_len = self.capacity
        for i, layer in enumerate(self.draft.layers):
            attn = layer.self_attn
            mask, full = masks[i]
            conv = layer.attention_conv  # DFlash 2 (else None)
            if self.fused and conv is not None:
                fl = self.fused_layers[i]
                x, kernel = conv.prepare(rms_norm(h, fl.ln1, self.eps), conv=dynamic_conv)
                q, k, v = _fused_qkv(x, cos[None, None], sin[None, None], fl, self.n_heads,
                                     self.n_kv, self.head_dim, self.eps)
            elif self.fused:
                fl = self.fused_layers[i]
                q, k, v = self._pre(h, cos[None, None], sin[None, None], fl.ln1, fl.wqkv, fl.bqkv,
                                    fl.qn, fl.kn, sizes=fl.sizes, n_heads=self.n_heads,
                                    n_kv=self.n_kv, head_dim=self.head_dim, eps=self.eps)
            else:
                x = layer.input_layernorm(h)
                if conv is not None:
                    x, kernel = conv.prepare(x, conv=dynamic_conv)
                q = attn.project_q(x, cos, sin)
                k, v = attn.project_kv(x, cos, sin)
            self.k_cache[i].index_copy_(2, positions, k)
            self.v_cache[i].index_copy_(2, positions, v)
            keys, values = self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len]
            if self.fused:
                if lim is not None and full and attention_supported(q, self.k_cache[i]):
                    out = decode_attention(q, self.k_cache[i], self.v_cache[i], lim)
                else:
                    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                         enable_gqa=self.n_heads != self.n_kv)
                    out = out.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim)
                if conv is not None:
                    h = _fused_post2(h, out, kernel, fl, layer, self.eps)
                else:
                    h = self._post(h, out, fl.wo, fl.ln2, fl.wgu, fl.wd, eps=self.eps,
                                   gu_chunk=fl.gu_chunk)
            elif conv is not None:
                h = h + conv.finish(attn.attend(q, keys, values, mask), kernel, conv=dynamic_conv)
                x, kernel = layer.mlp_conv.prepare(layer.post_attention_layernorm(h),
                                                   conv=dynamic_conv)
                h = h + layer.mlp_conv.finish(layer.mlp(x), kernel, conv=dynamic_conv)
            else:
                h = h + attn.attend(q, keys, values, mask)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.draft.norm(h[:, 1:])
        h = h.to(self.lm_head.weight.dtype)
        logits = linear(h, self.lm_head.weight, self.lm_head.bias) if self.fused \
            else self.lm_head(h)
        return h, self.draft.finish_logits(logits)


# --- DFlash 2 on the fused path: graphs.py's pre/post-attention math with the dynamic convs
# between the norms and the projections (the conv needs the normed input, which those fuse).
def _fused_qkv(x, cos, sin, fl, n_heads, n_kv, head_dim, eps):
    """Normed (and convolved) x [1, T, H] -> q, k [1, h, T, D] (normed, rotated), v."""
    t = x.shape[1]
    q, k, v = linear(x, fl.wqkv, fl.bqkv).split(fl.sizes, dim=-1)
    q, k = q.view(1, t, n_heads, head_dim), k.view(1, t, n_kv, head_dim)
    if fl.qn is not None:
        q, k = rms_norm(q, fl.qn, eps), rms_norm(k, fl.kn, eps)
    return (rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin),
            v.view(1, t, n_kv, head_dim).transpose(1, 2))


def _fused_post2(h, attn_out, kernel, fl, layer, eps):
    """o_proj + attention_conv.finish + residual, norm + mlp_conv around the SwiGLU + residual."""
    h = h + layer.attention_conv.finish(linear(attn_out, fl.wo), kernel, conv=dynamic_conv)
    x, kernel = layer.mlp_conv.prepare(rms_norm(h, fl.ln2, eps), conv=dynamic_conv)
    gu = linear(x, fl.wgu)
    if fl.gu_chunk:  # interleaved gate/up rows (FusedLayer)
        gu = gu.unflatten(-1, (-1, 2, fl.gu_chunk))
        gate, up = gu[..., 0, :].flatten(-2), gu[..., 1, :].flatten(-2)
    else:
        gate, up = gu.chunk(2, dim=-1)
    return h + layer.mlp_conv.finish(linear(F.silu(gate) * up, fl.wd), kernel, conv=dynamic_conv)
