"""Fused Triton kernels for the sampling cycle (``decoding.fused_cycle.SamplingCycle``).

The law is :func:`dflash.decoding.sampling.probs_at`'s, exactly (filtered target and draft
alike, acceptance with ``min(1, p/q)``, residual ``max(0, p - q)`` at the first rejection,
bonus from the last row when every proposal is accepted, zero residual mass -> a draw from
p); only the draws differ from the torch path. Fixed shapes, no host syncs, graph-capturable.

Randomness: Philox (``tl.randint4x``) keyed by ``rng[0]`` (a seed) with ``rng[1]`` (a cycle
counter) as the high 32 bits of every counter; the low 32 bits are ``use << 28 | index``,
so every number a cycle draws has its own counter (use 0: the proposals' races, 1: the
acceptance uniforms, 2: the residual/bonus race). The last kernel of a cycle advances
``rng[1]`` on the device, so each graph replay draws fresh numbers. Draws are races: the
argmax of ``log w - log E`` over the slots, E = -log(1 - U) ~ Exp(1) (Gumbel-max), ties to
the lowest index; E is computed from U's fine grid near 0 (31 bits), so the small E that
win races are not quantised to float32's 2^-24 steps near 1 (~1% ties among the top draws
of a flat 152k row otherwise).

Two laws are covered (:func:`mode`):

* ``"dense"`` (top_k 0 or >= V, top_p 1): rows are split into chunks; one pass gives each
  chunk's max and sum of exp of logits / T (and, for the draft rows, the chunk's race
  winner), a tiny combine gives each row's log-normaliser and the proposals. Acceptance
  needs only ``p(x_i) = exp(l_p[i, x_i] / T - lse_p[i])`` and q likewise; the residual race
  over row ``a`` runs chunked (each program recomputes the accepted count ``a``, a handful
  of gathers), then one program picks the winner. 5 launches per cycle, 2 of them drafts'.
* ``"sparse"`` (1 <= top_k <= K_MAX, top_k < V; any top_p): a two-stage stable top-k on
  int64 keys (monotone image of the value << 32 | ~id: value descending, then id ascending,
  probs_at's stable order; 16-bit logits compared as they are, float32 ones after / T, as
  :func:`~dflash.decoding.sampling.sparse_filtered`). Stage 1 (grid rows x chunks) takes a
  chunk as NG groups of G columns, keeps the KP groups with the largest max keys (they hold
  the chunk's KP largest keys: each key outside them has KP larger group maxima above it),
  and a top-KP of their KP*G keys; stage 2 (one program, one warp, per row) merges the
  chunks' sorted lists (bitonic: slot-wise max with the next list reversed, one merge), then
  softmax / T, the top-p prefix (keep while the mass *before* a token is < top_p) and
  the renormalisation give a sparse law (ids [KP], probs [KP]) per row; draft rows draw
  their proposal there. One program then does acceptance and the residual over the sparse
  rows. 5 launches per cycle, 2 of them drafts'.

Anything else (top-p without top-k, top_k > K_MAX, DFlash 2 drafts) keeps the torch path
(``mode`` returns None). Used on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch

from .kernels import triton

K_MAX = 256
_USE_SHIFT = 28  # the low 32 bits of a Philox counter: use << 28 | index
DENSE_CHUNK = 4096  # columns per program of the dense passes (4 Philox outputs per call)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def available(*tensors) -> bool:
    """Kernels run on CUDA tensors; under TRITON_INTERPRET=1 on CPU ones too."""
    if triton is None:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def mode(vocab: int, top_p: float, top_k: int) -> str | None:
    """"dense", "sparse", or None where the torch path stays."""
    if top_p >= 1.0 and (top_k <= 0 or top_k >= vocab):
        return "dense"
    if 0 < top_k < vocab and top_k <= K_MAX:
        return "sparse"
    return None


def dense_chunk() -> int:
    """Columns per program of the dense passes (a power of 2 >= 64); DFLASH_DENSE_CHUNK
    overrides DENSE_CHUNK (tuning)."""
    return int(os.environ.get("DFLASH_DENSE_CHUNK", DENSE_CHUNK))


def topk_config(kp: int) -> tuple[int, int]:
    """(groups NG, group width G) of stage 1 for KP = the top-k rounded up to a power of 2:
    a chunk is NG * G columns; its second top-k runs over KP * G keys. DFLASH_TOPK_CONFIG
    = "NG,G" overrides (tuning; NG >= KP, both powers of 2)."""
    env = os.environ.get("DFLASH_TOPK_CONFIG")
    if env:
        ng, g = (int(v) for v in env.split(","))
        return max(ng, kp), g
    if kp <= 64:
        return 512, 16
    if kp <= 128:
        return 512, 8
    return 1024, 4


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _uniform4(seed, counter, lo):
        """Four U[0, 1) blocks at the Philox counters (counter << 32) + lo."""
        off = (counter << 32) + lo.to(tl.int64)
        a, b, c, d = tl.randint4x(seed, off)
        return (tl.random.uint_to_uniform_float(a), tl.random.uint_to_uniform_float(b),
                tl.random.uint_to_uniform_float(c), tl.random.uint_to_uniform_float(d))

    @triton.jit
    def _uniform(seed, counter, lo):
        off = (counter << 32) + lo.to(tl.int64)
        a, _, _, _ = tl.randint4x(seed, off)
        return tl.random.uint_to_uniform_float(a)

    @triton.jit
    def _gumbel(u):
        """-log(E), E = -log(1 - U) ~ Exp(1). U's fine grid near 0 (not float32's 2^-24 one
        near 1) sets the small E that decide races: -log1p(-U) by its series for U < 2^-6;
        U = 0 is taken as 2^-33 (E = 0 would win whatever the weight)."""
        v = tl.maximum(u, 1.1641532e-10)
        series = v * (1.0 + v * (0.5 + v * (0.33333334 + v * 0.25)))
        e = tl.where(v < 0.015625, series, -tl.log(1.0 - v))
        return -tl.log(e)

    @triton.jit
    def _better(k1, i1, k2, i2):
        """The race winner of two (key, index) candidates: larger key, then lower index."""
        take = (k2 > k1) | ((k2 == k1) & (i2 < i1))
        return tl.where(take, k2, k1), tl.where(take, i2, i1)

    @triton.jit
    def _race_winner(keys, ids):
        """(max key, the lowest id holding it) of a block; keys may be -inf."""
        best = tl.max(keys, axis=0)
        big = 2147483647
        win = tl.min(tl.where(keys == best, ids, big), axis=0)
        return best, win

    # ---- dense ---------------------------------------------------------------------------

    @triton.jit
    def _dense_stats_kernel(x_ptr, stride, V, temperature, rng_ptr, m_ptr, s_ptr, wk_ptr,
                            wi_ptr, NCH, CHUNK: tl.constexpr, RACE: tl.constexpr):
        """Grid (rows, chunks): the chunk's max and sum of exp of x = logits / T; with RACE
        the chunk's race winner (key x - log E, id) for the row's proposal (use 0)."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        d = tl.program_id(2)  # the draw (tests: independent draws of the same rows)
        Q: tl.constexpr = CHUNK // 4
        j = tl.arange(0, Q)
        base = c * CHUNK
        c0 = base + j
        c1 = c0 + Q
        c2 = c1 + Q
        c3 = c2 + Q
        rp = x_ptr + row.to(tl.int64) * stride
        x0 = tl.load(rp + c0, mask=c0 < V, other=float("-inf")).to(tl.float32) / temperature
        x1 = tl.load(rp + c1, mask=c1 < V, other=float("-inf")).to(tl.float32) / temperature
        x2 = tl.load(rp + c2, mask=c2 < V, other=float("-inf")).to(tl.float32) / temperature
        x3 = tl.load(rp + c3, mask=c3 < V, other=float("-inf")).to(tl.float32) / temperature
        m = tl.maximum(tl.maximum(tl.max(x0, axis=0), tl.max(x1, axis=0)),
                       tl.maximum(tl.max(x2, axis=0), tl.max(x3, axis=0)))
        m = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf logits: sum 0, not NaN
        s = (tl.sum(tl.exp(x0 - m), axis=0) + tl.sum(tl.exp(x1 - m), axis=0)
             + tl.sum(tl.exp(x2 - m), axis=0) + tl.sum(tl.exp(x3 - m), axis=0))
        out = (d * tl.num_programs(0) + row) * NCH + c
        tl.store(m_ptr + out, m)
        tl.store(s_ptr + out, s)
        if RACE:
            seed = tl.load(rng_ptr + 2 * d)
            counter = tl.load(rng_ptr + 2 * d + 1)
            lo = (0 << 28) + (row * NCH + c) * Q + j
            u0, u1, u2, u3 = _uniform4(seed, counter, lo)
            k0, i0 = _race_winner(x0 + _gumbel(u0), c0)
            k1, i1 = _race_winner(x1 + _gumbel(u1), c1)
            k2, i2 = _race_winner(x2 + _gumbel(u2), c2)
            k3, i3 = _race_winner(x3 + _gumbel(u3), c3)
            k0, i0 = _better(k0, i0, k1, i1)
            k2, i2 = _better(k2, i2, k3, i3)
            k0, i0 = _better(k0, i0, k2, i2)
            tl.store(wk_ptr + out, k0)
            tl.store(wi_ptr + out, i0)

    @triton.jit
    def _lse_rows(m_ptr, s_ptr, rows, NCH, R_P2: tl.constexpr, NCH_P2: tl.constexpr):
        """Each row's log-normaliser from its chunks' (max, sum exp) ([R_P2], rows masked)."""
        r = tl.arange(0, R_P2)[:, None]
        c = tl.arange(0, NCH_P2)[None, :]
        ok = (r < rows) & (c < NCH)
        m = tl.load(m_ptr + r * NCH + c, mask=ok, other=float("-inf"))
        s = tl.load(s_ptr + r * NCH + c, mask=ok, other=0.0)
        big = tl.max(m, axis=1)
        big = tl.where(big == float("-inf"), 0.0, big)
        return big + tl.log(tl.sum(s * tl.exp(m - big[:, None]), axis=1))

    @triton.jit
    def _dense_pick_kernel(m_ptr, s_ptr, wk_ptr, wi_ptr, lse_ptr, tok_ptr, rows, NCH,
                           R_P2: tl.constexpr, NCH_P2: tl.constexpr):
        """Grid (draws,): every row's lse and its proposal (the chunks' best race winner)."""
        d = tl.program_id(0)
        m_ptr += d * rows * NCH
        s_ptr += d * rows * NCH
        wk_ptr += d * rows * NCH
        wi_ptr += d * rows * NCH
        lse = _lse_rows(m_ptr, s_ptr, rows, NCH, R_P2, NCH_P2)
        r = tl.arange(0, R_P2)
        tl.store(lse_ptr + d * rows + r, lse, mask=r < rows)
        c = tl.arange(0, NCH_P2)[None, :]
        ok = (r[:, None] < rows) & (c < NCH)
        k = tl.load(wk_ptr + r[:, None] * NCH + c, mask=ok, other=float("-inf"))
        i = tl.load(wi_ptr + r[:, None] * NCH + c, mask=ok, other=2147483647)
        best = tl.max(k, axis=1)
        win = tl.min(tl.where(k == best[:, None], i, 2147483647), axis=1)
        tl.store(tok_ptr + d * rows + r, win.to(tl.int64), mask=r < rows)

    @triton.jit
    def _dense_residual_kernel(pl_ptr, p_stride, ql_ptr, q_stride, prop_ptr, lseq_ptr,
                               pm_ptr, ps_ptr, rng_ptr, acc_ptr, mass_ptr, rk_ptr, ri_ptr,
                               pk_ptr, pi_ptr, b, n, V, temperature, NCH,
                               CHUNK: tl.constexpr, B_P2: tl.constexpr, NCH_P2: tl.constexpr):
        """Grid (chunks,): every program recomputes lse_p, the acceptance test and the
        accepted count a (a few gathers); then over its columns of row a the residual
        r = max(0, p - q) (q = 0 when a = n: the bonus row): its mass and its race winner,
        and the race winner for p itself (for zero residual mass). Program 0 stores a."""
        c = tl.program_id(0)
        d = tl.program_id(1)  # the draw (tests: independent draws of the same rows)
        rng_ptr += 2 * d
        pm_ptr += d * b * NCH
        ps_ptr += d * b * NCH
        prop_ptr += d * n
        lseq_ptr += d * n
        acc_ptr += d
        mass_ptr += d * NCH
        rk_ptr += d * NCH
        ri_ptr += d * NCH
        pk_ptr += d * NCH
        pi_ptr += d * NCH
        seed = tl.load(rng_ptr)
        counter = tl.load(rng_ptr + 1)
        lse_p = _lse_rows(pm_ptr, ps_ptr, b, NCH, B_P2, NCH_P2)  # [B_P2]
        i = tl.arange(0, B_P2)
        live = i < n
        x = tl.load(prop_ptr + i, mask=live, other=0)
        lp = tl.load(pl_ptr + i.to(tl.int64) * p_stride + x, mask=live, other=0.0)
        lq = tl.load(ql_ptr + i.to(tl.int64) * q_stride + x, mask=live, other=0.0)
        lse_q = tl.load(lseq_ptr + i, mask=live, other=0.0)
        p_at = tl.exp(lp.to(tl.float32) / temperature - lse_p)
        q_at = tl.exp(lq.to(tl.float32) / temperature - lse_q)
        u = _uniform(seed, counter, (1 << 28) + i)
        ok = (u * q_at < p_at) | (i >= n)
        a = tl.minimum(tl.min(tl.where(ok, B_P2, i), axis=0), n)
        if c == 0:
            tl.store(acc_ptr, a.to(tl.int64))
        lse_pa = tl.sum(tl.where(i == a, lse_p, 0.0), axis=0)
        qa = tl.minimum(a, tl.maximum(n - 1, 0))
        lse_qa = tl.load(lseq_ptr + qa, mask=n > 0, other=0.0)
        has_q = a < n
        Q: tl.constexpr = CHUNK // 4
        j = tl.arange(0, Q)
        prow = pl_ptr + a.to(tl.int64) * p_stride
        qrow = ql_ptr + qa.to(tl.int64) * q_stride
        lo = (2 << 28) + c * Q + j
        u0, u1, u2, u3 = _uniform4(seed, counter, lo)
        mass = 0.0
        rk = float("-inf")
        ri = 2147483647
        pk = float("-inf")
        pi = 2147483647
        for s in tl.static_range(4):
            cols = c * CHUNK + s * Q + j
            inside = cols < V
            xp = tl.load(prow + cols, mask=inside, other=float("-inf")).to(tl.float32)
            xp = xp / temperature - lse_pa
            xq = tl.load(qrow + cols, mask=inside & has_q, other=float("-inf")).to(tl.float32)
            xq = xq / temperature - lse_qa
            r = tl.maximum(tl.exp(xp) - tl.exp(xq), 0.0)
            mass += tl.sum(r, axis=0)
            if s == 0:
                g = _gumbel(u0)
            elif s == 1:
                g = _gumbel(u1)
            elif s == 2:
                g = _gumbel(u2)
            else:
                g = _gumbel(u3)
            k1, i1 = _race_winner(tl.log(r) + g, cols)
            rk, ri = _better(rk, ri, k1, i1)
            k2, i2 = _race_winner(xp + g, cols)
            pk, pi = _better(pk, pi, k2, i2)
        tl.store(mass_ptr + c, mass)
        tl.store(rk_ptr + c, rk)
        tl.store(ri_ptr + c, ri)
        tl.store(pk_ptr + c, pk)
        tl.store(pi_ptr + c, pi)

    @triton.jit
    def _dense_final_kernel(acc_ptr, mass_ptr, rk_ptr, ri_ptr, pk_ptr, pi_ptr, nxt_ptr,
                            rng_ptr, b, NCH, NCH_P2: tl.constexpr, B_P2: tl.constexpr):
        """One program: the residual's winner (p's where the residual has no mass) into
        every entry of nxt [b]; advances the cycle counter. Grid (draws,)."""
        d = tl.program_id(0)
        acc_ptr += d
        mass_ptr += d * NCH
        rk_ptr += d * NCH
        ri_ptr += d * NCH
        pk_ptr += d * NCH
        pi_ptr += d * NCH
        nxt_ptr += d * b
        rng_ptr += 2 * d
        c = tl.arange(0, NCH_P2)
        ok = c < NCH
        mass = tl.sum(tl.load(mass_ptr + c, mask=ok, other=0.0), axis=0)
        rk = tl.load(rk_ptr + c, mask=ok, other=float("-inf"))
        ri = tl.load(ri_ptr + c, mask=ok, other=2147483647)
        pk = tl.load(pk_ptr + c, mask=ok, other=float("-inf"))
        pi = tl.load(pi_ptr + c, mask=ok, other=2147483647)
        _, rwin = _race_winner(rk, ri)
        _, pwin = _race_winner(pk, pi)
        tok = tl.where(mass > 0, rwin, pwin).to(tl.int64)
        i = tl.arange(0, B_P2)
        tl.store(nxt_ptr + i, tok + i * 0, mask=i < b)
        tl.store(rng_ptr + 1, tl.load(rng_ptr + 1) + 1)

    # ---- sparse (top-k) ------------------------------------------------------------------

    @triton.jit
    def _keys(x, cols, temperature, SHORT: tl.constexpr):
        """int64 keys of value x (logits as loaded, float32; masked: -inf) at ``cols``:
        value descending then id ascending is key descending. 16-bit logits compare as
        they are, float32 ones after / T; -0.0 is +0.0 (they compare equal)."""
        v = x if SHORT else x / temperature
        v = tl.where(v == 0.0, 0.0, v)
        bits = v.to(tl.int32, bitcast=True)
        img = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (img.to(tl.int64) << 32) + (4294967295 - cols.to(tl.int64))

    @triton.jit
    def _unkey(key, temperature, SHORT: tl.constexpr):
        """(id, value / T as float32) of keys."""
        ids = 4294967295 - (key & 4294967295)
        img = (key >> 32).to(tl.int32)
        bits = tl.where(img >= 0, img, img ^ 0x7FFFFFFF)
        v = bits.to(tl.float32, bitcast=True)
        return ids, (v / temperature if SHORT else v)

    @triton.jit
    def _topk_chunk_kernel(x_ptr, stride, V, temperature, cand_ptr, NCH,
                           NG: tl.constexpr, G: tl.constexpr, KP: tl.constexpr,
                           SHORT: tl.constexpr):
        """Grid (rows, chunks): the chunk's KP largest keys, descending, into
        cand [rows, NCH, KP] (padding: the smallest int64)."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        base = c * (NG * G)
        g = tl.arange(0, NG)[:, None]
        j = tl.arange(0, G)[None, :]
        cols = base + g * G + j
        rp = x_ptr + row.to(tl.int64) * stride
        none = -9223372036854775807 - 1
        x = tl.load(rp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        keys = tl.where(cols < V, _keys(x, cols, temperature, SHORT), none)
        top = tl.topk(tl.max(keys, axis=1), KP)  # the KP groups with the largest maxima
        gid = ((4294967295 - (top & 4294967295)) - base) // G
        sel = base + gid[:, None] * G + j  # [KP, G]
        real = (top != none)[:, None] & (sel < V)
        x2 = tl.load(rp + sel, mask=real, other=float("-inf")).to(tl.float32)
        k2 = tl.where(real, _keys(x2, sel, temperature, SHORT), none)
        best = tl.topk(tl.reshape(k2, [KP * G]), KP)
        out = (row * NCH + c) * KP + tl.arange(0, KP)
        tl.store(cand_ptr + out, best)

    @triton.jit
    def _topk_merge_kernel(cand_ptr, top_k, top_p, temperature, ids_ptr, probs_ptr,
                           rng_ptr, tok_ptr, NCH: tl.constexpr, KP: tl.constexpr, SHORT: tl.constexpr,
                           TOP_P: tl.constexpr, RACE: tl.constexpr):
        """One program per row: merge the chunks' lists into the row's top_k keys (slots
        0..top_k-1 of KP), softmax of their values / T, the top-p prefix, renormalise:
        ids [rows, KP] int64, probs [rows, KP] float32 (0 past the kept prefix). RACE: the
        row's proposal drawn from that law (use 0)."""
        row = tl.program_id(0)
        d = tl.program_id(1)  # the draw (tests: independent draws of the same rows)
        s = tl.arange(0, KP)
        src = cand_ptr + row * NCH * KP
        best = tl.load(src + s)
        for c in range(1, NCH):
            more = tl.load(src + c * KP + s)
            # both sorted descending: the slot-wise max of one and the other reversed holds
            # the KP largest of the two (a bitonic sequence); one bitonic merge sorts it
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(more, 0)), descending=True)
        ids, v = _unkey(best, temperature, SHORT)
        kept = s < top_k
        v = tl.where(kept, v, float("-inf"))
        e = tl.where(kept, tl.exp(v - tl.max(v, axis=0)), 0.0)
        w = e / tl.sum(e, axis=0)
        if TOP_P:
            before = tl.cumsum(w, axis=0) - w  # the mass of the more likely tokens
            w = tl.where(kept & (before < top_p), w, 0.0)
            w = w / tl.sum(w, axis=0)
        out = row * KP + s
        if d == 0:
            tl.store(ids_ptr + out, ids)
            tl.store(probs_ptr + out, w)
        if RACE:
            seed = tl.load(rng_ptr + 2 * d)
            counter = tl.load(rng_ptr + 2 * d + 1)
            u = _uniform(seed, counter, (0 << 28) + out)
            _, slot = _race_winner(tl.log(w) + _gumbel(u), s)
            tl.store(tok_ptr + d * tl.num_programs(0) + row,
                     tl.sum(tl.where(s == slot, ids, 0), axis=0))

    @triton.jit
    def _sparse_accept_kernel(prop_ptr, qi_ptr, qp_ptr, pi_ptr, pp_ptr, rng_ptr, acc_ptr,
                              nxt_ptr, b, n, KP: tl.constexpr, B_P2: tl.constexpr,
                              QB: tl.constexpr):
        """One program: p(x_i), q(x_i) from the sparse rows, the accepted count a (use 1),
        the residual max(0, p_a - q_a) on p_a's slots (q = 0 when a = n), its race (use 2;
        p_a's own where it has no mass); a -> acc, the token -> every entry of nxt [b];
        advances the cycle counter. Grid (draws,)."""
        d = tl.program_id(0)
        rng_ptr += 2 * d
        prop_ptr += d * n
        acc_ptr += d
        nxt_ptr += d * b
        seed = tl.load(rng_ptr)
        counter = tl.load(rng_ptr + 1)
        i = tl.arange(0, B_P2)
        s = tl.arange(0, KP)
        live = i < n
        x = tl.load(prop_ptr + i, mask=live, other=-1)
        tile = i[:, None] * KP + s[None, :]
        lv = live[:, None] & (s[None, :] < KP)
        p_at = tl.sum(tl.where((tl.load(pi_ptr + tile, mask=lv, other=-2) == x[:, None]),
                               tl.load(pp_ptr + tile, mask=lv, other=0.0), 0.0), axis=1)
        q_at = tl.sum(tl.where((tl.load(qi_ptr + tile, mask=lv, other=-2) == x[:, None]),
                               tl.load(qp_ptr + tile, mask=lv, other=0.0), 0.0), axis=1)
        u = _uniform(seed, counter, (1 << 28) + i)
        ok = (u * q_at < p_at) | (i >= n)
        a = tl.minimum(tl.min(tl.where(ok, B_P2, i), axis=0), n)
        has_q = a < n
        qa = tl.minimum(a, tl.maximum(n - 1, 0))
        p_ids = tl.load(pi_ptr + a * KP + s)
        p_w = tl.load(pp_ptr + a * KP + s)
        q_w = tl.zeros([KP], tl.float32)
        for q0 in tl.static_range(0, KP, QB):
            t = q0 + tl.arange(0, QB)
            qid = tl.load(qi_ptr + qa * KP + t, mask=has_q, other=-2)
            qw = tl.load(qp_ptr + qa * KP + t, mask=has_q, other=0.0)
            q_w += tl.sum(tl.where(p_ids[:, None] == qid[None, :], qw[None, :], 0.0), axis=1)
        r = tl.maximum(p_w - q_w, 0.0)
        g = _gumbel(_uniform(seed, counter, (2 << 28) + s))
        w = tl.where(tl.sum(r, axis=0) > 0, r, p_w)
        _, slot = _race_winner(tl.log(w) + g, s)
        tok = tl.sum(tl.where(s == slot, p_ids, 0), axis=0)
        tl.store(acc_ptr, a.to(tl.int64))
        j = tl.arange(0, B_P2)
        tl.store(nxt_ptr + j, tok + j * 0, mask=j < b)
        tl.store(rng_ptr + 1, counter + 1)


# ---- launchers ------------------------------------------------------------------------------
#
# ``rng``: int64 [2] (seed, counter): one draw, outputs without a draw axis; or [D, 2] (tests):
# D independent draws of the same rows in one launch, outputs with a leading draw axis [D, ...].

def _rows(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(-1) == 1, "rows [n, V] with contiguous columns"
    return x


def _draws(rng: torch.Tensor) -> tuple[int, tuple]:
    assert rng.dtype == torch.int64 and rng.shape[-1] == 2 and rng.is_contiguous()
    return (1, ()) if rng.dim() == 1 else (rng.shape[0], (rng.shape[0],))


def new_rng(device) -> torch.Tensor:
    """The cycle's random state: int64 [seed, counter] on ``device``."""
    return torch.zeros(2, dtype=torch.int64, device=device)


def dense_propose(logits: torch.Tensor, temperature: float, rng: torch.Tensor,
                  chunk: int | None = None):
    """Unfiltered draft rows [n, V] -> (proposals [n] int64, lse [n] float32): a draw from
    softmax(logits / T) per row (use 0 of ``rng``'s counter; does not advance it)."""
    x = _rows(logits)
    n, vocab = x.shape
    nd, lead = _draws(rng)
    chunk = chunk or dense_chunk()
    nch = triton.cdiv(vocab, chunk)
    assert n * nch * chunk < (1 << _USE_SHIFT)
    f = dict(dtype=torch.float32, device=x.device)
    m, s, wk = (torch.empty(nd * n * nch, **f) for _ in range(3))
    wi = torch.empty(nd * n * nch, dtype=torch.int32, device=x.device)
    _dense_stats_kernel[(n, nch, nd)](x, x.stride(0), vocab, float(temperature), rng, m, s, wk,
                                      wi, nch, CHUNK=chunk, RACE=True, num_warps=4)
    lse = torch.empty(*lead, n, **f)
    tok = torch.empty(*lead, n, dtype=torch.int64, device=x.device)
    _dense_pick_kernel[(nd,)](m, s, wk, wi, lse, tok, n, nch, R_P2=_pow2(max(n, 2)),
                              NCH_P2=_pow2(max(nch, 2)), num_warps=4)
    return tok, lse


def dense_lse(logits: torch.Tensor, temperature: float, chunk: int | None = None):
    """Rows [n, V] -> log-normalisers of logits / T [n] (the stats and combine kernels)."""
    x = _rows(logits)
    n, vocab = x.shape
    chunk = chunk or dense_chunk()
    nch = triton.cdiv(vocab, chunk)
    f = dict(dtype=torch.float32, device=x.device)
    m, s = torch.empty(n * nch, **f), torch.empty(n * nch, **f)
    _dense_stats_kernel[(n, nch, 1)](x, x.stride(0), vocab, float(temperature), m, m, s, m, m,
                                     nch, CHUNK=chunk, RACE=False, num_warps=4)
    lse = torch.empty(n, **f)
    unused = torch.empty(n, dtype=torch.int64, device=x.device)
    _dense_pick_kernel[(1,)](m, s, m, s, lse, unused, n, nch, R_P2=_pow2(max(n, 2)),
                             NCH_P2=_pow2(max(nch, 2)), num_warps=4)
    return lse


def dense_accept(target_logits: torch.Tensor, proposals: torch.Tensor,
                 draft_logits: torch.Tensor | None, lse_q: torch.Tensor | None,
                 temperature: float, rng: torch.Tensor, chunk: int | None = None):
    """Target rows [b, V], the b-1 proposals, the draft rows [b-1, V] and their lse
    (``dense_propose``) -> (accepted [1] int64, next tokens [b] int64, every entry the
    token after the accepted prefix), as ``speculative_accept`` on softmax(logits / T)
    (uses 1 and 2); advances ``rng``'s counter."""
    pl = _rows(target_logits)
    b, vocab = pl.shape
    n = b - 1
    nd, lead = _draws(rng)
    chunk = chunk or dense_chunk()
    nch = triton.cdiv(vocab, chunk)
    assert b * nch * chunk < (1 << _USE_SHIFT)
    dev = pl.device
    f = dict(dtype=torch.float32, device=dev)
    pm, ps = torch.empty(nd * b * nch, **f), torch.empty(nd * b * nch, **f)
    # the target's stats are the same for every draw: computed once, read with stride 0
    pm1, ps1 = pm[:b * nch], ps[:b * nch]
    _dense_stats_kernel[(b, nch, 1)](pl, pl.stride(0), vocab, float(temperature), rng, pm1,
                                     ps1, pm, pm, nch, CHUNK=chunk, RACE=False, num_warps=4)
    if nd > 1:
        pm.view(nd, -1)[1:] = pm1
        ps.view(nd, -1)[1:] = ps1
    acc = torch.empty(*lead, 1, dtype=torch.int64, device=dev)
    if n == 0:  # no proposals: the draft arguments are never read
        ql, lse_q, proposals = pl, pm, acc
    else:
        ql = _rows(draft_logits)
        assert ql.shape == (n, vocab)
    mass, rk, pk = (torch.empty(nd * nch, **f) for _ in range(3))
    ri, pi = (torch.empty(nd * nch, dtype=torch.int32, device=dev) for _ in range(2))
    b_p2, nch_p2 = _pow2(max(b, 2)), _pow2(max(nch, 2))
    _dense_residual_kernel[(nch, nd)](pl, pl.stride(0), ql, ql.stride(0), proposals, lse_q, pm,
                                      ps, rng, acc, mass, rk, ri, pk, pi, b, n, vocab,
                                      float(temperature), nch, CHUNK=chunk, B_P2=b_p2,
                                      NCH_P2=nch_p2, num_warps=4)
    nxt = torch.empty(*lead, b, dtype=torch.int64, device=dev)
    _dense_final_kernel[(nd,)](acc, mass, rk, ri, pk, pi, nxt, rng, b, nch, NCH_P2=nch_p2,
                               B_P2=b_p2, num_warps=4)
    return acc, nxt


def sparse_law(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
               rng: torch.Tensor | None = None, config: tuple[int, int] | None = None):
    """probs_at's law for 0 < top_k <= K_MAX, top_k < V, any top_p, on its support:
    (ids [n, KP] int64, probs [n, KP] float32; slots past the kept prefix have probability
    0, their ids are meaningless), and with ``rng`` one draw per row from it (proposals
    [n] int64, use 0; else None). ``config``: (NG, G) of stage 1 (tests: small chunks)."""
    x = _rows(logits)
    n, vocab = x.shape
    assert 0 < top_k < vocab and top_k <= K_MAX
    kp = max(2, _pow2(top_k))  # tl.topk needs k >= 2
    ng, g = config or topk_config(kp)
    assert ng >= kp
    nch = triton.cdiv(vocab, ng * g)
    dev = x.device
    short = x.element_size() == 2
    cand = torch.empty(n * nch * kp, dtype=torch.int64, device=dev)
    _topk_chunk_kernel[(n, nch)](x, x.stride(0), vocab, float(temperature), cand, nch, NG=ng,
                                 G=g, KP=kp, SHORT=short, num_warps=8)
    ids = torch.empty(n, kp, dtype=torch.int64, device=dev)
    probs = torch.empty(n, kp, dtype=torch.float32, device=dev)
    nd, lead = _draws(rng) if rng is not None else (1, ())
    tok = torch.empty(*lead, n, dtype=torch.int64, device=dev) if rng is not None else None
    _topk_merge_kernel[(n, nd)](cand, int(top_k), float(top_p), float(temperature), ids, probs,
                                rng if rng is not None else ids,
                                tok if tok is not None else ids, NCH=nch, KP=kp, SHORT=short,
                                TOP_P=top_p < 1.0, RACE=rng is not None, num_warps=1)
    return ids, probs, tok


def sparse_accept(proposals: torch.Tensor, q_ids, q_probs, p_ids: torch.Tensor,
                  p_probs: torch.Tensor, rng: torch.Tensor):
    """speculative_accept over sparse rows (``sparse_law``): p [b, KP], q [b-1, KP] ->
    (accepted [1] int64, next tokens [b] int64) (uses 1 and 2); advances ``rng``'s
    counter."""
    b, kp = p_ids.shape
    n = b - 1
    nd, lead = _draws(rng)
    dev = p_ids.device
    acc = torch.empty(*lead, 1, dtype=torch.int64, device=dev)
    if n == 0:  # no proposals: the draft arguments are never read
        q_ids, q_probs, proposals = p_ids, p_probs, acc
    nxt = torch.empty(*lead, b, dtype=torch.int64, device=dev)
    _sparse_accept_kernel[(nd,)](proposals, q_ids, q_probs, p_ids, p_probs, rng, acc, nxt, b, n,
                                 KP=kp, B_P2=_pow2(max(b, 2)), QB=min(kp, 32), num_warps=4)
    return acc, nxt
