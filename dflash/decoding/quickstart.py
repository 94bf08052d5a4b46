"""``DFlashDraftModel``: the draft network plus the upstream quickstart call ``spec_generate``.

The network itself is ``dflash.model.draft.DFlashDraft``; this subclass adds the one method
that needs the decoding loop, so the model layer never imports the layer above it.
``DFlashDraftModel.from_pretrained`` returns an instance of this class.
"""
from __future__ import annotations

import torch

from ..model.draft import DFlashDraft
from .loop import SpeculativeDecoder


class DFlashDraftModel(DFlashDraft):
    """DFlash block-diffusion draft (z-lab checkpoint format) with ``spec_generate``."""

    @torch.inference_mode()
    def spec_generate(self, target, input_ids: torch.Tensor, max_new_tokens: int = 256,
                      temperature: float = 0.0, stop_token_ids=None, block_size: int | None = None,
                      engine: str = "auto", generator: torch.Generator | None = None) -> torch.Tensor:
        """Speculative decoding with ``target``; returns ``[1, prompt + generated]`` token ids."""
        decoder = SpeculativeDecoder(target, self, engine=engine)
        result = decoder.generate(input_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, stop_token_ids=stop_token_ids,
                                  block_size=block_size or self.block_size, generator=generator)
        out = torch.tensor([result.output_ids], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids[:, :], out], dim=1) if out.numel() else input_ids.clone()
