"""DFlash 2 on CUDA: the grouped dynamic causal convolution and the candidate selector's walk.

``dynamic_conv`` and ``select_walk`` take the arguments of ``dflash.model.dflash2``'s
``grouped_dynamic_conv`` and ``select_walk`` and give their results (one Triton launch each);
off CUDA, without Triton, or for shapes the kernels do not take they call those functions.
The kernels compute in float32 from the stored values (the torch functions round to the
inputs' dtype between steps), so 16-bit results agree to rounding, float32 ones to ~1e-6.

The layer chain (``layer.fused_layers``) uses the fused pieces at the end of this file: the
kernel projection as a skinny GEMM with fp32 partials, the "prepare" conv that also reduces
those partials, and the "finish" conv folded into the residual add + RMSNorm kernel.
"""
from __future__ import annotations

import os
import weakref

import torch

from .kernels import pdl_opts, triton, use_pdl

MAX_TOP_K = 128
MAX_RANK = 1024


def _torch_ops():
    # the model layer's torch math (imported here, not at import time: it pulls the model)
    from ...model import dflash2
    return dflash2


def _on_device(*tensors) -> bool:
    """Kernels run on CUDA tensors; under TRITON_INTERPRET=1 (debugging) on CPU ones too."""
    if triton is None:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    import triton.language as tl

    from .kernels import _skinny_kernel, pdl_enter

    @triton.jit
    def _group_tile(G, GS, G_P2: tl.constexpr, GS_P2: tl.constexpr):
        """The channels of one row as a [group, channel-in-group] tile: (group index [G_P2, 1],
        channel index, group mask, channel mask)."""
        g = tl.arange(0, G_P2)[:, None]
        j = tl.arange(0, GS_P2)[None, :]
        gok = g < G
        return g, g * GS + j, gok, gok & (j < GS)

    @triton.jit
    def _dyn_conv_kernel(x_ptr, d_ptr, b_ptr, y_ptr, T, H, G, GS, sx_b, sx_t, sd_b, sd_t, sd_o,
                         K: tl.constexpr, G_P2: tl.constexpr, GS_P2: tl.constexpr):
        """One output row (batch, t): channels as a [group, channel-in-group] tile."""
        row = tl.program_id(0)
        bi = row // T
        t = row % T
        g, c, _, ok = _group_tile(G, GS, G_P2, GS_P2)
        acc = tl.zeros((G_P2, GS_P2), tl.float32)
        for o in tl.static_range(K):
            live = (g * 0 + t) >= o  # a tensor: the interpreter masks with tensors only
            xv = tl.load(x_ptr + bi * sx_b + (t - o) * sx_t + c, mask=ok & live, other=0.0)
            xv = xv.to(tl.float32)
            bv = tl.load(b_ptr + o * H + c, mask=ok, other=0.0).to(tl.float32)
            dv = tl.load(d_ptr + bi * sd_b + t * sd_t + o * sd_o + g, mask=(g < G) & live,
                         other=0.0).to(tl.float32)
            acc += bv * xv  # the torch function's order: base tap, then the dynamic tap
            acc += dv * xv
        tl.store(y_ptr + row * H + c, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _walk_kernel(un_ptr, cand_ptr, hp_ptr, pred_ptr, succ_ptr, anchor_ptr, u_ptr, tok_ptr,
                     q_ptr, T, KC, R, temperature, s_un, s_cand, s_hp, s_pred, s_succ,
                     BK: tl.constexpr, BR: tl.constexpr, SAMPLE: tl.constexpr):
        """The whole walk in one program, position after position. No load waits for the
        previous choice: each step loads its k candidates' successor and predecessor rows,
        and the choice picks the next step's predecessor row among the latter in registers."""
        kk = tl.arange(0, BK)
        rr = tl.arange(0, BR)
        kok = kk < KC
        rok = rr < R
        tile_ok = kok[:, None] & rok[None, :]
        prev = tl.load(anchor_ptr).to(tl.int64)
        pr = tl.load(pred_ptr + prev * s_pred + rr, mask=rok, other=0.0).to(tl.float32)
        for pos in range(T):
            un = tl.load(un_ptr + pos * s_un + kk, mask=kok, other=0.0).to(tl.float32)
            cd = tl.load(cand_ptr + pos * s_cand + kk, mask=kok, other=0).to(tl.int64)
            hp = tl.load(hp_ptr + pos * s_hp + rr, mask=rok, other=0.0).to(tl.float32)
            sc = tl.load(succ_ptr + cd[:, None] * s_succ + rr[None, :], mask=tile_ok,
                         other=0.0).to(tl.float32)
            nxt = tl.load(pred_ptr + cd[:, None] * s_pred + rr[None, :], mask=tile_ok,
                          other=0.0).to(tl.float32)
            score = un + tl.sum(sc * (pr * hp)[None, :], axis=1)
            score = tl.where(kok, score, float("-inf"))
            if SAMPLE:
                z = score / temperature
                e = tl.where(kok, tl.exp(z - tl.max(z, axis=0)), 0.0)
                q = e / tl.sum(e, axis=0)
                tl.store(q_ptr + pos * KC + kk, q, mask=kok)
                u = tl.load(u_ptr + pos)
                # first index whose cumulative mass exceeds u, clamped (as the torch function)
                below = tl.where(kok & (tl.cumsum(q, axis=0) <= u), 1, 0)
                idx = tl.minimum(tl.sum(below, axis=0), KC - 1)
            else:
                idx = tl.argmax(score, axis=0)  # ties: the first index, like torch.argmax
            pick = kk == idx
            tl.store(tok_ptr + pos, tl.sum(tl.where(pick, cd, 0), axis=0))
            pr = tl.sum(tl.where(pick[:, None], nxt, 0.0), axis=0)

    @triton.jit
    def _prepare_kernel(x_ptr, dp_ptr, b_ptr, y_ptr, ds_ptr, M, H, G, GS, NDYN,
                        SPLIT: tl.constexpr, K: tl.constexpr, G_P2: tl.constexpr,
                        GS_P2: tl.constexpr, PDL: tl.constexpr):
        """Chain "prepare" for row t: reduce the kernel projection's fp32 partials
        [SPLIT, M, 2*K*G]; y[t] = conv(x; base[0] + dyn[t, 0]); keep dyn[t, 1] (fp32
        [M, K, G]) for the finish."""
        pdl_enter(PDL)
        t = tl.program_id(0)
        g, c, gok, ok = _group_tile(G, GS, G_P2, GS_P2)
        acc = tl.zeros((G_P2, GS_P2), tl.float32)
        for o in tl.static_range(K):
            d0 = tl.zeros((G_P2, 1), tl.float32)
            d1 = tl.zeros((G_P2, 1), tl.float32)
            for s in tl.static_range(SPLIT):
                base = dp_ptr + (s * M + t) * NDYN
                d0 += tl.load(base + o * G + g, mask=gok, other=0.0)
                d1 += tl.load(base + (K + o) * G + g, mask=gok, other=0.0)
            tl.store(ds_ptr + (t * K + o) * G + g, d1, mask=gok)
            live = (g * 0 + t) >= o  # a tensor: the interpreter masks with tensors only
            xv = tl.load(x_ptr + (t - o) * H + c, mask=ok & live, other=0.0).to(tl.float32)
            bv = tl.load(b_ptr + o * H + c, mask=ok, other=0.0).to(tl.float32)
            acc += bv * xv
            acc += d0 * xv
        tl.store(y_ptr + t * H + c, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _finish_residual_norm_kernel(part_ptr, ds_ptr, b_ptr, res_ptr, gamma_ptr, h_ptr, xn_ptr,
                                     M, H, G, GS, eps, SPLIT: tl.constexpr, K: tl.constexpr,
                                     G_P2: tl.constexpr, GS_P2: tl.constexpr,
                                     PDL: tl.constexpr):
        """Chain "finish" for row t: the sublayer output (sum of SPLIT fp32 GEMM partials)
        convolved with base[1] + dyn[t, 1], added to the residual; xn = RMSNorm(h) * gamma."""
        pdl_enter(PDL)
        t = tl.program_id(0)
        g, c, gok, ok = _group_tile(G, GS, G_P2, GS_P2)
        y = tl.zeros((G_P2, GS_P2), tl.float32)
        for o in tl.static_range(K):
            live = (g * 0 + t) >= o  # a tensor: the interpreter masks with tensors only
            a = tl.zeros((G_P2, GS_P2), tl.float32)
            for s in tl.static_range(SPLIT):
                a += tl.load(part_ptr + (s * M + t - o) * H + c, mask=ok & live, other=0.0)
            bv = tl.load(b_ptr + o * H + c, mask=ok, other=0.0).to(tl.float32)
            dv = tl.load(ds_ptr + (t * K + o) * G + g, mask=gok, other=0.0)
            y += bv * a
            y += dv * a
        h = tl.load(res_ptr + t * H + c, mask=ok, other=0.0).to(tl.float32) + y
        hb = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + t * H + c, hb, mask=ok)
        hf = hb.to(tl.float32)  # normalise the residual as stored, like the DFlash 1 chain
        r = tl.rsqrt(tl.sum(tl.sum(hf * hf, axis=1), axis=0) / H + eps)
        gm = tl.load(gamma_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(xn_ptr + t * H + c, (hf * r * gm).to(xn_ptr.dtype.element_ty), mask=ok)


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def conv_supported(x: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor) -> bool:
    """The conv kernel's envelope: x [..., t, H], dyn [..., t, K, G] with G | H, base [K, H];
    unit stride along channels and groups."""
    if x.dim() < 2 or dyn.dim() != x.dim() + 1 or base.dim() != 2 or not _on_device(x, dyn, base):
        return False
    k, hidden = base.shape
    t, groups = x.shape[-2], dyn.shape[-1]
    if (x.shape[-1] != hidden or dyn.shape[-3:-1] != (t, k) or dyn.shape[:-3] != x.shape[:-2]
            or groups < 1 or hidden % groups or k > 16):
        return False
    return (x.stride(-1) == 1 and dyn.stride(-1) == 1 and base.is_contiguous()
            and _p2(groups) * _p2(hidden // groups) <= 16384)


def dynamic_conv(x: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_{o<K} (base[o] + dyn[t, o, g(c)]) * x[t-o], x = 0 before the block start."""
    if not conv_supported(x, dyn, base):
        return _torch_ops().grouped_dynamic_conv(x, dyn, base)
    k, hidden = base.shape
    t, groups = x.shape[-2], dyn.shape[-1]
    x3 = x.reshape(-1, t, hidden)
    d4 = dyn.reshape(-1, t, k, groups)
    if x3.stride(-1) != 1 or d4.stride(-1) != 1:  # reshape copied into another layout
        x3, d4 = x3.contiguous(), d4.contiguous()
    y = torch.empty(x3.shape, device=x.device, dtype=x.dtype)
    gs = hidden // groups
    _dyn_conv_kernel[(x3.shape[0] * t,)](
        x3, d4, base, y, t, hidden, groups, gs, x3.stride(0), x3.stride(1), d4.stride(0),
        d4.stride(1), d4.stride(2), K=k, G_P2=_p2(groups), GS_P2=_p2(gs), num_warps=4)
    return y.view(x.shape)


def walk_supported(unary, cand, hproj, pred_w, succ_w, anchor) -> bool:
    if not _on_device(unary, cand, hproj, pred_w, succ_w, anchor):
        return False
    if unary.dim() != 2 or cand.shape != unary.shape or hproj.dim() != 2:
        return False
    t, k = unary.shape
    r = hproj.shape[1]
    return (hproj.shape[0] == t and pred_w.shape[1] == r and succ_w.shape[1] == r
            and 1 <= k <= MAX_TOP_K and 1 <= r <= MAX_RANK and anchor.numel() == 1
            and all(a.stride(-1) == 1 for a in (unary, cand, hproj, pred_w, succ_w)))


def select_walk(unary, cand, hproj, pred_w, succ_w, anchor, temperature, uniforms=None,
                generator=None):
    """The selector's walk over the block from the anchor: (tokens [t], q [t, k] or None)."""
    if not walk_supported(unary, cand, hproj, pred_w, succ_w, anchor):
        return _torch_ops().select_walk(unary, cand, hproj, pred_w, succ_w, anchor, temperature,
                                        uniforms=uniforms, generator=generator)
    t, k = unary.shape
    sample = temperature > 0
    if sample and uniforms is None:  # drawn as the torch function draws them
        uniforms = torch.rand(t, generator=generator, device=unary.device)
    tokens = torch.empty(t, device=unary.device, dtype=torch.int64)
    q = torch.empty((t, k), device=unary.device, dtype=torch.float32) if sample else None
    u = uniforms.float().contiguous() if sample else unary
    _walk_kernel[(1,)](unary, cand, hproj, pred_w, succ_w, anchor.reshape(1), u, tokens,
                       q if sample else tokens, t, k, hproj.shape[1],
                       float(temperature) if sample else 1.0, unary.stride(0), cand.stride(0),
                       hproj.stride(0), pred_w.stride(0), succ_w.stride(0), BK=max(2, _p2(k)),
                       BR=max(16, _p2(hproj.shape[1])), SAMPLE=sample, num_warps=1)
    return tokens, q


# ----------------------------------------------------------------------------- the layer chain
class ChainConv:
    """One dynamic conv's weights for the chain: kernel projection [2*K*G, H], base [2, K, H]."""

    def __init__(self, conv):
        self.conv = conv
        self.k, self.hidden = conv.base_kernel.shape[1], conv.base_kernel.shape[2]
        self.groups = conv.kernel_projection.weight.shape[0] // (2 * self.k)

    # read at each use: a later .to() swaps the parameters' data
    @property
    def base(self) -> torch.Tensor:
        return self.conv.base_kernel.detach()

    @property
    def wkp(self) -> torch.Tensor:
        return self.conv.kernel_projection.weight.detach()


_CONVS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chain_convs(draft):
    """Per layer (attention ChainConv, MLP ChainConv) for a DFlash 2 draft, else None.
    Built once per draft (views of its parameters, no copies)."""
    if getattr(draft, "candidate_selector", None) is None:
        return None
    got = _CONVS.get(draft)
    if got is None:
        got = [(ChainConv(l.attention_conv), ChainConv(l.mlp_conv)) for l in draft.layers]
        _CONVS[draft] = got
    return got


def _kp_config(n: int, k: int):
    """Kernel projection GEMM config (N = 2*K*G is small): narrow N tiles and a K split so
    ~100+ programs stream the weight; None if K is not a multiple of 256."""
    for split in (16, 10, 8, 5, 4, 2, 1):
        if k % (split * 128) == 0 and k // (split * 128) >= 2:
            return 32, 128, split, 4, 2
    return None


def chain_conv_supported(cc: ChainConv, x: torch.Tensor) -> bool:
    """Whether the chain runs this conv: weights in x's dtype and contiguous, G | H, K <= 16."""
    return (triton is not None and cc.base.dtype == x.dtype and cc.wkp.dtype == x.dtype
            and cc.base.is_contiguous() and cc.wkp.is_contiguous() and cc.hidden == x.shape[-1]
            and cc.groups >= 1 and cc.hidden % cc.groups == 0 and cc.k <= 16
            and cc.wkp.shape == (2 * cc.k * cc.groups, cc.hidden)
            and _kp_config(*cc.wkp.shape) is not None
            and _p2(cc.groups) * _p2(cc.hidden // cc.groups) <= 16384)


def conv_prepare(x: torch.Tensor, cc: ChainConv):
    """x [M, H] (normed sublayer input) -> (convolved x [M, H], finish taps fp32 [M, K, G]).
    Two launches: the kernel projection (fp32 partials), then the conv that reduces them."""
    m, hidden = x.shape
    n = cc.wkp.shape[0]
    block_n, block_k, split, warps, stages = _kp_config(n, hidden)
    pdl = use_pdl(x.device)
    part = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    _skinny_kernel[(triton.cdiv(n, block_n), split)](
        x, cc.wkp, part, m, n, hidden, hidden // split, BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=block_k, PARTIAL=True, SWIGLU=False, PDL=pdl, num_warps=warps,
        num_stages=stages, **pdl_opts(pdl))
    y = torch.empty_like(x)
    taps = torch.empty((m, cc.k, cc.groups), device=x.device, dtype=torch.float32)
    gs = hidden // cc.groups
    _prepare_kernel[(m,)](x, part, cc.base[0], y, taps, m, hidden, cc.groups, gs, n,
                          SPLIT=split, K=cc.k, G_P2=_p2(cc.groups), GS_P2=_p2(gs), PDL=pdl,
                          num_warps=8, **pdl_opts(pdl))
    return y, taps


def conv_finish_residual_norm(residual, partials, taps, cc: ChainConv, gamma, eps):
    """(h, xn): h = residual + conv(sum(partials); base[1] + taps), xn = RMSNorm(h) * gamma."""
    m, hidden = residual.shape
    h = torch.empty_like(residual)
    xn = torch.empty_like(residual)
    gs = hidden // cc.groups
    pdl = use_pdl(residual.device)
    _finish_residual_norm_kernel[(m,)](
        partials, taps, cc.base[1], residual, gamma, h, xn, m, hidden, cc.groups, gs, eps,
        SPLIT=partials.shape[0], K=cc.k, G_P2=_p2(cc.groups), GS_P2=_p2(gs), PDL=pdl,
        num_warps=8, **pdl_opts(pdl))
    return h, xn


# ----------------------------------------------------------------------------- selector top-k
# torch.topk over [15, 151936] runs ~9 kernels (radix select + sort, ~55 us on an H200); two
# Triton launches do it: per (row, chunk) k rounds of max, then one program per row merging.
TOPK_MAX_K = 32
TOPK_CHUNK = 4096


if triton is not None:
    @triton.jit
    def _topk_chunk_kernel(x_ptr, val_ptr, id_ptr, V, s_row, NCH,
                           K: tl.constexpr, BLOCK: tl.constexpr):
        """Top K of one chunk of one row: K rounds of (max, lowest column holding it).
        Taken or padded columns carry id V (never valid), so -inf logits still count."""
        row = tl.program_id(0)
        ch = tl.program_id(1)
        col = ch * BLOCK + tl.arange(0, BLOCK)
        ok = col < V
        x = tl.load(x_ptr + row * s_row + col, mask=ok, other=float("-inf")).to(tl.float32)
        ids = tl.where(ok, col, V)
        out = (row * NCH + ch) * K
        for r in tl.static_range(K):
            m = tl.max(x, axis=0)
            sel = tl.min(tl.where((ids < V) & (x == m), ids, V), axis=0)
            tl.store(val_ptr + out + r, m)
            tl.store(id_ptr + out + r, sel)
            taken = ids == sel
            x = tl.where(taken, float("-inf"), x)
            ids = tl.where(taken, V, ids)

    @triton.jit
    def _topk_merge_kernel(val_ptr, id_ptr, ov_ptr, oi_ptr, V, N, K: tl.constexpr,
                           BLOCK: tl.constexpr):
        """One row: the top K of its chunks' N = NCH*K winners, best first (ties: lowest id)."""
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        ok = j < N
        x = tl.load(val_ptr + row * N + j, mask=ok, other=float("-inf"))
        ids = tl.load(id_ptr + row * N + j, mask=ok, other=V)
        for r in tl.static_range(K):
            m = tl.max(x, axis=0)
            sel = tl.min(tl.where((ids < V) & (x == m), ids, V), axis=0)
            tl.store(ov_ptr + row * K + r, m)
            tl.store(oi_ptr + row * K + r, sel.to(tl.int64))
            taken = ids == sel
            x = tl.where(taken, float("-inf"), x)
            ids = tl.where(taken, V, ids)


def torch_topk(logits: torch.Tensor, k: int):
    """The selector's candidates with torch: (values float32 [t, k], ids int64 [t, k])."""
    values, ids = torch.topk(logits, k, dim=-1)
    return values.float(), ids


def topk_supported(logits: torch.Tensor, k: int) -> bool:
    return (logits.dim() == 2 and 1 <= k <= TOPK_MAX_K and k <= logits.shape[1] < 2 ** 31 - 1
            and logits.stride(-1) == 1 and logits.shape[0] >= 1 and _on_device(logits))


def topk(logits: torch.Tensor, k: int):
    """Rows of logits [t, V] -> (values float32 [t, k], ids int64 [t, k]), descending; values
    are the logits' own, ties at the boundary go to the lowest column. Two launches, no host
    sync (graph-capturable); torch.topk where the kernels do not run."""
    if not topk_supported(logits, k):
        return torch_topk(logits, k)
    t, vocab = logits.shape
    chunk = min(TOPK_CHUNK, _p2(vocab))
    nch = triton.cdiv(vocab, chunk)
    vals = torch.empty((t, nch * k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((t, nch * k), device=logits.device, dtype=torch.int32)
    _topk_chunk_kernel[(t, nch)](logits, vals, ids, vocab, logits.stride(0), nch, K=k,
                                 BLOCK=chunk, num_warps=8 if chunk >= 4096 else 4)
    out_v = torch.empty((t, k), device=logits.device, dtype=torch.float32)
    out_i = torch.empty((t, k), device=logits.device, dtype=torch.int64)
    n = nch * k
    _topk_merge_kernel[(t,)](vals, ids, out_v, out_i, vocab, n, K=k, BLOCK=max(16, _p2(n)),
                             num_warps=4)
    return out_v, out_i
