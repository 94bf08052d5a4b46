"""Leaner eager engines for CPU decoding (measured with ``scripts/cpu_cycle_profile.py``).

``CpuDraftEngine`` (what ``SpeculativeDecoder`` uses for a float32 draft with the static
engine on CPU). The draft's forward is pure speculative overhead: 4 layers at 16 block
tokens whose GEMMs are compute-bound, plus a few hundred small ops that each cost a fixed
dispatch. It computes what ``DraftEngine`` computes (same layers, block and cache
semantics; on some processors even the same bits, which nothing relies on), with fewer, faster kernels:

- weights pre-transposed to [in, out] (``x @ w_t``: MKL's faster layout for these skinny
  GEMMs), q/k/v and gate/up concatenated into one GEMM each;
- q and k heads normed and rotated in one pass (per-head norm weights stacked);
- a context append projects the keys/values of *all* layers with one GEMM, norms and
  rotates them together, and writes them with one copy per cache into stacked
  [layers, kv_heads, capacity, head_dim] buffers (``k_cache[i]`` stay views of layer i);
- the block's logits use a pre-transposed copy of the (shared) LM head.

Draft variants (causal/windowed layers, other activations, embedding scale, logit multiplier
and softcapping) are computed here as in ``DraftEngine``; so are DFlash 2's dynamic
convolutions (through the layer's conv modules).

Used for float32 drafts (``SpeculativeDecoder`` with the static engine on CPU): with
bfloat16/float16 weights ``x @ w_t`` is an order of magnitude slower than ``F.linear`` here.
Only the draft changes: its proposals may differ from ``DraftEngine``'s by float rounding,
which can move acceptance but never the output (the target verifies every token). The
target engine and the autoregressive baseline are untouched.

"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.draft import DFlashDraft
from ..model.ops import rms_norm, rope
from .cuda.dflash2 import dynamic_conv
from .draft import DraftEngine


class CpuDraftEngine(DraftEngine):
    """``DraftEngine`` for eager (non-graph) CPU runs; see the module docstring."""

    # It keeps transposed copies of the draft's weights and of the LM head: only for drafts
    # (plus head) up to this many parameters (256 MB in float32), e.g. the embedded pair.
    MAX_COPIED_PARAMS = 64_000_000

    @classmethod
    def suits(cls, draft: DFlashDraft, lm_head, device: torch.device) -> bool:
        """Use this engine for ``draft``? CPU, float32, small enough to copy."""
        n = sum(p.numel() for p in draft.parameters()) + lm_head.weight.numel()
        return device.type == "cpu" and draft.dtype == torch.float32 \
            and n <= cls.MAX_COPIED_PARAMS

    def __init__(self, draft: DFlashDraft, embed, lm_head, capacity: int):
        super().__init__(draft, embed, lm_head, capacity)
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        layers = list(draft.layers)
        self.n_layers = len(layers)
        # Stacked caches; the per-layer lists keep DraftEngine's [1, kv, capacity, D] views.
        shape = (self.n_layers, nkv, capacity, d)
        self.k_all = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_all = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.k_cache = [self.k_all[i][None] for i in range(self.n_layers)]
        self.v_cache = [self.v_all[i][None] for i in range(self.n_layers)]

        def t(w):
            return w.detach().t().contiguous()

        def cat_bias(*mods):
            return (torch.cat([m.bias.detach() for m in mods])
                    if mods[0].bias is not None else None)

        self.fc_t = t(draft.fc.weight)
        self.hidden_norm_w = draft.hidden_norm.weight.detach()
        # Context keys/values of every layer in one GEMM: columns [layer][k | v][kv*D].
        kv_mods = [m for l in layers for m in (l.self_attn.k_proj, l.self_attn.v_proj)]
        self.ctx_kv_t = torch.cat([m.weight.detach() for m in kv_mods]).t().contiguous()
        self.ctx_kv_b = cat_bias(*kv_mods)
        self.k_norm_all = torch.stack([l.self_attn.k_norm.weight.detach() for l in layers])[:, None]
        self.layer_w = []
        for l in layers:
            a, m = l.self_attn, l.mlp
            self.layer_w.append(dict(
                ln1=l.input_layernorm.weight.detach(),
                qkv_t=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
                .t().contiguous(),
                qkv_b=cat_bias(a.q_proj, a.k_proj, a.v_proj),
                # per-head norm weights of the q heads then the k heads: [nh + nkv, D]
                qk_norm=torch.cat([a.q_norm.weight.detach().expand(nh, d),
                                   a.k_norm.weight.detach().expand(nkv, d)]).contiguous(),
                o_t=t(a.o_proj.weight), o_b=a.o_proj.bias,
                ln2=l.post_attention_layernorm.weight.detach(),
                gu_t=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().t().contiguous(),
                down_t=t(m.down_proj.weight),
            ))
        self.acts = [l.mlp.act_fn for l in layers]
        self.convs = [(l.attention_conv, l.mlp_conv) for l in layers]  # DFlash 2, else None
        self.norm_w = draft.norm.weight.detach()
        self.lm_head_t = t(lm_head.weight)
        self.lm_head_b = lm_head.bias

    @staticmethod
    def _mm(x, w_t, b=None):
        y = x @ w_t
        return y if b is None else y + b

    def _append_context(self, features: torch.Tensor, positions: torch.Tensor):
        n, L, nkv, d = features.shape[1], self.n_layers, self.n_kv, self.head_dim
        ctx = rms_norm(self._mm(features[0].to(self.dtype), self.fc_t), self.hidden_norm_w,
                       self.eps, keep_float64=True)
        kv = self._mm(ctx, self.ctx_kv_t, self.ctx_kv_b).view(n, L, 2, nkv, d)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        k = rope(rms_norm(kv[:, :, 0], self.k_norm_all, self.eps, keep_float64=True),
                 cos, sin)  # [n, L, kv, D]
        self.k_all.index_copy_(2, positions, k.permute(1, 2, 0, 3))
        self.v_all.index_copy_(2, positions, kv[:, :, 1].permute(1, 2, 0, 3))

    def _propose_states(self, block_ids: torch.Tensor, positions: torch.Tensor,
                        kv_len: int | None = None):
        if kv_len is None:  # graph-mode semantics (whole buffer + mask): the generic path
            return super()._propose_states(block_ids, positions, kv_len)
        nh, nkv, d, eps = self.n_heads, self.n_kv, self.head_dim, self.eps
        b = block_ids.shape[1]
        h = self.draft.embed_block(self.embed, block_ids[0])  # [b, H]
        if h.dtype != self.dtype:
            h = h.to(self.dtype)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [b, 1, D]
        gqa = nh != nkv
        masks = self._layer_masks(positions, kv_len)
        for i, w in enumerate(self.layer_w):
            a_conv, m_conv = self.convs[i]
            x = rms_norm(h, w["ln1"], eps, keep_float64=True)
            if a_conv is not None:
                x, kernel = a_conv.prepare(x, conv=dynamic_conv)
            qkv = self._mm(x, w["qkv_t"], w["qkv_b"])
            qk = rope(rms_norm(qkv[:, :(nh + nkv) * d].view(b, nh + nkv, d), w["qk_norm"], eps,
                               keep_float64=True),
                       cos, sin).transpose(0, 1)  # [nh + nkv, b, D]
            v = qkv[:, (nh + nkv) * d:].view(b, nkv, d).transpose(0, 1)
            self.k_all[i].index_copy_(1, positions, qk[nh:])
            self.v_all[i].index_copy_(1, positions, v)
            out = F.scaled_dot_product_attention(
                qk[None, :nh], self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len],
                attn_mask=masks[i][0], enable_gqa=gqa)  # [1, nh, b, D]
            o = self._mm(out[0].transpose(0, 1).reshape(b, nh * d), w["o_t"], w["o_b"])
            if a_conv is not None:
                o = a_conv.finish(o, kernel, conv=dynamic_conv)
            h = h + o
            x = rms_norm(h, w["ln2"], eps, keep_float64=True)
            if m_conv is not None:
                x, kernel = m_conv.prepare(x, conv=dynamic_conv)
            gate, up = self._mm(x, w["gu_t"]).chunk(2, dim=-1)
            m = (self.acts[i](gate) * up) @ w["down_t"]
            h = h + (m if m_conv is None else m_conv.finish(m, kernel, conv=dynamic_conv))
        h = rms_norm(h[1:], self.norm_w, eps, keep_float64=True)
        if h.dtype != self.lm_head_t.dtype:
            h = h.to(self.lm_head_t.dtype)
        logits = self.draft.finish_logits(self._mm(h, self.lm_head_t, self.lm_head_b)[None])
        return h[None], logits
