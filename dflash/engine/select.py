"""Engine choice in one place: an engine name -> the target and draft engines of a decoder.

``fast`` = static KV cache + fused/compiled layer math + CUDA graphs (CUDA only);
``static`` = static KV cache running the model's own modules eagerly (exact HF numerics);
``hf`` = the plain eager Transformers forward with a DynamicCache (reference);
``auto`` = fast on CUDA, static elsewhere, or what the target's family needs: static for
MoE blocks the fused path does not implement (it runs Qwen3-MoE and GPT-OSS), hf for
families whose layers the static engine does not implement (linear attention, Gemma 4's
per-layer modules ...).
"""
from __future__ import annotations

import os
import sys

import torch

from ..errors import UserError
from .cpu import CpuDraftEngine
from .cuda.autotune import ensure_tuned
from .draft import DraftEngine
from .graphs import fusable_mlp
from .reference import HFTargetEngine
from .static import StaticTargetEngine, decoder_parts, layer_windows, text_config, text_decoder

ENGINES = ("auto", "fast", "static", "hf")

# What the static engine runs per layer: these modules, the model's own (any MLP module).
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}


class TargetProfile:
    """What a target's layers need, read from its config (and module layout where the config
    says nothing): ``static`` / ``fast`` are None when that engine runs it, else the reason
    it cannot; ``kind`` is a short description of the family's layers."""

    def __init__(self, model):
        cfg = text_config(model)
        self.family = getattr(cfg, "model_type", None) or type(model).__name__
        types = set(getattr(cfg, "layer_types", None) or [])
        self.static = self._static_reason(model, cfg, types)
        layers = list(text_decoder(model).layers) if self.static is None else []
        moe = bool(getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0)) or any(
            not hasattr(l.mlp, "gate_proj") for l in layers)
        self.sliding = any(w is not None for w in layer_windows(cfg, cfg.num_hidden_layers))
        self.fast = self.static if self.static is not None else self._fast_reason(layers)
        sinks = any(getattr(l.self_attn, "sinks", None) is not None for l in layers)
        self.kind = self.static or ", ".join(
            ["MoE" if moe else "dense", "sliding-window layers" if self.sliding else "full attention"]
            + (["attention sinks"] if sinks else []))

    @staticmethod
    def _fast_reason(layers) -> str | None:
        """What the fused path cannot run in layers the static engine runs: MLPs other than a
        bias-free SwiGLU or an MoE block of ``cuda.moe`` (Qwen3-MoE, GPT-OSS). Attention
        sinks and q/k/v/o biases it runs."""
        for layer in layers:
            if not fusable_mlp(layer.mlp):
                return "MLP biases" if hasattr(layer.mlp, "gate_proj") else "MoE layers"
        return None

    @staticmethod
    def _static_reason(model, cfg, types) -> str | None:
        if types & {"linear_attention", "conv", "hybrid", "hybrid_sliding"} or \
                getattr(cfg, "full_attention_interval", None):
            return "linear-attention layers"
        if types - {"full_attention", "sliding_attention"}:
            return f"{'/'.join(sorted(types - {'full_attention', 'sliding_attention'}))} layers"
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
            return "logit softcapping"
        try:
            inner = text_decoder(model)
            layers = list(inner.layers)
        except AttributeError:
            return "an unrecognised decoder layout"
        if getattr(inner, "rotary_emb", None) is None or getattr(inner, "norm", None) is None:
            return "an unrecognised decoder layout"
        if any(hasattr(inner, a) for a in ("embed_scale", "normalizer")):
            return "embedding scaling in the decoder"
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                return "recurrent layers"
            extra = sorted(({n for n, _ in layer.named_children()} - _LAYER_PARTS)
                           | ({n for n, _ in attn.named_children()} - _ATTN_PARTS))
            if extra:
                return f"extra layer modules: {', '.join(extra[:2])}{', ...' if extra[2:] else ''}"
            if {n for n, _ in attn.named_parameters(recurse=False)} - {"sinks"}:
                return "extra attention parameters"
        try:  # per-layer-only values (heterogeneous configs) raise here
            n_heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        except Exception:  # noqa: BLE001
            return "per-layer head sizes"
        for layer in layers:
            attn = layer.self_attn
            if attn.q_proj.out_features != n_heads * head_dim:
                return "per-layer head sizes"
            scaling = getattr(attn, "scaling", head_dim ** -0.5)
            if abs(scaling - head_dim ** -0.5) > 1e-9 * scaling:
                return "non-standard attention scaling"
        return None


def resolve_engine(name: str, device: torch.device, *, cpu_graph_mode: bool = False,
                   target=None) -> str:
    """The concrete engine for ``name`` on ``device`` (auto -> fast on CUDA, static elsewhere;
    with ``target``: the engine its family needs, see ``choose_engine``)."""
    return choose_engine(name, device, target, cpu_graph_mode=cpu_graph_mode)[0]


def choose_engine(name: str, device: torch.device, target=None, *,
                  cpu_graph_mode: bool = False) -> tuple[str, str]:
    """(engine, description), e.g. ("hf", "hf (qwen3_5: linear-attention layers)").

    ``auto`` takes the device's default (fast on CUDA, static elsewhere) when it can run the
    target's family, else the next engine that can (static, then hf); an explicit engine
    that cannot run it is refused (UserError) before any model runs."""
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}'", f"choose one of {', '.join(ENGINES)}")
    requested = name
    if name == "auto":
        name = "fast" if device.type == "cuda" else "static"
    if name == "fast" and device.type != "cuda" and not cpu_graph_mode:
        raise UserError("--engine fast needs a CUDA device", "use --engine static on CPU")
    if target is None:
        return name, name
    prof = TargetProfile(target)
    reason = {"fast": prof.fast, "static": prof.static, "hf": None}[name]
    if reason is not None and requested != "auto":
        others = [e for e in ("static", "hf") if {"static": prof.static, "hf": None}[e] is None]
        raise UserError(f"--engine {name} cannot run this target ({prof.family}: {reason})",
                        f"use --engine auto or {' or '.join(others)}")
    if reason is not None:
        name = "static" if prof.static is None else "hf"
    return name, f"{name} ({prof.family}: {reason or prof.kind})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engines:
    """A decoder's target and draft engines, rebuilt larger when a sequence needs more room.

    ``name``: the engine chosen (for ``auto``, by the target's family); ``description``:
    that choice in one line, e.g. "hf (qwen3_5: linear-attention layers)".
    ``target_engine`` / ``draft_engine`` are the current ones (None before the first
    ``ensure``); ``cpu_draft`` lets the static engine use ``CpuDraftEngine`` where it suits.
    """

    def __init__(self, target, draft, name: str, *, feature_layers: list[int],
                 compile: bool = True, cpu_draft: bool = True, cpu_graph_mode: bool = False):
        self.target, self.draft = target, draft
        self.device = target.get_input_embeddings().weight.device
        self.name, self.description = choose_engine(name, self.device, target,
                                                    cpu_graph_mode=cpu_graph_mode)
        default = "fast" if self.device.type == "cuda" else "static"
        if name == "auto" and self.name != default:  # the family needs another engine: say so
            print(f"engine: {self.description}", file=sys.stderr)
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
            if self.graphs and self.device.type == "cuda":
                # before the fused layers are built: their gate/up layout follows the configs
                ensure_tuned([m for m in (self.target, self.draft) if m is not None], self.device)
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
