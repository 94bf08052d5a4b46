"""DFlash speculative decoding: block-diffusion draft, lossless decoding loop, benchmarks."""
from .draft import DFlashDraftModel, DraftConfig
from .decoding import FixedPolicy, GenerationResult, SpeculativeDecoder

__all__ = ["DFlashDraftModel", "DraftConfig", "SpeculativeDecoder", "GenerationResult",
           "FixedPolicy"]
__version__ = "0.1.0"
