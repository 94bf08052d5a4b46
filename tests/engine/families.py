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
# per-layer input embeddings sized to the vocabulary (the default table has 262144 rows)
_GEMMA4 = dict(sliding_window=8, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16)
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
    "gemma4": ("gemma4_text", _GEMMA4),
    "gemma4_moe": ("gemma4_text", dict(_GEMMA4, enable_moe_block=True, num_experts=4,
                                       top_k_experts=2, moe_intermediate_size=32)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}


def make_family_target(family: str, dtype=torch.float64, seed: int = 0, **overrides):
    """``overrides``: config values instead of COMMON's / the family's (other sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    kw = {**COMMON, **extra, **overrides}
    if "vocab_size_per_layer_input" in kw:
        kw["vocab_size_per_layer_input"] = kw["vocab_size"]
    cfg = AutoConfig.for_model(model_type, **kw)
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


def make_family_draft(target, block_size: int = 16, seed: int = 1, cls=None):
    """A random DFlash draft for a family target, sized from its config (toy.make_random_draft:
    per-layer-only head_dim / KV heads read from the layers); features of layers 1 and n-1."""
    from dflash.model.draft import DFlashDraft
    from dflash.model.toy import make_random_draft

    n = target.config.get_text_config().num_hidden_layers
    return make_random_draft(target, block_size=block_size, target_layer_ids=[1, n - 1],
                             mask_token_id=target.config.get_text_config().vocab_size - 1,
                             seed=seed, dtype=torch.float64, cls=cls or DFlashDraft)


def family_prompts(n: int = 20, seed: int = 11, lengths=(5, 7, 9, 12, 15, 19)):
    """``n`` random prompts [1, L] (ids 1..126: 0 pads, 127 is the draft's mask); some are
    longer than the window of 8."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 127, (1, lengths[i % len(lengths)]), generator=g) for i in range(n)]


def greedy_references(target, prompts, n):
    """``greedy_reference`` of each prompt, batched over prompts of one length (no padding)."""
    refs = [None] * len(prompts)
    for length in sorted({p.shape[1] for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if p.shape[1] == length]
        ids = torch.cat([prompts[i] for i in idx])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        for r, i in enumerate(idx):
            refs[i] = out[r, length:].tolist()
    return refs


def train_family_draft(target, sequences, prompt_lens, *, block_size: int = 16,
                       steps: int = 25, anchors: int = 2, seed: int = 1, lr: float = 1.5e-2):
    """A draft trained for a few seconds on the target's own greedy continuations
    (``sequences``: prompt + continuation; the loss covers the continuation) with the
    package's recipe: anchors, masked blocks, decaying weights. The target's features are
    computed once (it is frozen). Brief on purpose: proposals are often accepted and often
    rejected."""
    from dflash.decoding.quickstart import DFlashDraftModel
    from dflash.training.features import target_features
    from dflash.training.recipe import (build_block_batch, default_gamma, draft_hidden,
                                        sample_anchors, weighted_ce)

    target.requires_grad_(False)  # no weight gradients through its embed / lm_head
    draft = make_family_draft(target, block_size=block_size, seed=seed, cls=DFlashDraftModel)
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros(ids.shape)
    for r, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, p:len(seq)] = 1.0
    feats = target_features(target, ids, draft.config.target_layer_ids)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    g, gamma = torch.Generator().manual_seed(seed + 100), default_gamma(block_size)
    draft.train()
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        a, keep = sample_anchors(mask, anchors, g)
        batch = build_block_batch(ids, mask, a, keep, block_size, draft.config.mask_token_id,
                                  gamma)
        total, wsum, _ = weighted_ce(draft_hidden(draft, embed, feats, batch), lm_head,
                                     batch.labels, batch.weights)
        opt.zero_grad()
        (total / wsum.clamp(min=1e-6)).backward()
        opt.step()
    return draft.requires_grad_(False).eval()


_PAIRS = {}
N_NEW = 16


def family_case(family):
    """(target, trained draft, prompts, greedy references of N_NEW tokens), built once per
    test session: the draft is trained on the references' own continuations."""
    if family not in _PAIRS:
        target = make_family_target(family)
        prompts = family_prompts()
        refs = greedy_references(target, prompts, N_NEW)
        seqs = [p[0].tolist() + r for p, r in zip(prompts, refs)]
        draft = train_family_draft(target, seqs, [p.shape[1] for p in prompts])
        _PAIRS[family] = (target, draft, prompts, refs)
    return _PAIRS[family]
