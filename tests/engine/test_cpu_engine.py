"""The CPU draft engine computes what the generic draft engine computes."""
import dataclasses

import pytest
import torch

from dflash.engine.cpu import CpuDraftEngine
from dflash.decoding.loop import SpeculativeDecoder
from dflash import DFlashDraftModel
from dflash.engine.draft import DraftEngine
from dflash.engine.static import StaticTargetEngine, decoder_parts
from dflash.model.toy import make_random_draft, make_random_target


def _with_bias(draft):
    """A copy of ``draft`` with attention biases (attention_bias=True), random."""
    cfg = dataclasses.replace(draft.config, attention_bias=True)
    out = DFlashDraftModel(cfg).to(draft.dtype)
    out.load_state_dict(draft.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return out.eval()


@pytest.mark.parametrize("arch,bias", [("qwen3", False), ("llama", False), ("qwen3", True)])
def test_cpu_draft_engine_matches_draft_engine(arch, bias):
    target = make_random_target(arch=arch, vocab_size=96, hidden_size=64, num_layers=3,
                                dtype=torch.float64)
    draft = make_random_draft(target, block_size=16, num_layers=2, dtype=torch.float64)
    if bias:
        draft = _with_bias(draft)
    embed, _, _, lm_head, _ = decoder_parts(target)
    ref = DraftEngine(draft, embed, lm_head, 128)
    cpu = CpuDraftEngine(draft, embed, lm_head, 128)
    tgt = StaticTargetEngine(target, draft.target_layer_ids, 128)
    ids = torch.randint(1, 95, (1, 40), generator=torch.Generator().manual_seed(0))
    _, feats = tgt.forward(ids, torch.arange(40), kv_len=40)
    with torch.inference_mode():
        for eng in (ref, cpu):  # a prompt, then a short per-cycle append
            eng.append_context(feats[:, :37], torch.arange(37))
            eng.append_context(feats[:, 37:], torch.arange(37, 40))
        for i in range(len(ref.k_cache)):
            torch.testing.assert_close(cpu.k_cache[i][:, :, :40], ref.k_cache[i][:, :, :40])
            torch.testing.assert_close(cpu.v_cache[i][:, :, :40], ref.v_cache[i][:, :, :40])
        for b in (2, 5, 16):
            block = torch.full((1, b), draft.mask_token_id)
            block[0, 0] = 7
            pos = torch.arange(40, 40 + b)
            a = ref.propose_logits(block, pos, kv_len=40 + b)
            c = cpu.propose_logits(block, pos, kv_len=40 + b)
            assert c.shape == a.shape == (1, b - 1, 96)
            torch.testing.assert_close(c, a)
            # graph-mode semantics (whole buffer, positional mask) go through the generic path
            torch.testing.assert_close(cpu.propose_logits(block, pos), a)


def test_cpu_static_decoder_uses_cpu_draft_engine():
    target = make_random_target(vocab_size=64, hidden_size=64, num_layers=2)
    draft = make_random_draft(target, block_size=8, num_layers=1)
    dec = SpeculativeDecoder(target, draft)
    dec.reserve(64)
    assert isinstance(dec.engines.draft_engine, CpuDraftEngine)
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                          do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert dec.generate(ids, 30, block_size=8).output_ids == ref
    assert type(SpeculativeDecoder(target, draft, engine="hf").engines.ensure(64)[1]) is DraftEngine
