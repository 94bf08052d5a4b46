"""DFlash speculative decoding: a block-diffusion draft proposes a block, the target verifies it.

The layers, from the ground up: ``errors``/``runlog``/``datasets`` (no torch), ``model`` (the
draft network, shared ops, hub resolution), ``engine`` (static-cache, CPU, reference and CUDA
engines, chosen in ``engine.select``), ``decoding`` (the loop, sampling, schedulers,
multi-round), ``bench``, ``serving`` and ``training`` on top.

The public names resolve on first use, so ``import dflash`` does not load torch.
"""
import importlib

_PUBLIC = {
    "DFlashDraftModel": "dflash.decoding.quickstart",
    "DraftConfig": "dflash.model.draft",
    "FixedPolicy": "dflash.decoding.result",
    "GenerationResult": "dflash.decoding.result",
    "SpeculativeDecoder": "dflash.decoding.loop",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dflash' has no attribute {name!r}")
