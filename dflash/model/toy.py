"""Small randomly initialised targets and drafts, for tests and for runs without real models."""
from __future__ import annotations

import torch

from .draft import DFlashDraft, DraftConfig, default_target_layer_ids


def make_random_target(vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 4,
                       num_heads: int = 4, num_kv_heads: int = 2, arch: str = "qwen3",
                       seed: int = 0, dtype=torch.float32, max_positions: int = 4096):
    """A random HF causal LM (Qwen3 or Llama architecture)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=hidden_size * 3, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  head_dim=hidden_size // num_heads, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=10000.0, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    else:
        raise ValueError(f"unknown arch {arch}")
    # Larger weights than the default init make logits peaked, so greedy ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.to(dtype).eval()


def _text_config(target):
    """The text model's config (multimodal checkpoints nest it)."""
    cfg = target.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _config_value(cfg, name: str):
    """``cfg.name``, or where the config holds it per layer only (Gemma 4: sliding layers'
    head_dim differs from full layers'), the first layer's value; None if absent."""
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 - transformers' ambiguous per-layer attribute error
        layers = getattr(cfg, "per_layer_config", None) or []
        return getattr(layers[0], name, None) if len(layers) else None


def make_random_draft(target, block_size: int = 16, num_layers: int = 2,
                      target_layer_ids: list[int] | None = None, mask_token_id: int | None = None,
                      seed: int = 1, dtype=torch.float32, cls: type = DFlashDraft) -> DFlashDraft:
    """A random draft that fits ``target``; ``cls``: the class to build (a DFlashDraft)."""
    cfg = _text_config(target)
    n_target = cfg.num_hidden_layers
    ids = target_layer_ids or default_target_layer_ids(n_target, min(num_layers, n_target))
    ids = [min(max(i, 0), n_target - 1) for i in ids]
    heads = _config_value(cfg, "num_attention_heads")
    draft_cfg = DraftConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=_config_value(cfg, "intermediate_size") or cfg.hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=_config_value(cfg, "num_key_value_heads") or heads,
        head_dim=_config_value(cfg, "head_dim") or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size, block_size=block_size, num_target_layers=n_target,
        mask_token_id=cfg.vocab_size - 1 if mask_token_id is None else mask_token_id,
        target_layer_ids=ids, rope_theta=10000.0, dtype=str(dtype).replace("torch.", ""))
    torch.manual_seed(seed)
    draft = cls(draft_cfg)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return draft.to(dtype).eval()


def make_toy_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on the built-in prompts, with eos and mask tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..builtin_prompts import BUILTIN_SETS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<|eos|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([t for texts in BUILTIN_SETS.values() for t in texts], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return fast


def save_toy_pair(folder, block_size: int = 8, seed: int = 0, hidden_size: int = 64,
                  num_layers: int = 4):
    """Write a random target (+ tokenizer) and draft under ``folder``/target and ``folder``/draft."""
    from pathlib import Path

    folder = Path(folder)
    tok = make_toy_tokenizer()
    vocab = len(tok)
    target = make_random_target(vocab_size=vocab, hidden_size=hidden_size, num_layers=num_layers,
                                seed=seed)
    target.config.eos_token_id = tok.eos_token_id
    target.generation_config.eos_token_id = tok.eos_token_id
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    draft = make_random_draft(target, block_size=block_size, mask_token_id=mask_id, seed=seed + 1)
    target.save_pretrained(folder / "target")
    tok.save_pretrained(folder / "target")
    draft.save_pretrained(folder / "draft")
    return folder / "target", folder / "draft"
