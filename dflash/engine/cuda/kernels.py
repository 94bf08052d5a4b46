"""Skinny bf16 GEMM for decoding: y[M, N] = x[M, K] @ w[N, K]^T with M <= 16 tokens.

At batch 1 a decoding step is a read of the weights; cuBLAS picks kernels for these shapes
that reach ~55-65% of HBM bandwidth on an H100 (docs/PERFORMANCE.md). This Triton kernel
streams ``w`` once in [BLOCK_N, BLOCK_K] tiles, multiplies them with the (tiny, cache-resident)
activations on the tensor cores, and optionally splits K across programs so that even the
narrow projections (N = hidden size) put enough loads in flight. Partial sums are reduced by
a second small kernel in a fixed order, so results are deterministic.

A config depends only on (N, K), never on M, so each output row's arithmetic (tile order,
split points) is the same whether 1 or 16 tokens are in the batch: a token's logits do not
change with the block size it is verified in.

Used only on CUDA when Triton is importable; everything else calls ``F.linear``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .gemm_configs import config_for

try:  # Triton ships with CUDA builds of PyTorch; CPU builds usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None

HAVE_PDL = False
if triton is not None:
    try:  # programmatic dependent launch (Triton >= 3.4)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        HAVE_PDL = True
    except ImportError:  # pragma: no cover
        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch: the next kernel's programs start while this
    one drains and wait (``gdc_wait``) before reading its outputs. Hopper or newer; off with
    DFLASH_PDL=0 and under the Triton interpreter."""
    if (not HAVE_PDL or device.type != "cuda" or os.environ.get("DFLASH_PDL", "1") == "0"
            or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def pdl_opts(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def use_prefetch(pdl: bool, w: torch.Tensor) -> bool:
    """Prefetch a GEMM program's weights into L2 before its PDL wait (16-bit weights whose
    rows start 16-byte aligned, as the bulk prefetch needs); DFLASH_PREFETCH=1 (off until
    measured: docs/PERFORMANCE.md)."""
    return (pdl and w.element_size() == 2 and w.shape[-1] % 8 == 0 and w.data_ptr() % 16 == 0
            and os.environ.get("DFLASH_PREFETCH", "0") == "1")

MAX_M = 16

if triton is not None:
    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """Wait for the previous kernel's outputs, then let the next kernel launch (use_pdl)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_rows_l2(row_ptrs, nbytes):
        """Start reading ``nbytes`` from each row pointer into L2 (Hopper bulk prefetch; no
        registers, no result): weights do not depend on the previous kernel, so a program
        can fetch them while that kernel drains, before ``gdc_wait``."""
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;",
                                  "=r,l,r", [row_ptrs, nbytes], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PARTIAL: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr,
                       PREFETCH: tl.constexpr = False):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split
        x_rows = x_ptr + offs_m[:, None] * K
        w_rows = w_ptr + offs_n[:, None] * K
        if PREFETCH:  # this program's weight slice, row by row (rows past N: the last row)
            rows = tl.minimum(offs_n, N - 1)
            nbytes = tl.full((BLOCK_N,), 0, tl.int32) + k_per_split * 2
            prefetch_rows_l2(w_ptr + rows.to(tl.int64) * K + k_start, nbytes)
        pdl_enter(PDL)  # x is written by the previous kernel
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            kk = (k0 + offs_k)[None, :]
            x = tl.load(x_rows + kk, mask=m_ok, other=0.0)
            w = tl.load(w_rows + kk, mask=n_ok, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if PARTIAL:  # fp32 partial sums, [split, M, N]
            out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
            tl.store(out, acc, mask=out_mask)
        elif SWIGLU:
            # w's rows are interleaved in chunks of BLOCK_N // 2 (gate chunk, then the matching
            # up chunk), so this tile holds both halves: write silu(gate) * up, [M, N // 2].
            half: tl.constexpr = BLOCK_N // 2
            gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
            y = gate / (1.0 + tl.exp(-gate)) * up
            offs_h = pid_n * half + tl.arange(0, half)
            out = out_ptr + offs_m[:, None] * (N // 2) + offs_h[None, :]
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok & (offs_h[None, :] < N // 2))
        else:
            out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _reduce_kernel(part_ptr, out_ptr, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in range(1, SPLIT):
            acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, cfg=None) -> torch.Tensor:
    """x [M, K] (contiguous, M <= 16) @ w[N, K]^T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    block_n, block_k, split, warps, stages = cfg or config_for(n, k)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), split)
    if split == 1:
        _skinny_kernel[grid](x, w, out, m, n, k, k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                             PARTIAL=False, SWIGLU=False, PDL=False, num_warps=warps,
                             num_stages=stages)
        return out
    part = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    _skinny_kernel[grid](x, w, part, m, n, k, k // split, BLOCK_M=16, BLOCK_N=block_n,
                         BLOCK_K=block_k, PARTIAL=True, SWIGLU=False, PDL=False, num_warps=warps,
                         num_stages=stages)
    total = m * n
    _reduce_kernel[(triton.cdiv(total, 1024),)](part, out, total, SPLIT=split, BLOCK=1024)
    return out


# Decided once per process (a global that torch.compile can guard on cheaply).
ENABLED = triton is not None and os.environ.get("DFLASH_SKINNY_GEMM", "1") != "0"


def use_skinny(x: torch.Tensor, w: torch.Tensor) -> bool:
    m = x.numel() // x.shape[-1]
    return (m <= MAX_M and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.is_contiguous() and config_for(w.shape[0], w.shape[1]) is not None)


if triton is not None:
    @torch.library.custom_op("dflash::skinny_linear", mutates_args=())
    def _skinny_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Opaque to torch.compile: the M / config dispatch happens here, at run time.
        if use_skinny(x, w):
            return skinny_matmul(x.contiguous(), w)
        return F.linear(x, w)

    @_skinny_linear_op.register_fake
    def _(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except that CUDA decode-sized GEMMs (<= 16 rows) use the skinny kernel.

    A bias is added after the GEMM on CUDA, so that biased projections (GPT-OSS, Qwen2) take
    the same row-invariant kernel."""
    if ENABLED and bias is not None and x.is_cuda:
        return linear(x, w) + bias
    if ENABLED and bias is None and x.is_cuda:
        lead = x.shape[:-1]
        y = _skinny_linear_op(x.reshape(-1, x.shape[-1]), w)
        return y.view(*lead, w.shape[0])
    return F.linear(x, w, bias)


# ----------------------------------------------------------------------------- decode attention
# Attention of T <= 16 new tokens over a static KV cache, for CUDA-graph replays. Each query
# row sees the cache slots up to its own limit (``lim``: its position for the target, the
# block's last position for the draft), read from device memory, so the work follows the
# filled length rather than the buffer size and no mask tensor is built. The G query heads
# that share a KV head are stacked into tiles of 16 rows (g * T + t); the slots are split into
# fixed chunks across programs (flash-decoding) and combined by a second kernel.
#
# Row invariance: a row's arithmetic does not depend on which other rows share its tile or on
# T: tiles always have 16 rows (one MMA shape), chunk boundaries depend only on the cache
# size, and blocks past a row's limit contribute exact zeros. So a token's attention output
# is bitwise the same in an autoregressive step and inside a verified block.

if triton is not None:
    @triton.jit
    def _attn_partial_kernel(q_ptr, k_ptr, v_ptr, lim_ptr, po_ptr, pm_ptr, pl_ptr,
                             T, sm_scale, sq_h, sq_t, sk_h, sk_c,
                             G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                             CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                             WINDOW: tl.constexpr = 0):
        pdl_enter(PDL)
        hk = tl.program_id(0)
        sp = tl.program_id(1)
        tile = tl.program_id(2)
        rows = tile * 16 + tl.arange(0, 16)  # row = g * T + t
        row_ok = rows < G * T
        g = rows // T
        t = rows % T
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (hk * G + g)[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        lim = tl.load(lim_ptr + t, mask=row_ok, other=-1)
        length = tl.max(lim, axis=0) + 1
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, length)
        m_i = tl.full((16,), float("-inf"), tl.float32)
        l_i = tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, D), tl.float32)
        kv = hk * sk_h
        first = start
        if WINDOW > 0:
            # Sliding window: a row sees slots lim - WINDOW < s <= lim. Blocks below every row's
            # window add exact zeros, so skipping them (at the same block grid) changes nothing.
            lo = tl.min(tl.where(row_ok, lim, 2147483647), axis=0) - WINDOW + 1
            first = start + tl.maximum(lo - start, 0) // BLOCK_N * BLOCK_N
        for s0 in range(first, end, BLOCK_N):
            cols = s0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            # v is loaded with k, not after the softmax, so both reads are in flight at once
            k = tl.load(k_ptr + kv + cols[None, :] * sk_c + d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptr + kv + cols[:, None] * sk_c + d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, k) * sm_scale
            seen = (cols[None, :] <= lim[:, None]) & col_ok[None, :]
            if WINDOW > 0:
                seen = seen & (cols[None, :] > lim[:, None] - WINDOW)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        base = (hk * SPLITS + sp) * G * T + rows  # partials: [Hkv, SPLITS, G*T]
        # a split past every row's limit is never read by the combine: nothing to write
        live = rows < tl.where(start < length, G * T, 0)
        tl.store(po_ptr + base[:, None] * D + d[None, :], acc, mask=live[:, None])
        tl.store(pm_ptr + base, m_i, mask=live)
        tl.store(pl_ptr + base, l_i, mask=live)

    @triton.jit
    def _attn_combine_kernel(po_ptr, pm_ptr, pl_ptr, lim_ptr, out_ptr, sink_ptr, T, H,
                             G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                             SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
                             SINK: tl.constexpr = False):
        pdl_enter(PDL)
        hk = tl.program_id(0)
        row = tl.program_id(1)
        g = row // T
        t = row % T
        sp = tl.arange(0, SPLITS_P2)
        # Only the splits up to this row's own limit hold anything (the others would add exact
        # zeros): masked loads read nothing and return those zeros, so the sums are unchanged
        # and depend on the row's position only, as before.
        ok = (sp < SPLITS) & (sp <= tl.load(lim_ptr + t) // CHUNK)
        idx = (hk * SPLITS + sp) * G * T + row
        m = tl.load(pm_ptr + idx, mask=ok, other=float("-inf"))
        l = tl.load(pl_ptr + idx, mask=ok, other=0.0)
        m_max = tl.max(m, axis=0)
        d = tl.arange(0, D)
        o = tl.load(po_ptr + idx[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        if SINK:  # GPT-OSS: the head's sink logit takes probability mass, adds no value
            sink = tl.load(sink_ptr + hk * G + g).to(tl.float32)
            m_top = tl.maximum(m_max, sink)
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_top))
            out = tl.sum(o * w[:, None], axis=0) / (tl.sum(l * w, axis=0) + tl.exp(sink - m_top))
        else:
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
            out = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + (t * H + hk * G + g) * D + d, out.to(out_ptr.dtype.element_ty))


def attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel's envelope: CUDA, 16-bit, head_dim a power of two, <= 256 stacked rows."""
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    g = h // k_cache.shape[1]
    return (ENABLED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and d in (64, 128, 256) and g * t <= 256 and k_cache.stride(-1) == 1)


def attention_chunk(capacity: int) -> int:
    """Slots per split: a function of the cache size only (see row invariance above).
    ``DFLASH_ATTN_CHUNK`` (a power of two, 16-1024) overrides it, for measurements."""
    forced = os.environ.get("DFLASH_ATTN_CHUNK")
    if forced:
        chunk = int(forced)
        if chunk < 16 or chunk > 1024 or chunk & (chunk - 1):
            raise ValueError(f"DFLASH_ATTN_CHUNK must be a power of two in 16..1024, got {forced}")
        return chunk
    return 64 * max(2, -(-capacity // (32 * 64)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lim: torch.Tensor, scale: float | None = None,
                     window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [1, H, T, D], caches [1, Hkv, C, D], lim [T] (last visible slot of each query)
    -> attention output [1, T, H * D] (the layout the output projection wants).

    ``window``: a sliding-window layer's width (HF's ``sliding_window``): a query sees only
    slots lim - window < s <= lim. None/0: full attention (the kernel compiled as before).
    ``sinks`` [H]: GPT-OSS's per-head sink logits (one more softmax term with no value);
    None: the combine kernel compiled as before."""
    _, h, t, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    g = h // hkv
    chunk = attention_chunk(cap)
    splits = -(-cap // chunk)
    scale = d ** -0.5 if scale is None else scale
    pdl = use_pdl(q.device)
    po = torch.empty((hkv, splits, g * t, d), device=q.device, dtype=torch.float32)
    pm = torch.empty((hkv, splits, g * t), device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    _attn_partial_kernel[(hkv, splits, triton.cdiv(g * t, 16))](
        q, k_cache, v_cache, lim, po, pm, pl, t, scale, q.stride(1), q.stride(2),
        k_cache.stride(1), k_cache.stride(2), G=g, D=d, SPLITS=splits, CHUNK=chunk,
        BLOCK_N=min(chunk, 128), PDL=pdl, WINDOW=int(window or 0), num_warps=4, num_stages=2,
        **pdl_opts(pdl))
    out = torch.empty((1, t, h * d), device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(hkv, g * t)](po, pm, pl, lim, out, sinks if sinks is not None else pm,
                                       t, h, G=g, D=d, SPLITS=splits,
                                       SPLITS_P2=triton.next_power_of_2(splits), CHUNK=chunk,
                                       PDL=pdl, SINK=sinks is not None, num_warps=4,
                                       **pdl_opts(pdl))
    return out
