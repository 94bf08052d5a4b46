"""The decoding loop: plain autoregressive (block size 1) and DFlash speculative decoding.

One loop serves both, on either engine. A cycle drafts a block ``[last, MASK x (b-1)]``,
verifies it with one target forward, accepts the longest matching prefix (greedy) or applies
exact speculative sampling (temperature > 0), emits the accepted proposals plus one bonus
token, and feeds the verified positions' target features to the draft. The only host sync in
a cycle is reading back the accepted tokens.
"""
from __future__ import annotations

import time

import torch

from ..engine.select import Engines, synchronize
from ..errors import UserError
from ..model.draft import DFlashDraft
from .fused_cycle import GreedyCycle, SamplingCycle, fused_cycle_enabled
from .result import BlockPolicy, CycleStat, FixedPolicy, GenerationResult, emit
from .sampling import check_sampling, choose, greedy_accept, probs_at, speculative_accept


def _checked_size(b, draft) -> int:
    b = int(b)
    if b < 1:
        raise UserError(f"block-size policy chose {b}; block sizes must be >= 1")
    if b > 1 and draft is None:
        raise UserError("block size > 1 needs a draft model")
    return b


class _Timer:
    """Device-event timing on CUDA, host clock elsewhere; only used with collect_profile."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


class SpeculativeDecoder:
    """Decodes with ``target`` (HF causal LM) and an optional DFlash ``draft``.

    ``engine``: auto, fast, static or hf (``dflash.engine.select``); ``engines`` holds the
    target and draft engines once ``reserve`` or ``generate`` has built them.
    """

    def __init__(self, target, draft: DFlashDraft | None = None, engine: str = "auto",
                 compile: bool = True, _cpu_graph_mode: bool = False):
        self.target, self.draft = target, draft
        if draft is not None:
            draft.check_target(target)
        self.feature_layers = draft.target_layer_ids if draft is not None else [0]
        self.engines = Engines(target, draft, engine, feature_layers=self.feature_layers,
                               compile=compile, cpu_graph_mode=_cpu_graph_mode)
        self.device, self.engine_name = self.engines.device, self.engines.name
        self.graphs = self.engines.graphs
        # whole-cycle graphs: per (with a draft?, sampling settings or None when greedy)
        self._cycles: dict[tuple, GreedyCycle | SamplingCycle] = {}
        self._cycles_of = None  # ... of this target engine

    def reserve(self, tokens: int) -> None:
        """Allocate caches (and later graphs) for sequences up to ``tokens`` long, up front."""
        self.engines.ensure(tokens)

    def _greedy_cycle(self, target, draft, mask_id: int) -> GreedyCycle:
        return self._fused_cycle(target, draft, mask_id, None)

    def _fused_cycle(self, target, draft, mask_id: int, sampling: tuple | None):
        """The fused cycle of the current engines (rebuilt with them): greedy, or sampling at
        ``sampling`` = (temperature, top_p, top_k)."""
        if self._cycles_of is not target:  # engines rebuilt: drop the old graphs
            self._cycles, self._cycles_of = {}, target
        key = (draft is not None, sampling)
        if key not in self._cycles:
            self._cycles[key] = (GreedyCycle(target, draft, mask_id, self.device)
                                 if sampling is None else
                                 SamplingCycle(target, draft, mask_id, self.device, *sampling))
        return self._cycles[key]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 stop_token_ids=None, block_size: int | None = None,
                 policy: BlockPolicy | None = None, generator: torch.Generator | None = None,
                 collect_profile: bool = False, max_block_size: int | None = None,
                 draft_block_size: int | None = None, top_p: float = 1.0,
                 top_k: int = 0) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``input_ids`` [1, P] (or [P]).

        ``draft_block_size`` (truncation mode): a cycle of block size ``b`` smaller than it
        still drafts a full block of ``draft_block_size`` tokens (the size the draft was
        trained at) and verifies only its first ``b`` (anchor + first ``b-1`` proposals), so
        a small block is a prefix of the large one instead of a weaker draft. ``None``: the
        draft runs natively at ``b``. Lossless either way: each position's proposal is drawn
        independently, so the verified prefix is distributed as its own marginals.

        ``top_p`` / ``top_k`` (temperature > 0; ignored when greedy) filter target and draft
        alike (``dflash.decoding.sampling.probs_at``); emitted tokens follow the filtered target
        distribution exactly. The defaults (1.0, 0) are the unfiltered path, unchanged.

        DFlash 2 drafts: proposals are the candidate selector's walk; at T > 0 its proposal
        distribution (mass on each position's candidate ids only, unfiltered as in the
        reference) goes into the same exact acceptance and residual ``max(0, p - q)``. A block
        size below the trained one is drafted natively at that size; truncation mode keeps the
        first b-1 steps of the walk over the drafted block (a prefix of a walk is itself a walk
        with the same conditionals, so it stays exact)."""
        if policy is None:
            policy = FixedPolicy(block_size or (self.draft.block_size if self.draft else 1))
        temperature, top_p, top_k = check_sampling(temperature, top_p, top_k)
        ids = input_ids.reshape(-1).to(self.device)
        prompt_len = ids.numel()
        if max_new_tokens <= 0:
            return GenerationResult(output_ids=[], prompt_len=prompt_len, ttft_s=0.0, total_s=0.0)
        stops = set(int(s) for s in (stop_token_ids if stop_token_ids is not None else []))
        biggest = max_block_size or getattr(policy, "max_block_size", None) or 64
        if draft_block_size is not None:
            if draft_block_size < 2:
                raise UserError(f"draft block size must be >= 2, got {draft_block_size}")
            biggest = max(biggest, draft_block_size)
        target, draft = self.engines.ensure(prompt_len + max_new_tokens + biggest + 1)
        if isinstance(policy, FixedPolicy) and policy.block_size == 1:
            draft = None  # the autoregressive baseline does no draft work at all
        greedy = temperature <= 0
        timer = _Timer(self.device) if collect_profile else None
        # Eager runs attend over the filled prefix only; graph replays need fixed shapes, so
        # they attend over the whole buffer under a positional mask.
        eager = not self.graphs

        synchronize(self.device)
        t0 = time.perf_counter()
        positions = torch.arange(prompt_len, device=self.device)
        logits, feats = target.forward(ids[None], positions, kv_len=prompt_len)  # prefill: eager
        last = choose(logits[0, -1:], temperature, generator, top_p, top_k)  # [1]
        first = int(last.item())
        ttft = time.perf_counter() - t0
        output = [first]
        stopped = first in stops
        if draft is not None:
            draft.append_context(feats, positions)
        start = prompt_len
        cycles: list[CycleStat] = []
        pending = None  # the last cycle's policy.update arguments, applied during the next
        mask_id = self.draft.mask_token_id if self.draft is not None else 0
        dflash2 = draft is not None and self.draft.is_dflash2
        vocab = draft.lm_head.weight.shape[0] if dflash2 else 0
        # Graph mode: the whole cycle is one graph replay (decoding/fused_cycle.py); sampling
        # with DFlash 1 drafts or none (DFlash 2 samples its walk in the unfused loop).
        fused = (self.graphs and timer is None and fused_cycle_enabled()
                 and (greedy or not dflash2))
        if fused and not stopped:
            cycle = self._fused_cycle(target, draft, mask_id,
                                      None if greedy else (temperature, top_p, top_k))
            cycle.begin(last, start)
            if not greedy:
                cycle.seed(generator)

        b_next = None
        while fused and not stopped and len(output) < max_new_tokens:
            c0 = time.perf_counter()
            b = b_next if b_next is not None else _checked_size(policy.select(len(cycles)), draft)
            packed_dev = cycle.run(b, max(b, draft_block_size or b) if b > 1 else 1)
            # The policy's Python runs while the GPU works on this cycle: the report of the
            # previous cycle (as below), then the choice for the next one. The choice sees
            # exactly what it would see after this cycle's read (this cycle is reported only
            # during the next), but is made before anyone knows whether the generation goes
            # on: at an end (stop token, length) it can go unused.
            if pending is not None:
                policy.update(*pending)
                pending = None
            b_next = (_checked_size(policy.select(len(cycles) + 1), draft)
                      if len(output) + 1 < max_new_tokens else None)
            packed = packed_dev.tolist()  # the one host read of the cycle
            acc = packed[0]
            tau = acc + 1  # the graph itself advanced the anchor token and position
            stopped = emit(output, packed[1:1 + acc] + [packed[b + acc]], stops, max_new_tokens)
            cycle_s = time.perf_counter() - c0
            cycles.append(CycleStat(block_size=b, tau=tau, cycle_s=cycle_s))
            pending = (tau, cycle_s, b, len(cycles) - 1)

        while not fused and not stopped and len(output) < max_new_tokens:
            c0 = time.perf_counter()
            b = _checked_size(policy.select(len(cycles)), draft)
            pos = torch.arange(start, start + b, device=self.device)
            kv = start + b if eager else None
            ev = [timer.mark()] if timer else None
            if b > 1:
                # Truncation mode drafts at the trained size and keeps the first b-1 proposals.
                nd = max(b, draft_block_size or b)
                dpos = pos if nd == b else torch.arange(start, start + nd, device=self.device)
                block = torch.full((1, nd), mask_id, dtype=ids.dtype, device=self.device)
                block[0, 0] = last[0]
                d_kv = start + nd if eager else None
                if dflash2:
                    proposals, q, cand = draft.propose_tokens(block, dpos, d_kv, temperature,
                                                              generator)
                    proposals = proposals[:b - 1]
                    if not greedy:  # the candidates' q as a distribution over the vocabulary
                        q = torch.zeros(b - 1, vocab, device=self.device).scatter_(
                            -1, cand[:b - 1], q[:b - 1])
                else:
                    d_logits = draft.propose_logits(block, dpos, kv_len=d_kv)[0, :b - 1]
                    if greedy:
                        proposals = d_logits.argmax(dim=-1)
                    else:
                        q = probs_at(d_logits, temperature, top_p, top_k)
                        proposals = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                verify_ids = torch.cat([last, proposals])[None]
            else:
                proposals = last[:0]
                verify_ids = last[None]
            if timer:
                ev.append(timer.mark())
            t_logits, t_feats = target.forward(verify_ids, pos, kv_len=kv)
            t_logits = t_logits[0]
            if greedy:
                accepted, nxt = greedy_accept(proposals, t_logits)
            else:
                accepted, nxt = speculative_accept(
                    proposals, q, probs_at(t_logits, temperature, top_p, top_k), generator) \
                    if b > 1 else (torch.zeros((), dtype=torch.int64, device=self.device),
                                   choose(t_logits, temperature, generator, top_p, top_k))
            if timer:
                ev.append(timer.mark())
            if pending is not None:
                # Report the previous cycle now, while the GPU works on this one: the policy's
                # Python (tens of microseconds) overlaps GPU work instead of lengthening a
                # sub-millisecond cycle. So the policy decides with one cycle of lag.
                policy.update(*pending)
                pending = None
            # The one host read of the cycle: accepted count, proposals and next tokens.
            packed = torch.cat([accepted.reshape(1), proposals, nxt]).tolist()
            acc = packed[0]
            new_tokens = packed[1:1 + acc] + [packed[b + acc]]
            tau = acc + 1
            if draft is not None:
                # Graph mode appends the whole block (fixed shape); rows past tau are
                # overwritten before any query can see them.
                if eager:
                    draft.append_context(t_feats[:, :tau], pos[:tau])
                else:
                    draft.append_context(t_feats, pos)
            last = nxt[acc:acc + 1]
            start += tau
            stopped = emit(output, new_tokens, stops, max_new_tokens)
            cycle_s = time.perf_counter() - c0
            stat = CycleStat(block_size=b, tau=tau, cycle_s=cycle_s)
            if timer:
                stat.draft_s = timer.elapsed(ev[0], ev[1]) if b > 1 else 0.0
                stat.verify_s = timer.elapsed(ev[1], ev[2])
            cycles.append(stat)
            pending = (tau, cycle_s, b, len(cycles) - 1)
        synchronize(self.device)
        total = time.perf_counter() - t0
        if pending is not None:  # the last cycle, reported outside the timed region
            policy.update(*pending)
        output = output[:max_new_tokens]
        return GenerationResult(output_ids=output, prompt_len=prompt_len, ttft_s=ttft,
                                total_s=total, cycles=cycles, stopped=stopped)
