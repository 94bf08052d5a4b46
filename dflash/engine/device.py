"""The one device choice of every CLI (benchmarks and training): ``--device`` -> torch.device."""
from __future__ import annotations

import torch

from ..errors import UserError


def pick_device(flag: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU. Under torchrun (``local_rank`` given)
    ``auto`` and ``cuda`` mean this rank's GPU. CUDA asked for without one: one line."""
    if flag == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        flag = "cuda"
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag} requested but CUDA is not available", "use --device cpu")
    if flag == "cuda":
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    return torch.device(flag)
