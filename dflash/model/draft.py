"""The DFlash draft: a small stack of Qwen3-style layers conditioned on target features.

Loads the public z-lab checkpoints as published (``config.json`` with ``block_size``,
``num_target_layers``, ``dflash_config``; ``model.safetensors`` with names like
``layers.0.self_attn.q_proj.weight``, ``fc.weight``, ``hidden_norm.weight``, ``norm.weight``)
without ``trust_remote_code``. The draft has no embedding and no LM head: it borrows the
target's. See ``shared/reference/dflash-algorithm.md`` for the architecture.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
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
    extra: dict = field(default_factory=dict)  # every other key of config.json, kept on save

    @classmethod
    def from_dict(cls, cfg: dict) -> "DraftConfig":
        cfg = dict(cfg)
        dcfg = cfg.get("dflash_config") or {}
        try:
            n_layers = int(cfg["num_hidden_layers"])
            num_target_layers = int(cfg["num_target_layers"])
            ids = dcfg.get("target_layer_ids") or default_target_layer_ids(num_target_layers, n_layers)
            heads = int(cfg["num_attention_heads"])
            out = cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                vocab_size=int(cfg["vocab_size"]),
                block_size=int(cfg.get("block_size", 16)),
                num_target_layers=num_target_layers,
                mask_token_id=int(dcfg["mask_token_id"]),
                target_layer_ids=[int(i) for i in ids],
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta")
                                 or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)),
                rope_scaling=cfg.get("rope_scaling"),
                attention_bias=bool(cfg.get("attention_bias", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
                dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            )
        except KeyError as err:
            raise UserError(f"draft config lacks the key {err}",
                            "is this a DFlash draft checkpoint (config with dflash_config)?") from err
        known = set(asdict(out)) | {"dflash_config", "torch_dtype", "head_dim"}
        out.extra = {k: v for k, v in cfg.items() if k not in known}
        return out

    def to_dict(self) -> dict:
        cfg = dict(self.extra)
        cfg.setdefault("architectures", ["DFlashDraftModel"])
        cfg.setdefault("model_type", "qwen3")
        cfg.update({
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id,
                              "target_layer_ids": list(self.target_layer_ids)},
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings, "dtype": self.dtype,
            "hidden_act": "silu", "tie_word_embeddings": True,
        })
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, keep_float64=True)


def rope_inv_freq(cfg: DraftConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


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

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, ctx, q_rope, k_rope, mask):
        """h: block states [B, Q, H]; ctx: projected target features [B, S, H] (not normed here)."""
        x = self.input_layernorm(h)
        attn = self.self_attn
        q = attn.project_q(x, *q_rope)
        k, v = attn.project_kv(torch.cat([ctx, x], dim=1), *k_rope)
        h = h + attn.attend(q, k, v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


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
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

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

    # --- forward
    def project_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """Concatenated target features [B, S, n_f*H] -> conditioning c [B, S, H]."""
        return self.hidden_norm(self.fc(target_hidden))

    def forward(self, noise_embedding: torch.Tensor, target_hidden: torch.Tensor,
                position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block states after the final norm.

        noise_embedding: target-embedded block tokens [B, Q, H]; target_hidden: features of the
        context [B, S, n_f*H]; position_ids: [B, S+Q] (context then block positions);
        attention_mask: None (all visible) or boolean/additive [B or 1, 1, Q, S+Q].
        """
        ctx = self.project_context(target_hidden)
        q_len = noise_embedding.shape[1]
        dtype = noise_embedding.dtype
        k_rope = rope_cos_sin(self.inv_freq, position_ids, dtype)
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
        if "dflash_config" not in cfg_dict:
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
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise UserError(
                f"draft weights in '{folder}' do not match the DFlash layout "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        state = {k: v.to(dtype=dtype, device=target_device) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(config).to(target_device)
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
