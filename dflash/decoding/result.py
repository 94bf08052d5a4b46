"""What a decoder returns, and the block-size policy interface it calls each cycle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import UserError



class BlockPolicy(Protocol):
    """Chooses the block size of each cycle and learns from what happened.

    Call order: ``select(i + 1)`` comes before ``update`` reports cycle ``i`` (the loop reports a
    cycle while the GPU runs the next one). In graph mode the next size is asked for before
    the loop knows whether the generation goes on, so the last ``select`` can go unused."""

    def select(self, cycle_idx: int) -> int: ...

    def update(self, tau: int, cycle_s: float, block_size: int, cycle_idx: int) -> None: ...


class FixedPolicy:
    def __init__(self, block_size: int):
        if block_size < 1:
            raise UserError(f"block size must be >= 1, got {block_size}")
        self.block_size = block_size

    def select(self, cycle_idx: int) -> int:
        return self.block_size

    def update(self, tau, cycle_s, block_size, cycle_idx) -> None:
        pass


@dataclass
class CycleStat:
    block_size: int
    tau: int            # tokens this cycle contributed before truncation (accepted + 1)
    cycle_s: float
    draft_s: float | None = None
    verify_s: float | None = None


@dataclass
class GenerationResult:
    output_ids: list[int]
    prompt_len: int
    ttft_s: float
    total_s: float
    cycles: list[CycleStat] = field(default_factory=list)
    stopped: bool = False  # ended on a stop token

    @property
    def num_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (decode time / tokens after the first)."""
        return self.decode_s / max(1, self.num_tokens - 1)

    @property
    def mean_tau(self) -> float:
        return sum(c.tau for c in self.cycles) / len(self.cycles) if self.cycles else 0.0


def emit(output: list[int], new_tokens: list[int], stops: set[int], max_new_tokens: int) -> bool:
    """Append a cycle's tokens up to a stop token or the length limit; True if stopped."""
    for tok in new_tokens:
        output.append(tok)
        if tok in stops:
            return True
        if len(output) >= max_new_tokens:
            break
    return False
