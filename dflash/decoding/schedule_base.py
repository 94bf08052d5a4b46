"""What both block-size schedulers share: candidate parsing, option checks, counters.

Split out of ``scheduler.py`` so that the EWMA and the cost-model schedulers can live in two
modules without importing each other. Pure Python (no torch).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

from ..errors import UserError, parse_int_list

DEFAULT_CANDIDATES = (8, 12, 16)
POLICIES = ("ewma", "costmodel")

# --------------------------------------------------------------------------- validation

def parse_candidates(value: str | Iterable[int]) -> list[int]:
    """``"8,12,16"`` or an iterable of ints -> sorted unique block sizes, each >= 2."""
    text = value if isinstance(value, str) else ",".join(str(int(v)) for v in value)
    sizes = parse_int_list(text, "candidate block sizes", minimum=2,
                           why=" (block size 1 is plain decoding, the baseline)")
    return sorted(set(sizes))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise UserError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value!r}")
    return v


class _Bookkeeping:
    """Counters shared by both schedulers (what the benchmark reports)."""

    candidates: list[int]

    def _reset_counters(self) -> None:
        self.cycles = 0
        self.block_counts: Counter[int] = Counter()  # cycles per block size actually run
        self.switches = 0       # score-driven changes of the current block size
        self.probes = 0         # one-cycle excursions to another candidate
        self.fallbacks = 0      # low-acceptance step-downs (EWMA only)
        self.trace: list[tuple[int, str]] = []  # (block size chosen, reason) per select()

    def usage(self) -> dict[int, float]:
        """Fraction of cycles run at each block size."""
        total = sum(self.block_counts.values())
        return {b: n / total for b, n in sorted(self.block_counts.items())} if total else {}

    def summary(self) -> dict:
        return {
            "policy": self.name,
            "cycles": self.cycles,
            "block_counts": {str(b): n for b, n in sorted(self.block_counts.items())},
            "switches": self.switches,
            "probes": self.probes,
            "fallbacks": self.fallbacks,
            "final_block_size": self.current,
        }
