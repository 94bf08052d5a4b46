"""The cost-model block-size scheduler (``CostModelScheduler``; see ``scheduler.py``).

Pure Python (no torch), like the EWMA scheduler it sits beside.
"""
from __future__ import annotations

import math
from collections import deque
from itertools import accumulate
from statistics import median
from typing import Sequence

from .schedule_base import DEFAULT_CANDIDATES, _Bookkeeping, _check_int, _check_real, parse_candidates

# CostModelScheduler: a size's own mean tau caps the nested estimate once it has this much
# (decayed) weight of observations, when it falls short of the estimate by more than this.
DIRECT_MIN_WEIGHT = 4.0
DIRECT_TOLERANCE = 0.3
EAGER_DECISIONS = 16  # cycles of a generation after which the cost model decides less often


class CostModelScheduler(_Bookkeeping):
    """Picks ``argmax_b E[tau(b)] / c(b)`` from a per-position acceptance model.

    Acceptance model: for each draft position ``k`` (1-based) decayed counts of cycles that
    reached it (``at_risk``) and that accepted it (``accepted``); a cycle with block ``B`` and
    ``acc = tau - 1`` accepted drafts is at risk at positions ``1..min(acc + 1, B - 1)`` and
    accepted ``1..acc``. ``p_k = (accepted_k + w * p0) / (at_risk_k + w)`` with ``p0`` the pooled
    rate, and ``E[tau(b)] = 1 + sum_{j<b} prod_{k<=j} p_k`` — so every cycle informs every
    candidate's estimate (smaller ones exactly, larger ones whenever the run ended inside the
    block). This assumes a block of ``b`` drafts the same first tokens as a larger one, which
    the published sweeps support for ``b`` up to the draft's training block size (a geometric
    fit of tau(16) = 7.67 predicts tau(8) = 5.5 and tau(12) = 6.8; measured 5.46 and 6.80) but
    not beyond it (tau(20) = 6.4 < tau(16)): keep candidates <= the draft's block size.

    Cost model, paired: what matters is each size's cost relative to the largest, and a
    cycle's time moves with the machine and the prompt as much as with its size. So a size is
    compared with its neighbours in time: a cycle at ``b`` between two cycles at ``a`` (or one
    at ``a`` between two at ``b``) gives ``c(b) / c(a)`` against the geometric mean of the two
    neighbours, and ``c(b) / c(largest)`` is the median of the last ``cost_window`` such
    ratios (chained through ``a`` when ``a`` is not the largest). Warm-up interleaves the
    largest with the others (L, b1, L, b2, L, ...) until every size has ``cost_warmup``
    ratios. Where a size has no ratio yet, the ratio of its median cycle time to the
    largest's stands in. Costs are kept across prompts (``reset(keep_costs=True)``).

    Probes, only where they can change the decision: every ``cost_refresh_interval`` cycles
    the least recently measured candidate whose score is within ``probe_band`` (relative) of
    the current one gets one cycle to refresh its cost (any candidate unmeasured for
    ``4 * cost_refresh_interval`` cycles qualifies regardless); while the current size is below
    the largest, the largest gets one cycle every ``probe_interval`` cycles if it is within
    the band, so positions past the current block keep real data. 0 disables either probe.
    A fully accepted block at the current size is censored (its run may have gone on): when the
    position just past it has less data than ``prior_weight``, the next cycle probes the
    largest size, whatever the estimate says.
    A switch needs the winner to beat the current size by ``switch_margin`` on
    ``required_streak`` consecutive decisions. The decision is re-evaluated after every cycle
    at another size, after each of a generation's first ``EAGER_DECISIONS`` cycles (its
    acceptance estimate starts afresh) and every ``decide_interval`` cycles; the other
    updates only count (a few microseconds of Python per cycle matter when a cycle is a
    fraction of a millisecond, as on a GPU with a small pair). The decoding loop reports a
    cycle only after it has asked for the next size (one cycle of lag, so the update overlaps
    GPU work): the warm-up alternation follows the sizes chosen, not the cycles reported.
    """

    name = "costmodel"

    def __init__(self, candidates: Sequence[int] | str = DEFAULT_CANDIDATES, cost_warmup: int = 2,
                 cost_window: int = 9, accept_decay: float = 0.90, prior_weight: float = 2.0,
                 switch_margin: float = 0.01, required_streak: int = 1, probe_interval: int = 32,
                 cost_refresh_interval: int = 64, probe_band: float = 0.15,
                 decide_interval: int = 4):
        self.candidates = parse_candidates(candidates)
        self.cost_warmup = _check_int("cost_warmup", cost_warmup, 1)
        self.cost_window = _check_int("cost_window", cost_window, 1)
        self.accept_decay = _check_real("accept_decay", accept_decay, 0.0, 1.0, lo_open=True)
        self.prior_weight = _check_real("prior_weight", prior_weight, 0.0, math.inf, lo_open=True)
        self.switch_margin = _check_real("switch_margin", switch_margin, 0.0, math.inf)
        self.required_streak = _check_int("required_streak", required_streak, 1)
        self.probe_interval = _check_int("probe_interval", probe_interval, 0)
        self.cost_refresh_interval = _check_int("cost_refresh_interval", cost_refresh_interval, 0)
        self.probe_band = _check_real("probe_band", probe_band, 0.0, 1.0)
        self.decide_interval = _check_int("decide_interval", decide_interval, 1)
        self.max_block_size = self.candidates[-1]
        self._costs: dict[int, deque] = {b: deque(maxlen=self.cost_window)
                                         for b in self.candidates}
        self._cost_median: dict[int, float | None] = {b: None for b in self.candidates}
        # log(c(b) / c(largest)) from paired neighbours, per smaller candidate
        self._log_ratios: dict[int, deque] = {b: deque(maxlen=self.cost_window)
                                              for b in self.candidates[:-1]}
        self._ratio_median: dict[int, float | None] = {b: None for b in self.candidates[:-1]}
        self.reset()

    def reset(self, keep_costs: bool = False, keep_estimates: bool = False) -> None:
        """Start a new generation; ``keep_costs`` keeps the cycle-cost measurements (a property
        of the hardware, not of the prompt) so the next prompt skips the warm-up;
        ``keep_estimates`` keeps those, the acceptance model and the current size too."""
        self._recent: list[tuple[int, float]] = []  # the last two cycles: (block size, time)
        self._last_warmup: int | None = None  # the size the last warm-up select() chose
        if keep_estimates and self.current is not None:
            self._cost_seen = {b: s - self.cycles for b, s in self._cost_seen.items()}
            self._challenger, self._streak = None, 0
            self._reset_counters()
            return
        n = self.max_block_size
        # Decayed counts of cycles by the last draft position they reached (``_risk_end[m]``,
        # m = 1..n-1) and by the number of drafts they accepted (``_acc_end[a]``); the counts
        # per position are their suffix sums. Stored undecayed: true count = raw / self._w,
        # and each new cycle adds self._w (which grows by 1/decay per cycle), so an update
        # is two additions.
        self._risk_end = [0.0] * n
        self._acc_end = [0.0] * n
        self._w = 1.0
        # tau measured at each size itself (decayed per own cycle): caps the nested estimate
        self._direct = {b: [0.0, 0.0] for b in self.candidates}  # [weighted tau sum, weight]
        self._cost_seen = {}
        self._warm = False
        for b in self.candidates:
            if not keep_costs:
                self._costs[b].clear()
                self._cost_median[b] = None
                if b in self._log_ratios:
                    self._log_ratios[b].clear()
                    self._ratio_median[b] = None
            self._cost_seen[b] = 0  # cycle (of this generation) of the last cost measurement
        self.current: int | None = None
        self._rr = 0
        self._challenger: int | None = None
        self._streak = 0
        self._since_probe = 0
        self._since_refresh = 0
        self._since_decide = 0
        self._censored = False
        self._reset_counters()

    # -- estimates
    @property
    def warming_up(self) -> bool:
        if not self._warm:  # latched: cost windows only empty again on reset
            self._warm = (len(self._costs[self.max_block_size]) >= self.cost_warmup
                          and all(len(q) >= self.cost_warmup for q in self._log_ratios.values()))
        return not self._warm

    @staticmethod
    def _suffix_sums(ends: list[float]) -> list[float]:
        out = list(accumulate(reversed(ends)))
        out.reverse()
        return out

    @property
    def _at_risk(self) -> list[float]:
        """Decayed number of cycles that reached draft position k (index k)."""
        return [x / self._w for x in self._suffix_sums(self._risk_end)]

    def cost(self, b: int) -> float | None:
        """Median cycle time measured at size b (seconds)."""
        if self._cost_median[b] is None and self._costs[b]:
            self._cost_median[b] = median(self._costs[b])
        return self._cost_median[b]

    def relative_cost(self, b: int) -> float | None:
        """c(b) / c(largest): paired estimate, else the ratio of median cycle times."""
        if b == self.max_block_size:
            return 1.0
        if self._ratio_median[b] is None and self._log_ratios[b]:
            self._ratio_median[b] = math.exp(median(self._log_ratios[b]))
        if self._ratio_median[b] is not None:
            return self._ratio_median[b]
        c, top = self.cost(b), self.cost(self.max_block_size)
        return c / top if c is not None and top else None

    def summary(self) -> dict:
        """The counters, plus the cost and acceptance estimates the decisions rest on."""
        out = super().summary()
        out["relative_cost"] = {str(b): self.relative_cost(b) for b in self.candidates}
        out["expected_tau"] = ({str(b): self.expected_tau(b) for b in self.candidates}
                               if any(self._risk_end) else None)
        return out

    def _add_ratio(self, b: int, log_ratio: float) -> None:
        self._log_ratios[b].append(log_ratio)
        self._ratio_median[b] = None

    def _pair(self, b: int, c: float) -> None:
        """Record c(y)/c(x) from a pattern x, y, x of the last three cycles (see the class doc)."""
        self._recent.append((b, c))
        if len(self._recent) > 3:
            del self._recent[0]
        if len(self._recent) < 3:
            return
        (x1, c1), (y, cy), (x2, c2) = self._recent
        if x1 != x2 or y == x1 or not all(c > 0 and math.isfinite(c) for c in (c1, cy, c2)):
            return
        lr = math.log(cy) - 0.5 * (math.log(c1) + math.log(c2))  # log c(y) / c(x)
        top = self.max_block_size
        if x1 == top:
            self._add_ratio(y, lr)
        elif y == top:
            self._add_ratio(x1, -lr)
        elif self._log_ratios[x1]:  # chain through x's own ratio to the largest
            self._add_ratio(y, lr + median(self._log_ratios[x1]))

    def _expected_taus(self) -> list[float]:
        """Uncapped ``E[tau(b)]`` of the nested model for b = 0..max_block_size (index b), in
        one pass over the draft positions: it runs after most cycles, and on a GPU with a
        small pair a cycle is ~0.3 ms. Position k's acceptance rate is
        ``(accepted_k + w * p0) / (at_risk_k + w)`` with ``p0`` the pooled rate."""
        risk_end, acc_end, w = self._risk_end, self._acc_end, self._w
        n = len(risk_end)
        risk = [0.0] * n
        acc = [0.0] * n
        r_run = a_run = r_sum = a_sum = 0.0
        for k in range(n - 1, 0, -1):  # suffix sums: cycles that reached / accepted position k
            r_run += risk_end[k]
            a_run += acc_end[k]
            risk[k] = r_run
            acc[k] = a_run
            r_sum += r_run
            a_sum += a_run
        pooled = (a_sum + 0.5 * w) / (r_sum + w)
        prior = self.prior_weight * w  # in raw (undecayed) units, like the counts
        prior_acc = prior * pooled
        taus = [1.0] * (n + 1)
        expected = survive = 1.0
        for k in range(1, n):
            survive *= (acc[k] + prior_acc) / (risk[k] + prior)
            expected += survive
            taus[k + 1] = expected
        return taus

    def _capped(self, b: int, expected: float) -> float:
        total, weight = self._direct.get(b, (0.0, 0.0))
        if weight >= DIRECT_MIN_WEIGHT:  # only a clear shortfall, not sampling noise
            expected = min(expected, total / weight / (1.0 - DIRECT_TOLERANCE))
        return expected

    def expected_tau(self, b: int) -> float:
        """``E[tau(b)]`` under the acceptance model, capped by what size b itself achieved.

        The nested model assumes a run seen at a large block predicts any smaller block; a
        draft trained at one block size breaks that (its smaller blocks accept less), so once a
        size has its own measurements (warm-up, probes), their mean caps the estimate."""
        return self._capped(b, self._expected_taus()[b])

    def scores(self) -> dict[int, float]:
        """Estimated tokens per second of each candidate (0 where its cost is unknown): the
        largest size's median cycle time scaled by each size's relative cost."""
        taus = self._expected_taus()
        top = self.cost(self.max_block_size) or 1.0
        out = {}
        for b in self.candidates:
            r = self.relative_cost(b)
            out[b] = 0.0 if r is None else self._capped(b, taus[b]) / max(r * top, 1e-12)
        return out

    def best(self, scores: dict[int, float] | None = None) -> int:
        if not any(self._risk_end):
            return self.max_block_size  # no acceptance data yet: the draft's natural size
        scores = self.scores() if scores is None else scores
        return max(self.candidates, key=lambda b: (scores[b], b))

    # -- protocol
    def select(self, cycle_idx: int) -> int:
        if self.warming_up:
            # L, b1, L, b2, L, ...: the largest between the others, so each of their cycles
            # has a pair of neighbours at the largest (and the largest informs every position)
            top = self.max_block_size
            others = [b for b in self.candidates[::-1][1:]
                      if len(self._log_ratios[b]) < self.cost_warmup]
            # (the last size chosen, not the last one reported: a decoder may report a cycle
            # only after the next one has been chosen)
            if self._last_warmup != top or not others:
                b = top
            else:
                b = others[self._rr % len(others)]
                self._rr += 1
            self._last_warmup = b
            self.trace.append((b, "warmup"))
            return b
        if self.current is None:
            self.current = self.best()
        self._since_probe += 1
        self._since_refresh += 1
        b = self._probe_choice()
        if b is not None:
            self.probes += 1
            return b
        self.trace.append((self.current, "current"))
        return self.current

    def _probe_choice(self) -> int | None:
        if len(self.candidates) < 2:
            return None
        scores = None
        if self.cost_refresh_interval and self._since_refresh >= self.cost_refresh_interval:
            self._since_refresh = 0
            others = [b for b in self.candidates if b != self.current]
            scores = self.scores()
            floor = scores[self.current] * (1.0 - self.probe_band)
            stale = 4 * self.cost_refresh_interval
            eligible = [b for b in others
                        if scores[b] >= floor or self.cycles - self._cost_seen[b] >= stale]
            if eligible:
                b = min(eligible, key=lambda c: (self._cost_seen[c], -c))
                self.trace.append((b, "cost-probe"))
                return b
        top = self.max_block_size
        if (self._censored and self.current < top
                and sum(self._risk_end[self.current:]) < self.prior_weight * self._w):
            # The current block was fully accepted, so its run says nothing about the
            # positions past it, and they have (almost) no data: the estimate for larger
            # blocks is the prior's guess. One cycle at the largest measures them (with a
            # draft drafting its trained size anyway, it never accepts less).
            self._censored = False
            self._since_probe = 0
            self.trace.append((top, "censored-probe"))
            return top
        if self.probe_interval and self.current != top and self._since_probe >= self.probe_interval:
            self._since_probe = 0
            scores = self.scores() if scores is None else scores
            if scores[top] >= scores[self.current] * (1.0 - self.probe_band):
                self.trace.append((top, "probe"))
                return top
        return None

    def update(self, tau: int, cycle_s: float, block_size: int, cycle_idx: int) -> None:
        self.cycles += 1
        self.block_counts[block_size] += 1
        if block_size not in self._costs:
            return  # tail / foreign block size: no estimate update
        b = block_size
        tau = min(max(int(tau), 1), b)
        d = self.accept_decay
        self._w /= d  # decays every earlier count by d relative to this cycle's
        if self._w > 1e100:  # renormalise long before float overflow
            self._risk_end = [x / self._w for x in self._risk_end]
            self._acc_end = [x / self._w for x in self._acc_end]
            self._w = 1.0
        direct = self._direct[b]
        direct[0] = direct[0] * d + tau
        direct[1] = direct[1] * d + 1.0
        acc = tau - 1
        if b > 1:  # positions 1..acc accepted; the run reached min(acc + 1, b - 1)
            self._risk_end[min(acc + 1, b - 1)] += self._w
            self._acc_end[acc] += self._w
        self._censored = b == self.current and tau == b < self.max_block_size
        if cycle_s > 0 and math.isfinite(cycle_s):
            self._costs[b].append(float(cycle_s))
            self._cost_median[b] = None  # recomputed when next needed
            self._cost_seen[b] = self.cycles
        self._pair(b, float(cycle_s))
        if self.warming_up:
            return
        self._since_decide += 1
        if (b == self.current and self._since_decide < self.decide_interval
                and self._challenger is None and self.cycles > EAGER_DECISIONS):
            return
        self._since_decide = 0
        scores = self.scores()
        if self.current is None:
            self.current = self.best(scores)
            return
        best = self.best(scores)
        if best != self.current and scores[best] > scores[self.current] * (1.0 + self.switch_margin):
            if best == self._challenger:
                self._streak += 1
            else:
                self._challenger, self._streak = best, 1
            if self._streak >= self.required_streak:
                self.current = best
                self.switches += 1
                self._challenger, self._streak = None, 0
                self._since_probe = 0
        else:
            self._challenger, self._streak = None, 0
