"""Tiny random targets of each family, from transformers' own config classes (issue 23).

vocab 128, hidden 64, 4 layers, 4 query / 2 KV heads of 16, windows of 8, MoE with 4 experts
(top-2); float64 so that greedy ties between engines are out of reach of rounding."""
import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              tie_word_embeddings=False)
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
               linear_value_head_dim=16, full_attention_interval=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {
    "qwen3_sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=8,
                                    max_window_layers=1)),
    "qwen3_moe": ("qwen3_moe", dict(_MOE, decoder_sparse_step=1)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen3_5": ("qwen3_5_text", _LINEAR),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(_LINEAR, **_MOE, shared_expert_intermediate_size=32)),
    "qwen3_next": ("qwen3_next", dict(_LINEAR, **_MOE, shared_expert_intermediate_size=32)),
    "gemma4": ("gemma4_text", dict(sliding_window=8)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}


def make_family_target(family: str, dtype=torch.float64, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    cfg = AutoConfig.for_model(model_type, **COMMON, **extra)
    torch.manual_seed(seed)
    # eager experts: the grouped-GEMM kernel has no float64
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = None  # generate runs to max_new_tokens (gemma4: 1)
    return model.to(dtype).eval()


def greedy_reference(target, ids, n):
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def make_family_draft(target, block_size: int = 16, seed: int = 1):
    """A random DFlash draft for a family target (sizes from COMMON: some families' configs
    only have per-layer head_dim / KV heads)."""
    from dflash.model.draft import DFlashDraft, DraftConfig

    n = COMMON["num_hidden_layers"]
    cfg = DraftConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                      block_size=block_size, num_target_layers=n, mask_token_id=127,
                      target_layer_ids=[1, n - 1], rope_theta=10000.0, dtype="float64")
    torch.manual_seed(seed)
    draft = DFlashDraft(cfg)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return draft.to(torch.float64).eval()
