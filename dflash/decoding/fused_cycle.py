"""The greedy decoding cycle of graph mode, captured whole: one CUDA graph per block size.

With a small pair a cycle is host-bound: the unfused loop launches a draft graph, a verify
graph and a context-append graph, each after copying its inputs, plus ~15 small tensor ops
(block, argmax, concatenation, acceptance), each costing the host microseconds while the GPU
waits. Here the whole cycle (block, draft, proposals, verify, acceptance, context append, and
the next cycle's anchor token and position) is one graph per (block size, drafted size, with
or without a draft), replayed with one launch. The anchor token and its position live in
device tensors that the graph itself advances, so a replay copies no inputs; the host reads
the packed result once per cycle, as before. It runs the same kernels in the same order as
the unfused path, so the tokens are bitwise the same. Off the GPU it runs eagerly (the CPU
graph-mode tests use it); ``DFLASH_FUSED_CYCLE=0`` turns it off.
"""
from __future__ import annotations

import os

import torch

from .sampling import greedy_accept


def fused_cycle_enabled() -> bool:
    return os.environ.get("DFLASH_FUSED_CYCLE", "1") != "0"


class GreedyCycle:
    """``run(b, nd)`` -> packed [1 + (b-1) + b] int64 on the device: accepted count, the b-1
    proposals, then the target's greedy token after each block slot (see ``greedy_accept``).

    ``target``/``draft``: a StaticTargetEngine and a DraftEngine (or None) in graph mode.
    ``nd`` >= b is the number of tokens drafted (truncation mode drafts more than it verifies).
    """

    def __init__(self, target, draft, mask_id: int, device: torch.device):
        self.target, self.draft, self.mask_id = target, draft, mask_id
        self.last = torch.zeros(1, dtype=torch.long, device=device)   # the block's anchor token
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # and its position
        self.capture = device.type == "cuda"
        self._graphs: dict = {}
        self._offsets: dict[int, torch.Tensor] = {}
        self._pool = None

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

    def _cycle(self, b: int, nd: int) -> torch.Tensor:
        last, start = self.last, self.start
        pos_all = start + self._offs(nd)  # [nd] positions of the drafted block
        pos = pos_all[:b]
        if b > 1:
            block = torch.where(self._offs(nd) == 0, last, self.mask_id)[None]  # [last, MASK...]
            proposals = self.draft._propose_greedy(block, pos_all, None)[:b - 1]
        else:
            proposals = last[:0]
        t_logits, t_feats = self.target._forward(torch.cat([last, proposals])[None], pos, None)
        accepted, nxt = greedy_accept(proposals, t_logits[0])
        packed = torch.cat([accepted.reshape(1), proposals, nxt])
        if self.draft is not None:
            # the whole verified block (fixed shape); rows past tau are overwritten before any
            # query can see them
            self.draft._append_context(t_feats, pos)
        # the next cycle's anchor: the token after the accepted prefix, one past its position
        last.copy_(nxt.gather(0, accepted.reshape(1)))
        start.add_(accepted + 1)
        return packed

    def _capture(self, b: int, nd: int):
        saved = (self.last.clone(), self.start.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles, allocates); state restored after
            for _ in range(2):
                self._cycle(b, nd)
                self.last.copy_(saved[0])
                self.start.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._cycle(b, nd)
        return graph, out
