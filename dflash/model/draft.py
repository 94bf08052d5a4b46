"""The DFlash draft: a small stack of Qwen3-style layers conditioned on target features.

Loads the public z-lab checkpoints as published (``config.json`` with ``block_size``,
``num_target_layers``, ``dflash_config``; ``model.safetensors`` with names like
``layers.0.self_attn.q_proj.weight``, ``fc.weight``, ``hidden_norm.weight``, ``norm.weight``)
without ``trust_remote_code``. The draft has no embedding and no LM head: it borrows the
target's. See ``shared/reference/dflash-algorithm.md`` for the architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import dflash2
from .hub import resolve_model_dir
from .ops import rms_norm, rope, rope_cos_sin

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}


def default_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """Spread ``num_features`` layers from 1 to L-3 (the rule used when a config lacks them)."""
    if num_features == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_features - 1))) for i in range(num_features)]


# Values the reference reads as dflash_config[name], else the top-level key, else a default.
DFLASH_KEYS = {"block_size": 16, "input_embedding_scale": 1.0, "output_multiplier": 1.0,
               "final_logit_softcapping": None}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
ATTENTION_KINDS = ("full_attention", "sliding_attention")


def _lookup(cfg: dict, dcfg: dict, name: str, default=None):
    return dcfg[name] if name in dcfg else cfg.get(name, default)


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    num_target_layers: int
    mask_token_id: int
    target_layer_ids: list[int]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    dtype: str = "bfloat16"
    hidden_act: str = "silu"
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    # DFlash 2 (architectures ["DFlash2DraftModel"]; None for DFlash 1): see model/dflash2.py
    conv_kernel_size: int | None = None
    conv_group_size: int | None = None
    selector_rank: int | None = None
    selector_top_k: int | None = None
    extra: dict = field(default_factory=dict)  # every other key of config.json, kept on save
    dflash_extra: dict = field(default_factory=dict)  # dflash_config as read (written back)

    @classmethod
    def from_dict(cls, cfg: dict) -> "DraftConfig":
        cfg = dict(cfg)
        dcfg = dict(cfg.get("dflash_config") or {})
        mask_id = _lookup(cfg, dcfg, "mask_token_id")
        if mask_id is None:
            raise UserError("draft config has no mask_token_id (neither in dflash_config nor at "
                            "the top level)", "is this a DFlash draft checkpoint?")
        try:
            n_layers = int(cfg["num_hidden_layers"])
            num_target_layers = int(cfg["num_target_layers"])
            ids = _lookup(cfg, dcfg, "target_layer_ids") \
                or default_target_layer_ids(num_target_layers, n_layers)
            heads = int(cfg["num_attention_heads"])
            cap = _lookup(cfg, dcfg, "final_logit_softcapping")
            out = cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                vocab_size=int(cfg["vocab_size"]),
                block_size=int(_lookup(cfg, dcfg, "block_size", 16)),
                num_target_layers=num_target_layers,
                mask_token_id=int(mask_id),
                target_layer_ids=[int(i) for i in ids],
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta")
                                 or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)),
                rope_scaling=cfg.get("rope_scaling"),
                attention_bias=bool(cfg.get("attention_bias", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
                dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
                hidden_act=str(cfg.get("hidden_act") or "silu"),
                input_embedding_scale=float(_lookup(cfg, dcfg, "input_embedding_scale", 1.0)),
                output_multiplier=float(_lookup(cfg, dcfg, "output_multiplier", 1.0)),
                final_logit_softcapping=None if cap is None else float(cap),
            )
        except KeyError as err:
            raise UserError(f"draft config lacks the key {err}",
                            "is this a DFlash draft checkpoint (config with dflash_config)?") from err
        if dflash2.ARCHITECTURE in (cfg.get("architectures") or []):
            _read_dflash2(out, cfg, dcfg)
        known = set(asdict(out)) | {"dflash_config", "torch_dtype", "head_dim"}
        out.extra = {k: v for k, v in cfg.items() if k not in known}
        out.dflash_extra = dcfg
        return out

    def to_dict(self) -> dict:
        cfg = dict(self.extra)
        cfg.setdefault("architectures", ["DFlashDraftModel"])
        cfg.setdefault("model_type", "qwen3")
        # dflash_config as read, with the current values of the keys it held (it wins on reload)
        dcfg = dict(self.dflash_extra)
        dcfg.update(mask_token_id=self.mask_token_id, target_layer_ids=list(self.target_layer_ids))
        if self.is_dflash2:  # every DFlash 2 setting, block_size included, in dflash_config
            dcfg.update({k: getattr(self, k) for k in dflash2.DFLASH2_KEYS},
                        block_size=self.block_size)
        for name, default in DFLASH_KEYS.items():
            value = getattr(self, name)
            if name in dcfg:
                dcfg[name] = value
            elif name != "block_size" and value != default:
                cfg[name] = value
        cfg.update({
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": dcfg,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings, "dtype": self.dtype,
            "hidden_act": self.hidden_act,
        })
        cfg.setdefault("tie_word_embeddings", True)
        return cfg

    @property
    def is_dflash2(self) -> bool:
        return self.selector_top_k is not None

    def hf_config(self):
        """The transformers Qwen3Config of this draft (the reference's config class): rope,
        layer types and sliding windows are read through it exactly as the reference reads them."""
        from transformers import Qwen3Config

        cfg = self.to_dict()
        try:
            return Qwen3Config.from_dict(cfg)
        except Exception as err:  # noqa: BLE001 - any validation failure is a config problem
            raise UserError(f"draft config is not a valid Qwen3-style config: {err}") from err


def _read_dflash2(out: DraftConfig, cfg: dict, dcfg: dict) -> None:
    """The DFlash 2 settings of a DFlash2DraftModel config, checked (one-line UserErrors)."""
    for name in dflash2.DFLASH2_KEYS:
        value = _lookup(cfg, dcfg, name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"DFlash 2 draft config: {name} is {value!r}",
                            f"dflash_config.{name} must be a positive integer")
        setattr(out, name, value)
    if out.hidden_size % out.conv_group_size:
        raise UserError(f"DFlash 2 draft config: conv_group_size {out.conv_group_size} does not "
                        f"divide hidden_size {out.hidden_size}")
    if out.selector_top_k > out.vocab_size:
        raise UserError(f"DFlash 2 draft config: selector_top_k {out.selector_top_k} exceeds "
                        f"vocab_size {out.vocab_size}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, keep_float64=True)


def rope_setup(cfg: DraftConfig) -> tuple[torch.Tensor, float, int | None]:
    """(inv_freq float32, attention scaling, limit) from transformers' own rotary init.

    ``limit``: for the length-dependent types (dynamic, longrope) the sequence length up to
    which the frequencies are the static ones computed here (HF recomputes them beyond it)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf = cfg.hf_config()
    params = hf.rope_parameters or {}
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UserError(f"draft rope type '{kind}' (rope_scaling / rope_parameters) is not "
                        f"supported", f"supported rope types: {', '.join(ROPE_TYPES)}")
    try:
        rotary = Qwen3RotaryEmbedding(hf)
    except Exception as err:  # noqa: BLE001 - missing/invalid rope parameters
        raise UserError(f"draft rope settings (rope_type '{kind}') are invalid: "
                        f"{type(err).__name__}: {err}") from err
    inv = rotary.inv_freq.float()
    if 2 * inv.numel() != cfg.head_dim:
        raise UserError(f"draft rope covers {2 * inv.numel()} of {cfg.head_dim} head dims "
                        "(partial_rotary_factor); only full rotary is supported")
    limit = None
    if kind == "dynamic":
        limit = int(rotary.original_max_seq_len)
    elif kind == "longrope":
        limit = int(params.get("original_max_position_embeddings") or hf.max_position_embeddings)
    return inv, float(rotary.attention_scaling), limit


def rope_inv_freq(cfg: DraftConfig) -> torch.Tensor:
    return rope_setup(cfg)[0]


def attention_kinds(cfg: DraftConfig) -> list[tuple[bool, int | None]]:
    """Per draft layer (causal, window), read as the reference reads them: a layer typed
    ``sliding_attention`` is causal with window ``sliding_window`` (None: causal only); a
    top-level ``is_causal`` sets causality for every layer; ``full_attention`` sees all."""
    hf = cfg.hf_config()
    types = getattr(hf, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    bad = sorted(set(types) - set(ATTENTION_KINDS))
    if bad or len(types) < cfg.num_hidden_layers:
        raise UserError(f"draft layer_types {types} not supported",
                        f"one of {', '.join(ATTENTION_KINDS)} per draft layer")
    forced = getattr(hf, "is_causal", None)
    kinds = []
    for kind in types[:cfg.num_hidden_layers]:
        sliding = kind == "sliding_attention"
        window = getattr(hf, "sliding_window", None) if sliding else None
        kinds.append((sliding if forced is None else bool(forced),
                      None if window is None else int(window)))
    return kinds


def kind_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None):
    """Boolean visibility [Q, K] of keys at ``k_pos`` for queries at ``q_pos`` (the reference's
    rules), or None when everything is visible (a full-attention layer)."""
    if not causal and window is None:
        return None
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if window is not None:
        visible &= diff < window
        if not causal:
            visible &= -diff < window
    return visible


def check_activation(name: str):
    """The MLP activation ``hidden_act`` as transformers defines it."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise UserError(f"draft hidden_act '{name}' is not supported",
                        f"use one of transformers' activations ({', '.join(sorted(ACT2FN))})")
    return F.silu if name == "silu" else ACT2FN[name]  # the function nn.SiLU calls, minus a hop


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, T, D] or [T, D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return rope(x, cos, sin)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.causal, self.window = False, None  # set by DFlashDraft (attention_kinds)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys (normed, rotated) and values for inputs x [B, T, H] -> [B, kv, T, D]."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def attend(self, q, k, v, mask):
        """Non-causal attention of q over k/v with an optional boolean/additive mask."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv)
        b, _, t, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = check_activation(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention_conv = self.mlp_conv = None  # DFlash 2: dynamic convs around both
        if cfg.is_dflash2:
            self.attention_conv = dflash2.DynamicConv(cfg.hidden_size, cfg.conv_kernel_size,
                                                      cfg.conv_group_size)
            self.mlp_conv = dflash2.DynamicConv(cfg.hidden_size, cfg.conv_kernel_size,
                                                cfg.conv_group_size)

    def forward(self, h, ctx, q_rope, k_rope, mask):
        """h: block states [B, Q, H]; ctx: projected target features [B, S, H] (not normed here)."""
        x = self.input_layernorm(h)
        if self.attention_conv is not None:
            x, kernel = self.attention_conv.prepare(x)
        attn = self.self_attn
        q = attn.project_q(x, *q_rope)
        k, v = attn.project_kv(torch.cat([ctx, x], dim=1), *k_rope)
        if mask is None and (attn.causal or attn.window is not None):
            s_q, s_k = q.shape[2], k.shape[2]
            k_pos = torch.arange(s_k, device=h.device)
            mask = kind_mask(k_pos[s_k - s_q:], k_pos, attn.causal, attn.window)[None, None]
        out = attn.attend(q, k, v, mask)
        if self.attention_conv is not None:
            out = self.attention_conv.finish(out, kernel)
        h = h + out
        x = self.post_attention_layernorm(h)
        if self.mlp_conv is None:
            return h + self.mlp(x)
        x, kernel = self.mlp_conv.prepare(x)
        return h + self.mlp_conv.finish(self.mlp(x), kernel)


class DFlashDraft(nn.Module):
    """DFlash block-diffusion draft. ``from_pretrained`` reads the z-lab checkpoint format."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        n_f = len(config.target_layer_ids)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_hidden_layers))
        self.fc = nn.Linear(n_f * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq, self.attention_scaling, self.rope_limit = rope_setup(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_kinds = attention_kinds(config)
        for layer, (causal, window) in zip(self.layers, self.attention_kinds):
            layer.self_attn.causal, layer.self_attn.window = causal, window
        self.candidate_selector = None  # DFlash 2: proposals are the selector's walk
        if config.is_dflash2:
            self.candidate_selector = dflash2.CandidateSelector(
                config.hidden_size, config.vocab_size, config.selector_rank,
                config.selector_top_k)

    @property
    def is_dflash2(self) -> bool:
        return self.candidate_selector is not None

    # --- the attributes users of the upstream draft rely on
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def full_attention(self) -> bool:
        """Every layer bidirectional over the whole context + block (no mask)."""
        return all(not c and w is None for c, w in self.attention_kinds)

    # --- forward
    def embed_block(self, embed, block_ids: torch.Tensor) -> torch.Tensor:
        """The block input: the target's embedding of ``block_ids`` times input_embedding_scale."""
        h = embed(block_ids)
        scale = self.config.input_embedding_scale
        return h if scale == 1.0 else h * scale

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """output_multiplier, then tanh softcapping, on the output head's logits."""
        mult, cap = self.config.output_multiplier, self.config.final_logit_softcapping
        if mult != 1.0:
            logits = logits * mult
        if cap is not None and cap > 0:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def compute_logits(self, hidden: torch.Tensor, output_head) -> torch.Tensor:
        """Draft logits of final-normed block states through the target's output head."""
        return self.finish_logits(output_head(hidden))

    def project_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """Concatenated target features [B, S, n_f*H] -> conditioning c [B, S, H]."""
        return self.hidden_norm(self.fc(target_hidden))

    def forward(self, noise_embedding: torch.Tensor, target_hidden: torch.Tensor,
                position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block states after the final norm.

        noise_embedding: target-embedded block tokens [B, Q, H]; target_hidden: features of the
        context [B, S, n_f*H]; position_ids: [B, S+Q] (context then block positions);
        attention_mask: None (each layer's own kind: see ``attention_kinds``) or a
        boolean/additive [B or 1, 1, Q, S+Q] mask used by every layer.
        """
        ctx = self.project_context(target_hidden)
        q_len = noise_embedding.shape[1]
        dtype = noise_embedding.dtype
        k_rope = rope_cos_sin(self.inv_freq, position_ids, dtype, self.attention_scaling)
        q_rope = (k_rope[0][:, -q_len:], k_rope[1][:, -q_len:])
        h = noise_embedding
        for layer in self.layers:
            h = layer(h, ctx, q_rope, k_rope, attention_mask)
        return self.norm(h)

    # --- checking against a target
    def check_target(self, target) -> None:
        """Raise UserError unless this draft fits ``target`` (an HF causal LM)."""
        tcfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        cfg = self.config
        problems = []
        if tcfg.hidden_size != cfg.hidden_size:
            problems.append(f"hidden size {cfg.hidden_size} != target's {tcfg.hidden_size}")
        n_layers = tcfg.num_hidden_layers
        bad = [i for i in cfg.target_layer_ids if not 0 <= i < n_layers]
        if bad:
            problems.append(f"target layer ids {bad} outside the target's {n_layers} layers")
        rows = target.get_input_embeddings().weight.shape[0]
        if not 0 <= cfg.mask_token_id < rows:
            problems.append(f"mask token id {cfg.mask_token_id} outside the target's "
                            f"embedding table ({rows} rows)")
        head = target.get_output_embeddings()
        if self.is_dflash2 and head is not None and \
                head.weight.shape[0] > self.candidate_selector.successor_codebook.weight.shape[0]:
            problems.append(f"selector codebooks of {cfg.vocab_size} rows for the target's "
                            f"{head.weight.shape[0]}-token output head")
        if problems:
            raise UserError("the draft does not fit the target: " + "; ".join(problems),
                            "use the draft trained for this target")

    # --- loading and saving
    @classmethod
    def from_config(cls, config: "DraftConfig | dict | str | Path") -> "DFlashDraft":
        if isinstance(config, (str, Path)):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        if isinstance(config, dict):
            config = DraftConfig.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype=None, device_map=None,
                        torch_dtype=None, device=None, **_ignored) -> "DFlashDraft":
        """Load a draft from a local folder or a hub id (``dtype``: torch dtype, name or 'auto')."""
        from safetensors.torch import load_file

        folder = resolve_model_dir(str(name_or_path), what="draft",
                                   allow_patterns=["*.json", "*.safetensors"])
        cfg_dict = json.loads((folder / "config.json").read_text())
        archs = cfg_dict.get("architectures") or []
        if "dflash_config" not in cfg_dict and not any("DFlash" in str(a) for a in archs) \
                and "num_target_layers" not in cfg_dict:
            raise UserError(f"'{name_or_path}' is not a DFlash draft (its config.json has no "
                            "dflash_config)", "pass the draft checkpoint as the draft")
        config = DraftConfig.from_dict(cfg_dict)
        dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config.dtype)
        target_device = resolve_device(device if device is not None else device_map)
        with torch.device("meta"):
            model = cls(config)
        state = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"no .safetensors weights in '{folder}'")
        for f in files:
            state.update(load_file(str(f)))
        state = dflash2.rename_codebooks(state)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise UserError(
                f"draft weights in '{folder}' do not match the DFlash layout "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        state = {k: v.to(dtype=dtype, device=target_device) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_setup(config)[0].to(target_device)
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["dtype"] = str(self.dtype).replace("torch.", "")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def resolve_dtype(dtype, default: str = "float32") -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = default
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).replace("torch.", "") in DTYPES:
        return DTYPES[str(dtype).replace("torch.", "")]
    raise UserError(f"unknown dtype '{dtype}'", "use float32, bfloat16 or float16")


def resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()), "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)
