"""DFlash 2 on CUDA: the grouped dynamic causal convolution and the candidate selector's walk.

Same signatures and results as the torch functions in ``dflash.model.dflash2``
(``grouped_dynamic_conv``, ``select_walk``); those run off CUDA or for shapes the kernels
do not take.
"""
from __future__ import annotations

import torch


def _torch_ops():
    # lazy: the model layer is below us, but imported only when a fallback is needed
    from ...model import dflash2
    return dflash2


def dynamic_conv(x: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_{o<K} (base[o] + dyn[t, o, g(c)]) * x[t-o], x = 0 before the block start."""
    return _torch_ops().grouped_dynamic_conv(x, dyn, base)


def select_walk(unary, cand, hproj, pred_w, succ_w, anchor, temperature, uniforms=None,
                generator=None):
    """The selector's walk over the block from the anchor: (tokens [t], q [t, k] or None)."""
    return _torch_ops().select_walk(unary, cand, hproj, pred_w, succ_w, anchor, temperature,
                                    uniforms=uniforms, generator=generator)
