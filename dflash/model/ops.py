"""The layer math that the draft and every engine share: RMSNorm and rotary embeddings."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             keep_float64: bool = False) -> torch.Tensor:
    """RMSNorm with Hugging Face numerics: float32 statistics, cast back, then scale.

    ``keep_float64``: float64 inputs keep float64 statistics (the draft's own modules do).
    Inputs already in the statistics' dtype are not cast at all (each cast is a dispatch)."""
    dtype = x.dtype
    wide = dtype == torch.float32 or (keep_float64 and dtype == torch.float64)
    xf = x if wide else x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf if wide else xf.to(dtype))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scaling: float = 1.0):
    """cos/sin of shape [..., head_dim] for integer ``positions`` (HF's half-split layout).

    ``scaling``: HF's rotary ``attention_scaling`` (yarn, longrope), applied in float32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype), sin.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in HF's half-split layout; cos/sin broadcast against x."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
