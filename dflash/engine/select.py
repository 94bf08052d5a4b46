"""Engine choice in one place: an engine name -> the target and draft engines of a decoder.

``fast`` = static KV cache + fused/compiled layer math + CUDA graphs (CUDA only);
``static`` = static KV cache running the model's own modules eagerly (exact HF numerics);
``hf`` = the plain eager Transformers forward with a DynamicCache (reference);
``auto`` = fast on CUDA, static elsewhere.
"""
from __future__ import annotations

import os

import torch

from ..errors import UserError
from .cpu import CpuDraftEngine
from .draft import DraftEngine
from .reference import HFTargetEngine
from .static import StaticTargetEngine, decoder_parts

ENGINES = ("auto", "fast", "static", "hf")


def resolve_engine(name: str, device: torch.device, *, cpu_graph_mode: bool = False) -> str:
    """The concrete engine for ``name`` on ``device`` (auto -> fast on CUDA, static elsewhere)."""
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}'", f"choose one of {', '.join(ENGINES)}")
    if name == "auto":
        name = "fast" if device.type == "cuda" else "static"
    if name == "fast" and device.type != "cuda" and not cpu_graph_mode:
        raise UserError("--engine fast needs a CUDA device", "use --engine static on CPU")
    return name


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engines:
    """A decoder's target and draft engines, rebuilt larger when a sequence needs more room.

    ``target_engine`` / ``draft_engine`` are the current ones (None before the first
    ``ensure``); ``cpu_draft`` lets the static engine use ``CpuDraftEngine`` where it suits.
    """

    def __init__(self, target, draft, name: str, *, feature_layers: list[int],
                 compile: bool = True, cpu_draft: bool = True, cpu_graph_mode: bool = False):
        self.target, self.draft = target, draft
        self.device = target.get_input_embeddings().weight.device
        self.name = resolve_engine(name, self.device, cpu_graph_mode=cpu_graph_mode)
        self.graphs = self.name == "fast"
        # DFLASH_COMPILE=0 keeps CUDA graphs but skips torch.compile (e.g. without a compiler).
        self.compile = compile and self.graphs and os.environ.get("DFLASH_COMPILE", "1") != "0"
        self.feature_layers, self.cpu_draft = feature_layers, cpu_draft
        self.target_engine = self.draft_engine = None

    def ensure(self, capacity: int):
        """(target engine, draft engine) with room for ``capacity`` tokens."""
        eng = self.target_engine
        if eng is None or eng.capacity < capacity:
            # Round up so that growing prompts do not reallocate (and recapture graphs) often.
            capacity = max(capacity, 2 * eng.capacity if eng else 0)
            capacity = -(-capacity // 256) * 256
            opts = dict(fused=self.graphs, compile=self.compile, graphs=self.graphs)
            if self.name == "hf":
                self.target_engine = HFTargetEngine(self.target, self.feature_layers, capacity)
                opts = {}
            else:
                self.target_engine = StaticTargetEngine(self.target, self.feature_layers,
                                                        capacity, **opts)
            if self.draft is not None:
                embed, _, _, lm_head, _ = decoder_parts(self.target)
                if self.cpu_draft and self.name == "static" and \
                        CpuDraftEngine.suits(self.draft, lm_head, self.device):
                    # Same draft math with fewer, faster CPU kernels (engine/cpu.py).
                    self.draft_engine = CpuDraftEngine(self.draft, embed, lm_head, capacity)
                else:
                    self.draft_engine = DraftEngine(self.draft, embed, lm_head, capacity, **opts)
        return self.target_engine, self.draft_engine
