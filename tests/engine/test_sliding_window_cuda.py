"""Issue 21 on CUDA: a Qwen3 target with sliding-window layers decodes greedily, with the
engine ``--engine auto`` picks for it on a GPU, exactly as ``target.generate``.

The target: 4 layers, layers 1-3 sliding with a window of 16 (``use_sliding_window``,
``max_window_layers=1``), prompts of 40-100 tokens, so every prompt and generation runs past
the window; a random draft (it accepts little: the cycles still roll back partly accepted
blocks). float32: the whole output equals ``target.generate``. bfloat16: our kernels round
differently from HF's, so an output may leave HF's only at a near-tie of HF's own logits
(how far each one agrees is printed).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA-only: the fast engine and its window kernel")

WINDOW, PROMPTS, NEW, BLOCKS = 16, (40, 70, 100), 40, (4, 8, 16)


def make_target(dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    model.generation_config.eos_token_id = None  # run to max_new_tokens
    return model.to("cuda", dtype).eval()


def reference(target, ids):
    """(greedy tokens of target.generate, its logits per step as float32 rows)."""
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [l[0].float() for l in out.logits]


def agreeing_steps(out, ref, logits, exact: bool) -> int:
    """How many steps ``out`` follows ``ref``. float32: all of them. bfloat16: up to a
    divergence, which must be at a near-tie of HF's own logits (the token we chose scores
    within 5% of HF's top logit there: bf16 rounding of another kernel can flip that)."""
    for t, (a, b) in enumerate(zip(out, ref)):
        if a != b:
            top = logits[t][b].item()
            gap = top - logits[t][a].item()
            assert not exact and gap <= 0.05 * max(1.0, abs(top)), \
                f"step {t}: {a} instead of {b}, {gap:.4f} below HF's top logit {top:.4f}"
            return t
    assert len(out) == len(ref)
    return len(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sliding_window_target_greedy_equals_generate_on_cuda(dtype):
    from dflash.decoding.loop import SpeculativeDecoder
    from dflash.engine.static import layer_windows
    from dflash.model.toy import make_random_draft

    target = make_target(dtype)
    assert layer_windows(target.config, 4) == [None, WINDOW, WINDOW, WINDOW]
    draft = make_random_draft(target, block_size=16, dtype=dtype).to("cuda").eval()
    dec = SpeculativeDecoder(target, draft, engine="auto")
    print(f"{dtype}: --engine auto chose {dec.engines.description}")
    assert dec.engine_name == "fast", dec.engines.description
    g = torch.Generator().manual_seed(5)
    exact = dtype == torch.float32
    for n in PROMPTS:
        ids = torch.randint(1, 511, (1, n), generator=g).to("cuda")
        ref, logits = reference(target, ids)
        steps = []
        for b in BLOCKS:
            out = dec.generate(ids, NEW, block_size=b).output_ids
            steps.append(agreeing_steps(out, ref, logits, exact))
        print(f"  prompt of {n} tokens: equal to target.generate for {steps} of {NEW} tokens "
              f"(block sizes {list(BLOCKS)})")
