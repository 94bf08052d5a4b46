"""A capture-safe MoE MLP for decode-sized steps (T <= 16 tokens): Qwen3-MoE and GPT-OSS.

Routing runs in torch ops with HF's numerics (router GEMM through ``kernels.linear``, so it
is row invariant on CUDA; top-k; softmax as each family does it). The experts run in three
Triton kernels with no host sync and no data-dependent shape, so a CUDA graph captures them:

    act[t, s]  = act(x[t] @ Wgu[e]^T + bgu[e])    e = ids[t, s]; grid (experts, I tiles)
    y[t, s]    = act[t, s] @ Wd[e]^T + bd[e]       grid (experts, H tiles)
    out[t]     = sum_s w[t, s] * y[t, s]           slots 0..k-1 in order, fp32

"Expert-major": a program owns one expert's weight tile, finds the tokens routed to that
expert by comparing the [T, k] ids with its own (returns at once if none: the weights of
unused experts are never read), and multiplies the tile with all of them in one 16-row MMA.
Rows of an MMA tile are independent and the tiles depend on (N, K) only, so a token's result
is bitwise the same whether it runs alone (an AR step) or inside a verified block.

``moe_torch`` is the same math in plain torch: used off-GPU and as the tests' oracle.
"""
from __future__ import annotations

import functools

import torch

from .kernels import linear, triton

MAX_T = 16

# block classes whose parameter layout and routing are implemented here -> family kind
_BLOCKS = {"Qwen3MoeSparseMoeBlock": "qwen3", "GptOssMLP": "gpt_oss"}


class MoEWeights:
    """One MoE block's router and experts, as views of the model's own parameters.

    Expert weights are used in place (no copies), as logical [E, N, K] views: ``w_gu`` gives
    the gate row of intermediate index j at ``j * gu_step`` and its up row at
    ``j * gu_step + gu_up`` (Qwen3: [gate; up] rows, step 1, up at +I; GPT-OSS: interleaved
    columns, step 2, up at +1)."""

    def __init__(self, kind, router_w, router_b, top_k, w_gu, b_gu, w_d, b_d, *,
                 norm_topk=False, limit=None, alpha=None):
        self.kind, self.top_k = kind, int(top_k)
        self.router_w, self.router_b = router_w, router_b
        self.w_gu, self.b_gu, self.w_d, self.b_d = w_gu, b_gu, w_d, b_d
        self.n_experts, self.hidden = w_d.shape[0], w_d.shape[1]
        self.inter = w_d.shape[2]
        self.gu_step, self.gu_up = (1, self.inter) if kind == "qwen3" else (2, 1)
        self.norm_topk, self.limit, self.alpha = norm_topk, limit, alpha

    @classmethod
    def from_block(cls, mlp) -> "MoEWeights | None":
        """The weights of an HF MoE block, or None for a layout not implemented here."""
        kind = _BLOCKS.get(type(mlp).__name__)
        experts = getattr(mlp, "experts", None)
        if kind is None or experts is None:
            return None
        if kind == "qwen3":
            return cls._qwen3(mlp, experts)
        return cls._gpt_oss(mlp, experts)

    @classmethod
    def _qwen3(cls, mlp, ex):
        router = mlp.gate
        if {n for n, _ in mlp.named_children()} != {"gate", "experts"}:
            return None  # e.g. a shared expert
        if type(ex.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            return None
        gu, d = ex.gate_up_proj, ex.down_proj  # [E, 2I, H], [E, H, I]
        e, h, i = d.shape
        if gu.shape != (e, 2 * i, h) or router.weight.shape != (e, h):
            return None
        return cls("qwen3", router.weight.detach(), None, router.top_k, gu.detach(), None,
                   d.detach(), None, norm_topk=bool(router.norm_topk_prob))

    @classmethod
    def _gpt_oss(cls, mlp, ex):
        router = mlp.router
        gu, d = ex.gate_up_proj, ex.down_proj  # [E, H, 2I], [E, I, H] (K x N per expert)
        e, i, h = d.shape
        if gu.shape != (e, h, 2 * i) or router.weight.shape != (e, h):
            return None
        return cls("gpt_oss", router.weight.detach(), router.bias.detach(), router.top_k,
                   gu.detach().transpose(1, 2), ex.gate_up_proj_bias.detach(),
                   d.detach().transpose(1, 2), ex.down_proj_bias.detach(),
                   limit=float(ex.limit), alpha=float(ex.alpha))

    def __call__(self, x: torch.Tensor, out_dtype=None) -> torch.Tensor:
        """x [..., H] (normed MLP input) -> the block's output, same shape, in ``out_dtype``
        (default x's; the layer chain takes the fp32 sum before rounding)."""
        x2 = x.reshape(-1, x.shape[-1])
        ids, weights = route(x2, self)
        if kernel_supported(x2, self):
            out = moe_triton(x2, ids, weights, self, out_dtype)
        else:
            out = moe_torch(x2, ids, weights, self, out_dtype)
        return out.view(x.shape)


def route(x: torch.Tensor, mw: MoEWeights):
    """x [T, H] -> (expert ids [T, k], routing weights [T, k] in x's dtype), as HF routes."""
    logits = _router_logits(x, mw.router_w)
    if mw.router_b is not None:
        logits = logits + mw.router_b
    if mw.kind == "qwen3":  # softmax over all experts (float32), top-k, renormalised
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, ids = torch.topk(probs, mw.top_k, dim=-1)
        if mw.norm_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top.to(logits.dtype)
    top, ids = torch.topk(logits, mw.top_k, dim=-1)  # GPT-OSS: top-k logits, softmax over k
    return ids, torch.softmax(top, dim=-1, dtype=top.dtype)


def _router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T, row invariant on CUDA (the bias is added apart): the skinny GEMM in 16-bit;
    in float32 (which it does not take, and cuBLAS picks kernels by M) the down kernel with
    every token routed to one 'expert' w, exact fp32 products."""
    if x.dtype != torch.float32 or not kernel_supported(x, None):
        return linear(x, w)
    t, n, k = x.shape[0], w.shape[0], w.shape[1]
    bn, bk = block_config(n, k, 1, 0)
    ids = torch.zeros((t, 1), device=x.device, dtype=torch.int32)
    out = torch.empty((t, n), device=x.device, dtype=torch.float32)
    w3 = w[None]
    _moe_down_kernel[(1, triton.cdiv(n, bn))](
        x.contiguous(), ids, w3, w3, out, t, n, k, w3.stride(0), w3.stride(1), w3.stride(2), 0,
        TOPK=1, TOPK_P2=2, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=False, IEEE=True, num_warps=4)
    return out


def _activation(gate, up, mw: MoEWeights):
    if mw.kind == "qwen3":
        return torch.nn.functional.silu(gate) * up
    gate = gate.clamp(max=mw.limit)
    up = up.clamp(min=-mw.limit, max=mw.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * mw.alpha))


def moe_torch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mw: MoEWeights,
              out_dtype=None):
    """The kernels' math in torch: every expert on every token (fixed shapes), fp32 (fp64 for
    fp64 inputs) accumulation, the activation rounded to x's dtype, slots summed in order."""
    acc_t = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc_t)
    j = torch.arange(mw.inter, device=x.device) * mw.gu_step
    ys = []
    for e in range(mw.n_experts):
        gate = xf @ mw.w_gu[e, j].to(acc_t).T
        up = xf @ mw.w_gu[e, j + mw.gu_up].to(acc_t).T
        if mw.b_gu is not None:
            gate, up = gate + mw.b_gu[e, j].to(acc_t), up + mw.b_gu[e, j + mw.gu_up].to(acc_t)
        act = _activation(gate, up, mw).to(x.dtype).to(acc_t)
        y = act @ mw.w_d[e].to(acc_t).T
        ys.append(y + mw.b_d[e].to(acc_t) if mw.b_d is not None else y)
    ys = torch.stack(ys)  # [E, T, H]
    rows = torch.arange(x.shape[0], device=x.device)
    out = torch.zeros_like(xf)
    for s in range(mw.top_k):
        out = out + weights[:, s, None].to(acc_t) * ys[ids[:, s], rows]
    return out.to(out_dtype or x.dtype)


def kernel_supported(x: torch.Tensor, mw: MoEWeights | None) -> bool:
    return (triton is not None and x.is_cuda and x.shape[0] <= MAX_T
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (mw is None or mw.w_gu.dtype == x.dtype and mw.w_d.dtype == x.dtype))


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def block_config(n: int, k: int, top_k: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for an [N, K] expert GEMM: a function of the shapes only (row
    invariance), the widest N tile that still gives one token's k experts two programs per
    multiprocessor."""
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    for block_n in (64, 32):
        if top_k * triton.cdiv(n, block_n) >= 2 * sms:
            return block_n, block_k
    return 16, block_k


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _routed_rows(ids_ptr, e, T, TOPK: tl.constexpr, TOPK_P2: tl.constexpr):
        """For the 16 token rows: whether each is routed to expert e, and in which slot."""
        rows = tl.arange(0, 16)
        slots = tl.arange(0, TOPK_P2)
        ok = (rows[:, None] < T) & (slots[None, :] < TOPK)
        ids = tl.load(ids_ptr + rows[:, None] * TOPK + slots[None, :], mask=ok, other=-1)
        hit = ids == e
        routed = tl.max(hit.to(tl.int32), axis=1) > 0
        slot = tl.sum(tl.where(hit, slots[None, :], 0), axis=1)
        return rows, routed, slot

    @triton.jit
    def _mma(acc, a, b, IEEE: tl.constexpr):
        if IEEE:  # float32 weights: exact fp32 products, not TF32
            return acc + tl.dot(a, b, input_precision="ieee")
        return acc + tl.dot(a, b)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, ids_ptr, w_ptr, b_ptr, act_ptr, T, N, K, s_we, s_wn, s_wk,
                            s_be, up_off, limit, alpha,
                            TOPK: tl.constexpr, TOPK_P2: tl.constexpr, STEP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr):
        """act[t * TOPK + slot, j] for the tokens routed to this program's expert; N = I."""
        e = tl.program_id(0)
        rows, routed, slot = _routed_rows(ids_ptr, e, T, TOPK, TOPK_P2)
        if tl.max(routed.to(tl.int32), axis=0) == 0:
            return
        c = tl.arange(0, 2 * BLOCK_N)  # columns: gate j, up j, gate j+1, up j+1, ...
        j = tl.program_id(1) * BLOCK_N + c // 2
        wrow = j * STEP + (c % 2) * up_off
        n_ok = j < N
        w_base = w_ptr + e.to(tl.int64) * s_we + wrow[None, :] * s_wn
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + rows[:, None] * K + kk[None, :],
                        mask=(rows[:, None] < T) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_base + kk[:, None] * s_wk, mask=n_ok[None, :] & (kk[:, None] < K),
                        other=0.0)
            acc = _mma(acc, x, w, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * s_be + wrow, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (16, BLOCK_N, 2)))
        if ACT == 0:  # SwiGLU
            y = gate / (1.0 + tl.exp(-gate)) * up
        else:  # GPT-OSS: clamped, (up + 1) * gate * sigmoid(alpha * gate)
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            y = (up + 1.0) * (gate / (1.0 + tl.exp(-gate * alpha)))
        offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        dst = act_ptr + (rows * TOPK + slot)[:, None] * N + offs_j[None, :]
        tl.store(dst, y.to(act_ptr.dtype.element_ty), mask=routed[:, None] & (offs_j[None, :] < N))

    @triton.jit
    def _moe_down_kernel(act_ptr, ids_ptr, w_ptr, b_ptr, y_ptr, T, N, K, s_we, s_wn, s_wk,
                         s_be, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        """y[t * TOPK + slot, n] (fp32) = act row @ Wd[e]^T + bd[e]; N = H, K = I."""
        e = tl.program_id(0)
        rows, routed, slot = _routed_rows(ids_ptr, e, T, TOPK, TOPK_P2)
        if tl.max(routed.to(tl.int32), axis=0) == 0:
            return
        src = rows * TOPK + slot
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_base = w_ptr + e.to(tl.int64) * s_we + offs_n[None, :] * s_wn
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(act_ptr + src[:, None] * K + kk[None, :],
                        mask=routed[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(w_base + kk[:, None] * s_wk, mask=n_ok[None, :] & (kk[:, None] < K),
                        other=0.0)
            acc = _mma(acc, a, w, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * s_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + src[:, None] * N + offs_n[None, :], acc,
                 mask=routed[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_combine_kernel(y_ptr, wt_ptr, out_ptr, N, TOPK: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = sum over slots 0..TOPK-1, in order, of w[t, s] * y[t, s] (fp32)."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(TOPK):
            w = tl.load(wt_ptr + t * TOPK + s)
            acc += w * tl.load(y_ptr + (t * TOPK + s) * N + offs, mask=ok, other=0.0)
        tl.store(out_ptr + t * N + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def moe_triton(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mw: MoEWeights,
               out_dtype=None):
    """The three kernels on x [T, H] (T <= 16) -> [T, H] in ``out_dtype`` (x's)."""
    x = x.contiguous()
    t, h = x.shape
    k, n_exp, inter = mw.top_k, mw.n_experts, mw.inter
    ids = ids.to(torch.int32).contiguous()
    wt = weights.to(torch.float32).contiguous()
    sms = _sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 132  # (the Triton interpreter runs on CPU tensors)
    ieee = x.dtype == torch.float32
    kp2 = max(2, triton.next_power_of_2(k))
    act = torch.empty((t * k, inter), device=x.device, dtype=x.dtype)
    bn, bk = block_config(inter, h, k, sms)
    w, b = mw.w_gu, mw.b_gu
    _moe_gate_up_kernel[(n_exp, triton.cdiv(inter, bn))](
        x, ids, w, b if b is not None else w, act, t, inter, h, w.stride(0), w.stride(1),
        w.stride(2), b.stride(0) if b is not None else 0, mw.gu_up,
        float(mw.limit or 0.0), float(mw.alpha or 0.0), TOPK=k, TOPK_P2=kp2, STEP=mw.gu_step,
        BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=b is not None, ACT=0 if mw.kind == "qwen3" else 1,
        IEEE=ieee, num_warps=4)
    y = torch.empty((t * k, h), device=x.device, dtype=torch.float32)
    bn, bk = block_config(h, inter, k, sms)
    w, b = mw.w_d, mw.b_d
    _moe_down_kernel[(n_exp, triton.cdiv(h, bn))](
        act, ids, w, b if b is not None else w, y, t, h, inter, w.stride(0), w.stride(1),
        w.stride(2), b.stride(0) if b is not None else 0, TOPK=k, TOPK_P2=kp2, BLOCK_N=bn,
        BLOCK_K=bk, HAS_BIAS=b is not None, IEEE=ieee, num_warps=4)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    block = min(1024, triton.next_power_of_2(h))
    _moe_combine_kernel[(t, triton.cdiv(h, block))](y, wt, out, h, TOPK=k, BLOCK=block,
                                                   num_warps=4)
    return out
