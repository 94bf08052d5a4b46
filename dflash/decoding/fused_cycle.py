"""The decoding cycle of graph mode, captured whole: one CUDA graph per block size.

With a small pair a cycle is host-bound: the unfused loop launches a draft graph, a verify
graph and a context-append graph, each after copying its inputs, plus ~15 small tensor ops
(block, argmax, concatenation, acceptance), each costing the host microseconds while the GPU
waits. Here the whole cycle (block, draft, proposals, verify, acceptance, context append, and
the next cycle's anchor token and position) is one graph per (block size, drafted size, with
or without a draft), replayed with one launch. The anchor token and its position live in
device tensors that the graph itself advances, so a replay copies no inputs; the host reads
the packed result once per cycle, as before. Greedy (:class:`GreedyCycle`) runs the same
kernels in the same order as the unfused path, so the tokens are bitwise the same. Off the
GPU it runs eagerly (the CPU graph-mode tests use it); ``DFLASH_FUSED_CYCLE=0`` turns it off.

Sampling (temperature > 0, DFlash 1 drafts or none) has its own cycle graph,
:class:`SamplingCycle`: filtered draft distribution q, proposals drawn from it, verify,
filtered target distribution p, exact acceptance and the residual/bonus draw, all on the
device. Its randomness comes from a generator of its own, registered with every CUDA graph so
that each replay draws fresh numbers, and seeded from the caller's generator (or the default
one) once per generation: the same seed gives the same tokens (not the unfused loop's: the
law is the same, the draws differ). Top-k laws are kept sparse over their support
(``sampling.sparse_filtered``), so only two topk passes touch the whole vocabulary.

On CUDA the sampling cycle runs fused Triton kernels (``dflash.engine.cuda.sampling``: 5
launches a cycle) for the unfiltered law and for top-k <= its K_MAX with any top-p; their
randomness is a Philox stream keyed by a device tensor ``rng`` = [seed, counter] that the
last kernel of each cycle advances (seeded with the generator, saved around the warm-up
runs). Other filters (top-p alone, larger top-k) keep the torch path, which is also the
path off the GPU and the oracle. ``DFLASH_SAMPLING_KERNELS=0`` turns the kernels off; ``=1``
also runs them on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import os

import torch

from ..engine.cuda import sampling as sampling_kernels
from .sampling import (TOPK_CANDIDATES_MAX, filtered_probs, greedy_accept, sample,
                       sparse_filtered, speculative_accept)


def fused_cycle_enabled() -> bool:
    return os.environ.get("DFLASH_FUSED_CYCLE", "1") != "0"


def sampling_kernels_enabled(rows: torch.Tensor) -> bool:
    """The sampling cycle's Triton kernels for these logits: on CUDA unless
    DFLASH_SAMPLING_KERNELS=0; on CPU only with DFLASH_SAMPLING_KERNELS=1 under
    TRITON_INTERPRET=1."""
    flag = os.environ.get("DFLASH_SAMPLING_KERNELS")
    if flag == "0" or sampling_kernels.triton is None:
        return False
    if rows.is_cuda:
        return True
    return flag == "1" and sampling_kernels.available(rows)


class _CycleGraph:
    """One graph per (block size, drafted size) of ``_cycle``; the anchor token and its
    position are device tensors that each cycle advances itself."""

    def __init__(self, target, draft, mask_id: int, device: torch.device):
        self.target, self.draft, self.mask_id = target, draft, mask_id
        self.last = torch.zeros(1, dtype=torch.long, device=device)   # the block's anchor token
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # and its position
        self.capture = device.type == "cuda"
        self._graphs: dict = {}
        self._offsets: dict[int, torch.Tensor] = {}
        self._pool = None
        self.gen: torch.Generator | None = None  # the cycle's own randomness (sampling)
        self.rng: torch.Tensor | None = None  # the kernels' [seed, counter] (sampling)

    def begin(self, last: torch.Tensor, start: int) -> None:
        """Set the first cycle's anchor token (device tensor, [1]) and position."""
        self.last.copy_(last.reshape(1))
        self.start.fill_(start)

    def run(self, b: int, nd: int) -> torch.Tensor:
        if not self.capture:
            return self._cycle(b, nd)
        key = (b, nd)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(b, nd)
        graph, out = entry
        graph.replay()
        return out

    def _offs(self, n: int) -> torch.Tensor:
        if n not in self._offsets:
            self._offsets[n] = torch.arange(n, device=self.last.device)
        return self._offsets[n]

    def _block(self, nd: int) -> torch.Tensor:
        """The drafted block [1, nd]: [last, MASK...]."""
        return torch.where(self._offs(nd) == 0, self.last, self.mask_id)[None]

    def _finish(self, accepted, proposals, nxt, t_feats, pos) -> torch.Tensor:
        """Context append, the next anchor (the token after the accepted prefix, one past its
        position), and the packed [accepted, proposals (b-1), next tokens (b)]."""
        packed = torch.cat([accepted.reshape(1), proposals, nxt])
        if self.draft is not None:
            # the whole verified block (fixed shape); rows past tau are overwritten before any
            # query can see them
            self.draft._append_context(t_feats, pos)
        self.last.copy_(nxt.gather(0, accepted.reshape(1)))
        self.start.add_(accepted + 1)
        return packed

    def _cycle(self, b: int, nd: int) -> torch.Tensor:
        raise NotImplementedError

    def _warmed(self, b: int, nd: int) -> None:
        """Two eager cycles on a side stream (compiles, allocates); state restored after
        (the generator's too: warm-up draws must not shift the seeded stream)."""
        saved = (self.last.clone(), self.start.clone())
        rng = self.gen.get_state() if self.gen is not None else None
        counter = self.rng.clone() if self.rng is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._cycle(b, nd)
                self.last.copy_(saved[0])
                self.start.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(stream)
        if rng is not None:
            self.gen.set_state(rng)
        if counter is not None:
            self.rng.copy_(counter)

    def _capture(self, b: int, nd: int):
        self._warmed(b, nd)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        if self.gen is not None:
            graph.register_generator_state(self.gen)  # each replay draws fresh numbers
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._cycle(b, nd)
        return graph, out


class GreedyCycle(_CycleGraph):
    """``run(b, nd)`` -> packed [1 + (b-1) + b] int64 on the device: accepted count, the b-1
    proposals, then the target's greedy token after each block slot (see ``greedy_accept``).

    ``target``/``draft``: a StaticTargetEngine and a DraftEngine (or None) in graph mode.
    ``nd`` >= b is the number of tokens drafted (truncation mode drafts more than it verifies).
    """

    def _cycle(self, b: int, nd: int) -> torch.Tensor:
        pos_all = self.start + self._offs(nd)  # [nd] positions of the drafted block
        pos = pos_all[:b]
        if b > 1:
            proposals = self.draft._propose_greedy(self._block(nd), pos_all, None)[:b - 1]
        else:
            proposals = self.last[:0]
        t_logits, t_feats = self.target._forward(torch.cat([self.last, proposals])[None], pos,
                                                 None)
        accepted, nxt = greedy_accept(proposals, t_logits[0])
        return self._finish(accepted, proposals, nxt, t_feats, pos)


class SamplingCycle(_CycleGraph):
    """The sampling cycle at fixed ``(temperature, top_p, top_k)``; same ``run`` and packed
    layout as :class:`GreedyCycle` (entry ``b + accepted`` is the token to emit after the
    accepted proposals: residual or bonus sample). DFlash 1 drafts (logits per slot) or none.

    Proposals are drawn from the filtered draft distribution q, one per slot independently
    (truncation mode keeps the first b-1 of the nd-1 drafted), then
    :func:`~dflash.decoding.sampling.speculative_accept` against the filtered target p.
    On CUDA, for the laws ``dflash.engine.cuda.sampling.mode`` takes, the same steps run as
    its Triton kernels (randomness from ``self.rng``); ``kernels_used`` says which law they
    ran in the last traced cycle (None: the torch path)."""

    def __init__(self, target, draft, mask_id: int, device: torch.device, temperature: float,
                 top_p: float = 1.0, top_k: int = 0):
        super().__init__(target, draft, mask_id, device)
        self.filters = (temperature, top_p, top_k)
        self.gen = torch.Generator(device=device)
        self.rng = sampling_kernels.new_rng(device)
        self.kernels_used: str | None = None  # the kernels' law ("dense"/"sparse") once run

    def seed(self, generator=None) -> None:
        """Seed this cycle's generator from ``generator`` (or the default one of its device):
        one draw per generation, so a seeded caller gets the same tokens every time."""
        device = generator.device if generator is not None else self.gen.device
        seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device)
        value = int(seed.item())
        self.gen.manual_seed(value)
        self.rng.copy_(torch.tensor([value, 0], dtype=torch.int64))

    def _law(self, logits: torch.Tensor):
        """(ids or None, probs): top-k laws sparse over their support, others dense."""
        t, top_p, top_k = self.filters
        if 0 < top_k < min(logits.shape[-1], TOPK_CANDIDATES_MAX + 1):
            return sparse_filtered(logits, t, top_p, top_k)
        return None, filtered_probs(logits, t, top_p, top_k)

    def _kernel_mode(self, rows: torch.Tensor) -> str | None:
        """The kernels' law for these rows, or None for the torch path."""
        if not sampling_kernels_enabled(rows):
            return None
        _, top_p, top_k = self.filters
        return sampling_kernels.mode(rows.shape[-1], top_p, top_k)

    def _cycle(self, b: int, nd: int) -> torch.Tensor:
        t, top_p, top_k = self.filters
        ks = sampling_kernels
        pos_all = self.start + self._offs(nd)
        pos = pos_all[:b]
        proposals = self.last[:0]
        kind = d_logits = lse_q = q_ids = q = None
        if b > 1:
            d_logits = self.draft._propose_logits(self._block(nd), pos_all, None)[0, :b - 1]
            kind = self._kernel_mode(d_logits)
            if kind is not None and d_logits.stride(-1) != 1:
                d_logits = d_logits.contiguous()
            if kind == "dense":
                proposals, lse_q = ks.dense_propose(d_logits, t, self.rng)
            elif kind == "sparse":
                q_ids, q, proposals = ks.sparse_law(d_logits, t, top_p, top_k, self.rng)
            else:
                q_ids, q = self._law(d_logits)
                proposals = sample(q, self.gen, q_ids)
        t_logits, t_feats = self.target._forward(torch.cat([self.last, proposals])[None], pos,
                                                 None)
        rows = t_logits[0]
        if b == 1:
            kind = self._kernel_mode(rows)
        if kind is not None and rows.stride(-1) != 1:
            rows = rows.contiguous()
        if kind == "dense":
            accepted, nxt = ks.dense_accept(rows, proposals, d_logits, lse_q, t, self.rng)
        elif kind == "sparse":
            p_ids, p, _ = ks.sparse_law(rows, t, top_p, top_k)
            accepted, nxt = ks.sparse_accept(proposals, q_ids, q, p_ids, p, self.rng)
        else:
            p_ids, p = self._law(rows)
            if b == 1:
                q_ids, q = (None if p_ids is None else p_ids[:0]), p[:0]
            accepted, nxt = speculative_accept(proposals, q, p, self.gen, q_ids, p_ids)
        self.kernels_used = kind
        return self._finish(accepted, proposals, nxt, t_feats, pos)
