"""Inference-time block-size schedulers for DFlash speculative decoding.

Both schedulers implement the decoder's ``BlockPolicy`` protocol::

    b = policy.select(cycle_idx)                 # before each cycle
    policy.update(tau, cycle_s, b, cycle_idx)    # after it

and expose ``max_block_size`` (the largest candidate) so the decoder can size its buffers.

``EWMAScheduler`` is the scheduler of the spec (QUICK_EXPERIMENTS.md section 4): per candidate an
EWMA of tau and of the cycle time, score ``tau_hat / cycle_hat``, round-robin warm-up,
hysteresis (margin + streak), cooldown, periodic probes and a low-acceptance fallback.

``CostModelScheduler`` is an alternative that needs almost no probing. A greedy cycle with block
``B`` accepts a run of ``r`` draft tokens; the same run tells what a block ``b <= B`` would have
yielded (``tau_b = min(r + 1, b)``) and, when the run ended inside the block, what any larger
block would have yielded too. The scheduler keeps decayed per-position acceptance counts
(a discrete survival model), derives ``E[tau(b)]`` for every candidate from them, measures
each candidate's cycle cost relative to the largest from neighbouring cycles (so a machine
whose speed drifts does not bias it), and runs ``argmax_b E[tau(b)] / c(b)``.

Pure Python: no torch import, so the schedulers can be unit-tested on synthetic traces.
One instance follows one generation; call ``reset()`` between prompts (``CostModelScheduler``
can keep its cost measurements across prompts: ``reset(keep_costs=True)``). Both can also keep
all their estimates and their current choice: ``reset(keep_estimates=True)`` (a long-running
server would; the spec's scheduler starts afresh per prompt, which is the default).
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import UserError
from .costmodel import DIRECT_MIN_WEIGHT, DIRECT_TOLERANCE, EAGER_DECISIONS, CostModelScheduler
from .schedule_base import (DEFAULT_CANDIDATES, POLICIES, _Bookkeeping, _check_int, _check_real,
                            parse_candidates)

# The cost-model scheduler and the shared parts live in costmodel.py / schedule_base.py (module
# size); this stays the one import place for both schedulers.
__all__ = ["CostModelScheduler", "DEFAULT_CANDIDATES", "DIRECT_MIN_WEIGHT", "DIRECT_TOLERANCE",
           "EAGER_DECISIONS", "EWMAScheduler", "POLICIES", "PROBE_BAND", "make_scheduler",
           "parse_candidates"]

# EWMAScheduler: a probed candidate scoring this much below the current one is probed less often.
PROBE_BAND = 0.15


class EWMAScheduler(_Bookkeeping):
    """Throughput-greedy scheduler over EWMA estimates (the spec's scheduler).

    Warm-up: candidates are run round-robin (ascending) until each has ``warmup_cycles``
    measurements; then the best-scoring one becomes current. After warm-up, every
    ``probe_interval``-th cycle is a probe: one cycle at the least recently measured other
    candidate, then back to current; a candidate that scores more than 15% below the current one
    when probed waits 2x, 4x, then 8x the interval for its next probe. After each measurement the best candidate by
    ``tau_hat / cycle_hat`` challenges the current one; it takes over once it has beaten the
    current score by more than ``switch_margin`` (relative) on ``required_streak`` consecutive
    updates. Low-acceptance fallback: ``low_accept_streak`` consecutive cycles at the current
    size with ``tau / block_size < low_accept_threshold`` step down to the next smaller candidate,
    provided that candidate's own score is within ``switch_margin`` of the current one's.
    No switch of either kind happens during the ``cooldown_cycles`` cycles after a switch.
    Cycles whose block size is not a candidate (e.g. a shortened tail block) only count in
    ``block_counts``; they do not touch the estimates.
    """

    name = "ewma"

    def __init__(self, candidates: Sequence[int] | str = DEFAULT_CANDIDATES, warmup_cycles: int = 2,
                 ewma_alpha: float = 0.10, switch_margin: float = 0.05, required_streak: int = 2,
                 cooldown_cycles: int = 2, probe_interval: int = 12,
                 low_accept_threshold: float = 0.35, low_accept_streak: int = 2):
        self.candidates = parse_candidates(candidates)
        self.warmup_cycles = _check_int("warmup_cycles", warmup_cycles, 1)
        self.alpha = _check_real("ewma_alpha", ewma_alpha, 0.0, 1.0, lo_open=True)
        self.switch_margin = _check_real("switch_margin", switch_margin, 0.0, math.inf)
        self.required_streak = _check_int("required_streak", required_streak, 1)
        self.cooldown_cycles = _check_int("cooldown_cycles", cooldown_cycles, 0)
        self.probe_interval = _check_int("probe_interval", probe_interval, 0)  # 0: no probes
        self.low_accept_threshold = _check_real("low_accept_threshold", low_accept_threshold,
                                                0.0, 1.0)
        self.low_accept_streak = _check_int("low_accept_streak", low_accept_streak, 1)
        self.max_block_size = self.candidates[-1]
        self.reset()

    def reset(self, keep_estimates: bool = False) -> None:
        """Start a new generation: forget everything, or with ``keep_estimates`` keep the
        EWMAs, probe back-offs and current size (no new warm-up), and only restart counters."""
        if keep_estimates and self.current is not None:
            # probe staleness is counted in cycles of this generation: carry it over
            self._last_seen = {b: s - self.cycles for b, s in self._last_seen.items()}
            self._challenger, self._streak, self._cooldown, self._low_streak = None, 0, 0, 0
            self._probing = None
            self._reset_counters()
            return
        self.tau_hat: dict[int, float | None] = {b: None for b in self.candidates}
        self.cycle_hat: dict[int, float | None] = {b: None for b in self.candidates}
        self.n_obs = {b: 0 for b in self.candidates}
        self._last_seen = {b: -1 for b in self.candidates}  # update counter of last measurement
        self._backoff = {b: 1 for b in self.candidates}  # probe-interval multiplier per candidate
        self.current: int | None = None
        self._rr = 0                 # round-robin pointer for warm-up
        self._post_warmup = 0        # decisions made after warm-up (drives probes)
        self._challenger: int | None = None
        self._streak = 0
        self._cooldown = 0
        self._low_streak = 0
        self._reset_counters()

    # -- estimates
    @property
    def warming_up(self) -> bool:
        return any(n < self.warmup_cycles for n in self.n_obs.values())

    def score(self, b: int) -> float:
        t, c = self.tau_hat[b], self.cycle_hat[b]
        if t is None or c is None:
            return 0.0
        return t / max(c, 1e-12)

    def best(self) -> int:
        # ties go to the larger block (more tokens per cycle for the same throughput estimate)
        return max(self.candidates, key=lambda b: (self.score(b), b))

    def _ensure_current(self) -> None:
        if self.current is None and not self.warming_up:
            self.current = self.best()

    # -- protocol
    def select(self, cycle_idx: int) -> int:
        if self.warming_up:
            n = len(self.candidates)
            for k in range(n):
                b = self.candidates[(self._rr + k) % n]
                if self.n_obs[b] < self.warmup_cycles:
                    self._rr = (self._rr + k + 1) % n
                    self.trace.append((b, "warmup"))
                    return b
        self._ensure_current()
        self._post_warmup += 1
        # A candidate that stays clearly worse when probed is probed less and less often
        # (interval x1, x2, x4, x8), so probing a poor size costs little.
        others = [b for b in self.candidates if b != self.current
                  and self.cycles - self._last_seen[b] >= self.probe_interval * self._backoff[b]]
        if (self.probe_interval and others
                and self._post_warmup % self.probe_interval == 0):
            b = min(others, key=lambda c: (self._last_seen[c], c))
            self.probes += 1
            self._probing = b
            self.trace.append((b, "probe"))
            return b
        self.trace.append((self.current, "current"))
        return self.current

    def update(self, tau: int, cycle_s: float, block_size: int, cycle_idx: int) -> None:
        self.cycles += 1
        self.block_counts[block_size] += 1
        if block_size not in self.tau_hat:
            return  # tail / foreign block size: no estimate update
        a = self.alpha
        prev_t, prev_c = self.tau_hat[block_size], self.cycle_hat[block_size]
        self.tau_hat[block_size] = float(tau) if prev_t is None else (1 - a) * prev_t + a * tau
        self.cycle_hat[block_size] = (float(cycle_s) if prev_c is None
                                      else (1 - a) * prev_c + a * cycle_s)
        self.n_obs[block_size] += 1
        self._last_seen[block_size] = self.cycles
        if self.warming_up:
            return
        if getattr(self, "_probing", None) == block_size and self.current is not None:
            worse = self.score(block_size) < self.score(self.current) * (1.0 - PROBE_BAND)
            self._backoff[block_size] = min(8, 2 * self._backoff[block_size]) if worse else 1
        self._probing = None
        self._ensure_current()

        in_cooldown = self._cooldown > 0
        if in_cooldown:
            self._cooldown -= 1

        # low-acceptance fallback, judged on cycles at the current size only
        if block_size == self.current:
            if tau / block_size < self.low_accept_threshold:
                self._low_streak += 1
            else:
                self._low_streak = 0
        smaller = [b for b in self.candidates if b < self.current]
        # The step-down is taken only when the smaller size is competitive by its own
        # measurements: with a draft trained at one block size, a smaller block can accept
        # far less, and a burst of early rejections is no reason to switch to it.
        if (not in_cooldown and smaller and self._low_streak >= self.low_accept_streak
                and self.score(smaller[-1]) >= self.score(self.current) * (1.0 - self.switch_margin)):
            self._switch_to(smaller[-1])
            self.fallbacks += 1
            return
        if in_cooldown:
            self._challenger, self._streak = None, 0
            return

        # hysteresis
        best = self.best()
        if best != self.current and \
                self.score(best) > self.score(self.current) * (1.0 + self.switch_margin):
            if best == self._challenger:
                self._streak += 1
            else:
                self._challenger, self._streak = best, 1
            if self._streak >= self.required_streak:
                self._switch_to(best)
                self.switches += 1
        else:
            self._challenger, self._streak = None, 0

    def _switch_to(self, b: int) -> None:
        self.current = b
        self._cooldown = self.cooldown_cycles
        self._challenger, self._streak = None, 0
        self._low_streak = 0


def make_scheduler(policy: str, candidates: Sequence[int] | str = DEFAULT_CANDIDATES, **kwargs):
    """Build a scheduler by name; ``kwargs`` not used by that policy are ignored."""
    import inspect

    if policy not in POLICIES:
        raise UserError(f"unknown policy '{policy}'", f"choose one of {', '.join(POLICIES)}")
    cls = EWMAScheduler if policy == "ewma" else CostModelScheduler
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(candidates, **{k: v for k, v in kwargs.items() if k in accepted})
