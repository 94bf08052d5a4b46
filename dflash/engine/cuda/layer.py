"""A decoder layer in nine Triton kernels, for decode-sized steps (<= 16 tokens) on CUDA.

At batch 1 a layer is a read of its weights plus a chain of tiny dependent kernels; each
kernel boundary costs a few microseconds of ramp-up and drain that no bandwidth can hide.
The unfused layer (``graphs.pre_attention`` / ``post_attention``) launches ~14 kernels; this
one launches 9, keeping the tuned skinny GEMM main loop (dflash/kernels.py) untouched and
folding the small steps into the kernels around it:

    qkv  = x1 @ Wqkv                         x1 = norm(h; ln1), made by the previous kernel
    q    = rope(norm(q)); cache <- k, v      one kernel: head norms, rotary, cache writes
    attn = decode_attention(q, cache)        two kernels (dflash/kernels.py)
    h    = h + attn @ Wo;  x2 = norm(h; ln2)  GEMM partials + one residual/norm kernel
    a    = silu(x2 @ Wg) * (x2 @ Wu)         one GEMM over interleaved gate/up rows, SwiGLU
                                             in the epilogue
    h    = h + a @ Wd;  x1' = norm(h; ln1')  GEMM partials + residual/norm (next layer's norm,
                                             or the final norm after the last layer)

Every row's arithmetic is independent of the other rows (16-row M tile, per-row norms, GEMM
configs by (N, K) only), so a token rounds the same in an AR step and in a verified block.
On Hopper the kernels use programmatic dependent launch (``kernels.use_pdl``).

A DFlash 2 draft layer (``fused_layers(convs=...)``) adds its two dynamic convs: after each
norm, the kernel projection GEMM and the "prepare" conv (2 launches each); the "finish" convs
are folded into the two residual/norm kernels, so 13 launches instead of 9. DFlash 1 layers
run exactly the kernels above.
"""
from __future__ import annotations

import os

import torch

from .gemm_configs import config_for
from .kernels import decode_attention, pdl_opts, triton, use_pdl, use_prefetch
from .dflash2 import chain_conv_supported, conv_finish_residual_norm, conv_prepare
from .moe import kernel_supported as moe_supported

if triton is not None:
    import triton.language as tl

    from .kernels import _skinny_kernel, pdl_enter

    @triton.jit
    def _residual_norm_kernel(part_ptr, res_ptr, gamma_ptr, h_ptr, xn_ptr, M, N, eps,
                              SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Per row: h = res + sum of SPLIT fp32 GEMM partials; xn = RMSNorm(h) * gamma."""
        pdl_enter(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        h = tl.load(res_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
        for s in tl.static_range(SPLIT):
            h += tl.load(part_ptr + (s * M + row) * N + offs, mask=ok, other=0.0)
        hb = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + offs, hb, mask=ok)
        hf = hb.to(tl.float32)  # normalise the residual as stored, like the unfused layer
        r = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
        g = tl.load(gamma_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(xn_ptr + row * N + offs, (hf * r * g).to(xn_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, q_ptr,
                              kc_ptr, vc_ptr, T, eps, sqkv, sc_h,
                              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              HEAD_NORM: tl.constexpr, PDL: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        half = tl.arange(0, D // 2)
        pdl_enter(PDL)
        pos = tl.load(pos_ptr + t)
        src = qkv_ptr + t * sqkv + head * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        if head < H + HKV:
            if HEAD_NORM:
                r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
                if head < H:
                    w1 = tl.load(qn_ptr + half).to(tl.float32)
                    w2 = tl.load(qn_ptr + D // 2 + half).to(tl.float32)
                else:
                    w1 = tl.load(kn_ptr + half).to(tl.float32)
                    w2 = tl.load(kn_ptr + D // 2 + half).to(tl.float32)
                x1 = x1 * r * w1
                x2 = x2 * r * w2
            c1 = tl.load(cos_ptr + pos * D + half).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * D + D // 2 + half).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * D + half).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * D + D // 2 + half).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
            if head < H:
                dst = q_ptr + (head * T + t) * D
            else:
                dst = kc_ptr + (head - H) * sc_h + pos * D
        else:
            y1 = x1
            y2 = x2
            dst = vc_ptr + (head - H - HKV) * sc_h + pos * D
        tl.store(dst + half, y1.to(q_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, y2.to(q_ptr.dtype.element_ty))


MAX_M = 16


def _gemm(x, w, *, swiglu: bool = False, partial: bool = False):
    """x [M, K] @ w[N, K]^T with the skinny kernel: bf16 [M, N]; ``swiglu``: [M, N/2] (w's
    rows interleaved, see ``interleave_gate_up``); ``partial``: fp32 partials [split, M, N]."""
    m, k = x.shape
    n = w.shape[0]
    block_n, block_k, split, warps, stages = config_for(n, k)
    if not partial:  # q/k/v and SwiGLU come straight out of the GEMM: no K split
        split = 1
    pdl = use_pdl(x.device)
    grid = (triton.cdiv(n, block_n), split)
    if partial:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((m, n // 2 if swiglu else n), device=x.device, dtype=x.dtype)
    _skinny_kernel[grid](x, w, out, m, n, k, k // split, BLOCK_M=MAX_M, BLOCK_N=block_n,
                         BLOCK_K=block_k, PARTIAL=partial, SWIGLU=swiglu, PDL=pdl,
                         PREFETCH=use_prefetch(pdl, w), num_warps=warps, num_stages=stages,
                         **pdl_opts(pdl))
    return out


def residual_norm(residual, partials, gamma, eps):
    """(h, xn): h = residual + sum(partials) (bf16, [M, N]), xn = RMSNorm(h) * gamma."""
    m, n = residual.shape
    h = torch.empty_like(residual)
    xn = torch.empty_like(residual)
    split = 0 if partials is None else partials.shape[0]
    pdl = use_pdl(residual.device)
    _residual_norm_kernel[(m,)](partials if partials is not None else residual, residual, gamma,
                                h, xn, m, n, eps, SPLIT=split, BLOCK=triton.next_power_of_2(n),
                                PDL=pdl, num_warps=8, **pdl_opts(pdl))
    return h, xn


def qk_rope_cache(qkv, positions, cos, sin, qn, kn, k_cache, v_cache, n_heads, n_kv, head_dim,
                  eps):
    """qkv [T, (H + 2 Hkv) D] -> q [1, H, T, D] (normed, rotated); k (normed, rotated) and v
    written into the caches [1, Hkv, C, D] at ``positions`` [T]. cos/sin: [C, D] tables."""
    t = qkv.shape[0]
    q = torch.empty((1, n_heads, t, head_dim), device=qkv.device, dtype=qkv.dtype)
    pdl = use_pdl(qkv.device)
    head_norm = qn is not None
    _qk_rope_cache_kernel[(t, n_heads + 2 * n_kv)](
        qkv, positions, cos, sin, qn if head_norm else qkv, kn if head_norm else qkv, q,
        k_cache, v_cache, t, eps, qkv.stride(0), k_cache.stride(1), H=n_heads, HKV=n_kv,
        D=head_dim, HEAD_NORM=head_norm, PDL=pdl, num_warps=1, **pdl_opts(pdl))
    return q


def gate_up_chunk(fl) -> int | None:
    """Rows per gate (and per up) chunk of the interleaved gate/up weight, or None if this
    layer's shapes do not allow the fused SwiGLU epilogue."""
    if triton is None or not fl.wgu.is_cuda:
        return None
    n, k = fl.wgu.shape
    cfg = config_for(n, k)
    if cfg is None or cfg[0] % 2 or k % cfg[1]:
        return None
    chunk = cfg[0] // 2
    return chunk if (n // 2) % chunk == 0 else None


def interleave_gate_up(w: torch.Tensor, chunk: int) -> torch.Tensor:
    """[gate; up] (2I x K) -> rows gate[0:c], up[0:c], gate[c:2c], up[c:2c], ..."""
    gate, up = w.chunk(2, dim=0)
    k = w.shape[1]
    return torch.stack([gate.reshape(-1, chunk, k), up.reshape(-1, chunk, k)], 1).reshape(-1, k)


def layer_kernels_enabled() -> bool:
    """DFLASH_LAYER_KERNELS=0 falls back to the unfused layer (compiled torch + skinny GEMMs)."""
    return triton is not None and os.environ.get("DFLASH_LAYER_KERNELS", "1") != "0"


def layer_supported(fl, x: torch.Tensor, k_cache: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``fused_layer`` handles this layer: CUDA/Triton, 16-bit, no biases, skinny GEMM
    configs for all four weights (MoE layers: q/k/v and o; the experts in ``moe.py``),
    interleaved gate/up, contiguous [C, D] rotary tables. Biases are added apart."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    moe = getattr(fl, "moe", None)
    if x.shape[-2] > MAX_M or (moe is None and not fl.gu_chunk):
        return False
    if moe is not None and not moe_supported(x, moe):
        return False
    for w in (fl.wqkv, fl.wo) if moe is not None else (fl.wqkv, fl.wo, fl.wgu, fl.wd):
        if w.dtype != x.dtype or not w.is_contiguous() or config_for(w.shape[0], w.shape[1]) is None:
            return False
    if fl.wqkv.shape[1] % config_for(*fl.wqkv.shape)[1]:  # run unsplit (see _gemm)
        return False
    d = k_cache.shape[-1]
    group = fl.sizes[0] // fl.sizes[1]  # query heads per KV head (decode_attention's tiles)
    if d not in (64, 128, 256) or group * x.shape[-2] > 256:
        return False
    return (cos.dim() == 2 and cos.is_contiguous() and cos.shape[-1] == d and d % 2 == 0
            and k_cache.is_contiguous())


def fused_layer(h, x1, fl, next_norm, positions, lim, k_cache, v_cache, cos, sin, *, n_heads,
                n_kv, head_dim, eps, window=None, conv=None, sinks=None):
    """One decoder layer for T <= 16 tokens: residual h [T, hidden] and its normed input x1 ->
    (new h, norm(new h; next_norm)). Writes this layer's k/v into the caches.

    ``lim`` [T]: last cache slot each query sees (its position for a causal target step, the
    block's last position for the draft). ``window``: a sliding-window layer's width.
    ``conv``: a DFlash 2 layer's (attention, MLP) ``dflash2.ChainConv`` pair. ``sinks``: the
    layer's attention sinks (GPT-OSS). An MoE layer (``fl.moe``) runs its MLP through
    ``moe.py``'s kernels, whose fp32 output is the residual kernel's one partial."""
    if conv is not None:
        return _dflash2_layer(h, x1, fl, next_norm, positions, lim, k_cache, v_cache, cos, sin,
                              conv, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=eps,
                              window=window)
    qkv = _gemm(x1, fl.wqkv)
    if fl.bqkv is not None:
        qkv = qkv + fl.bqkv
    q = qk_rope_cache(qkv, positions, cos, sin, fl.qn, fl.kn, k_cache, v_cache, n_heads, n_kv,
                      head_dim, eps)
    attn = decode_attention(q, k_cache, v_cache, lim, window=window, sinks=sinks)[0]
    part = _gemm(attn, fl.wo, partial=True)
    if fl.bo is not None:  # the bias as one more (fp32) partial sum
        part = torch.cat([part, fl.bo.float().expand(1, *part.shape[1:])])
    h, x2 = residual_norm(h, part, fl.ln2, eps)
    if fl.moe is not None:
        return residual_norm(h, fl.moe(x2, out_dtype=torch.float32)[None], next_norm, eps)
    act = _gemm(x2, fl.wgu, swiglu=True)
    return residual_norm(h, _gemm(act, fl.wd, partial=True), next_norm, eps)


def _dflash2_layer(h, x1, fl, next_norm, positions, lim, k_cache, v_cache, cos, sin, conv, *,
                   n_heads, n_kv, head_dim, eps, window=None):
    """A DFlash 2 layer: the DFlash 1 kernels with each sublayer wrapped in its dynamic conv
    (prepare after the norm, finish folded into the residual add + norm after the output
    and down projections); 13 launches instead of 9."""
    attn_conv, mlp_conv = conv
    xc, taps = conv_prepare(x1, attn_conv)
    qkv = _gemm(xc, fl.wqkv)
    q = qk_rope_cache(qkv, positions, cos, sin, fl.qn, fl.kn, k_cache, v_cache, n_heads, n_kv,
                      head_dim, eps)
    attn = decode_attention(q, k_cache, v_cache, lim, window=window)[0]
    h, x2 = conv_finish_residual_norm(h, _gemm(attn, fl.wo, partial=True), taps, attn_conv,
                                      fl.ln2, eps)
    xc, taps = conv_prepare(x2, mlp_conv)
    act = _gemm(xc, fl.wgu, swiglu=True)
    return conv_finish_residual_norm(h, _gemm(act, fl.wd, partial=True), taps, mlp_conv,
                                     next_norm, eps)


def dflash2_chain_supported(convs, x: torch.Tensor) -> bool:
    """Whether the chain runs every DFlash 2 conv of the draft (``dflash2.chain_convs``)."""
    return all(chain_conv_supported(c, x) for pair in convs for c in pair)


def fused_layers(h, layers, final_norm, positions, lim, k_caches, v_caches, cos, sin,
                 capture=(), windows=None, convs=None, sinks=None, **kw):
    """All layers on h [T, hidden] -> (final-normed h, {layer index: residual after it}).

    The last layer's entry is the final-normed state (HF's ``hidden_states[L]``, the
    reference's feature for that layer id). ``windows``: per layer, a sliding-window width
    or None (full attention); None for all layers: every layer full. ``convs``: a DFlash 2
    draft's per-layer conv pairs (``dflash2.chain_convs``), None for DFlash 1."""
    h, x = residual_norm(h, None, layers[0].ln1, kw["eps"])
    captured = {}
    last = len(layers) - 1
    for i, fl in enumerate(layers):
        nxt = layers[i + 1].ln1 if i < last else final_norm
        win = windows[i] if windows is not None else None
        h, x = fused_layer(h, x, fl, nxt, positions, lim, k_caches[i], v_caches[i], cos, sin,
                           window=win, conv=convs[i] if convs is not None else None,
                           sinks=sinks[i] if sinks is not None else None, **kw)
        if i in capture:
            captured[i] = x if i == last else h
    return x, captured
