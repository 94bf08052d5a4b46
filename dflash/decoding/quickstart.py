"""``DFlashDraftModel``: the draft network plus the upstream quickstart call ``spec_generate``.

The network itself is ``dflash.model.draft.DFlashDraft``; this subclass adds the one method
that needs the decoding loop, so the model layer never imports the layer above it.
``DFlashDraftModel.from_pretrained`` returns an instance of this class, for DFlash 1 and
DFlash 2 checkpoints alike: the config (``architectures: ["DFlash2DraftModel"]``) decides
whether the network has the dynamic convolutions and the candidate selector
(``draft.is_dflash2``), and ``spec_generate`` runs either.
"""
from __future__ import annotations

import numbers

import torch

from ..model.draft import DFlashDraft
from .loop import SpeculativeDecoder

# Positional parameters after max_new_tokens, in the two orders spec_generate accepts.
_REFERENCE_ORDER = ("stop_token_ids", "temperature", "top_p", "top_k")
_LEGACY_ORDER = ("temperature", "stop_token_ids", "block_size", "engine", "generator")
_UNSET = object()


def _positional_names(args: tuple) -> tuple[str, ...]:
    """Which order the positional arguments after ``max_new_tokens`` follow.

    The 4th argument tells them apart: stop ids (a list/tuple/set/tensor, or None) in the
    reference's order ``(stop_token_ids, temperature, top_p, top_k)``; a number is a
    temperature, in this project's earlier order ``(temperature, stop_token_ids, block_size,
    engine, generator)``."""
    if not args:
        return ()
    first = args[0]
    number = isinstance(first, numbers.Real) and not isinstance(first, bool)
    names = _LEGACY_ORDER if number else _REFERENCE_ORDER
    if len(args) > len(names):
        raise TypeError(f"spec_generate() takes at most {3 + len(names)} positional arguments "
                        f"after self in the order (target, input_ids, max_new_tokens, "
                        f"{', '.join(names)}); got {3 + len(args)}")
    return names[:len(args)]


class DFlashDraftModel(DFlashDraft):
    """DFlash block-diffusion draft (z-lab checkpoint format) with ``spec_generate``."""

    @torch.inference_mode()
    def spec_generate(self, target, input_ids: torch.Tensor, max_new_tokens: int = 256, *args,
                      stop_token_ids=_UNSET, temperature=_UNSET, top_p=_UNSET, top_k=_UNSET,
                      block_size=_UNSET, engine=_UNSET, generator=_UNSET) -> torch.Tensor:
        """Speculative decoding with ``target``; returns ``[1, prompt + generated]`` token ids.

        Positional calls may follow the reference's order ``spec_generate(target, input_ids,
        max_new_tokens, stop_token_ids, temperature, top_p, top_k)`` or the earlier one
        ``(..., max_new_tokens, temperature, stop_token_ids, block_size, engine, generator)``
        (see :func:`_positional_names`); keywords work in either. ``temperature`` 0 is greedy;
        ``top_p`` / ``top_k`` filter as the reference does (``dflash.decoding.sampling``)."""
        given = {"stop_token_ids": stop_token_ids, "temperature": temperature, "top_p": top_p,
                 "top_k": top_k, "block_size": block_size, "engine": engine,
                 "generator": generator}
        for name, value in zip(_positional_names(args), args):
            if given[name] is not _UNSET:
                raise TypeError(f"spec_generate() got multiple values for argument '{name}'")
            given[name] = value
        defaults = {"stop_token_ids": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                    "block_size": None, "engine": "auto", "generator": None}
        opts = {k: defaults[k] if v is _UNSET else v for k, v in given.items()}
        decoder = SpeculativeDecoder(target, self, engine=opts["engine"])
        result = decoder.generate(input_ids, max_new_tokens=max_new_tokens,
                                  temperature=opts["temperature"],
                                  stop_token_ids=opts["stop_token_ids"],
                                  block_size=opts["block_size"] or self.block_size,
                                  generator=opts["generator"], top_p=opts["top_p"],
                                  top_k=opts["top_k"])
        out = torch.tensor([result.output_ids], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids[:, :], out], dim=1) if out.numel() else input_ids.clone()
