"""First-use tuning of the skinny GEMM configs for (GPU, shape) pairs without a tuned table.

Stub: ``cached_table`` returns the user's cached configs (none yet) and ``ensure_tuned``
tunes nothing; issue 26 item 5 fills them in.
"""
from __future__ import annotations


def cached_table(gpu_name: str) -> dict:
    """(N, K) -> config (or None = cuBLAS) tuned earlier on this machine for ``gpu_name``."""
    return {}


def ensure_tuned(models, device) -> None:
    """Tune (once, cached) the decode GEMM shapes of ``models`` that have no config yet."""
    return None
