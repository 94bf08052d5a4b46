"""DFlash 2 drafts decode losslessly: greedy equals the target's own greedy output for every
block size, and T=1 sampling (with and without top-p / top-k) emits the filtered target law.

The statistical checks reuse test_filtered_sampling.py's helpers and thresholds: chi-square
p > 1e-3 and total variation under 3x its expected size, on a vocabulary of 8, where the
selector's q has mass on 3 candidates only (so residual draws outside the candidates occur).
"""
from __future__ import annotations

import pytest
import torch

from dflash.decoding import loop as loop_mod
from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.multiround import MultiRoundDecoder
from dflash.decoding.sampling import speculative_accept
from dflash.decoding.scheduler import CostModelScheduler, EWMAScheduler
from dflash.errors import UserError
from dflash.model.dflash2 import dflash2_from_dflash1
from dflash.model.hub import EMBEDDED_DRAFT, EMBEDDED_TARGET
from dflash.model.toy import make_random_draft, make_random_target

from test_filtered_sampling import ALPHA, chi2_pvalue, exact_laws, tv_bound, tv_distance
from test_lossless import prompts, reference

MAX_NEW = 23  # not a multiple of most block sizes: the last block ends mid-way


def _dflash2(target, block_size, seed, top_k, num_layers=2, group=8):
    d1 = make_random_draft(target, block_size=block_size, num_layers=num_layers, seed=seed)
    d2 = dflash2_from_dflash1(d1, conv_kernel_size=3, conv_group_size=group, selector_rank=4,
                              selector_top_k=top_k, seed=seed, noise=1.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # convs well away from the identity
        for name, p in d2.named_parameters():
            if "_conv." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return d2


@pytest.fixture(scope="module")
def greedy_pair():
    """(target, DFlash 2 draft, prompts): the embedded pair's trained draft converted (so
    cycles accept several tokens and roll back), else a random pair."""
    if not (EMBEDDED_TARGET / "config.json").exists():
        target = make_random_target(vocab_size=96, hidden_size=32, num_layers=2, num_heads=2,
                                    num_kv_heads=1, seed=5)
        return target, _dflash2(target, 16, seed=6, top_k=6), prompts(96, n=2, seed=3)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash.builtin_prompts import BUILTIN_SETS
    from dflash.decoding.quickstart import DFlashDraftModel

    target = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    d1 = DFlashDraftModel.from_pretrained(EMBEDDED_DRAFT, dtype=torch.float32)
    draft = dflash2_from_dflash1(d1, conv_kernel_size=3, conv_group_size=32, selector_rank=16,
                                 selector_top_k=8, seed=2, noise=0.15)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    texts = [t for texts in BUILTIN_SETS.values() for t in texts]
    ids = [tok(texts[i], return_tensors="pt").input_ids[:, :40] for i in (0, 3)]
    return target, draft, ids


@pytest.mark.parametrize("engine, kw", [("static", {}), ("hf", {}),
                                        ("fast", dict(compile=False, _cpu_graph_mode=True))])
def test_greedy_equals_target_generate_every_block_size(greedy_pair, engine, kw):
    """Block sizes 2..16 (drafted natively), truncation mode at 16 for a few, on the static
    engine (CpuDraftEngine), the HF engine and the graph-mode engine on CPU (fused cycle)."""
    target, draft, ids_list = greedy_pair
    dec = SpeculativeDecoder(target, draft, engine=engine, **kw)
    taus = []
    for ids in ids_list[:2 if engine == "static" else 1]:
        ref = reference(target, ids, MAX_NEW)
        for b in range(2, 17):
            res = dec.generate(ids, MAX_NEW, block_size=b)
            assert res.output_ids == ref, (engine, b)
            taus += [c.tau for c in res.cycles]
        for b in (3, 8):
            res = dec.generate(ids, MAX_NEW, block_size=b, draft_block_size=16)
            assert res.output_ids == ref, (engine, "truncation", b)
    if EMBEDDED_TARGET.joinpath("config.json").exists():
        assert max(taus) > 3  # accepted runs and rollbacks were exercised


def test_dynamic_schedulers_and_unfused_graph_mode(greedy_pair, monkeypatch):
    """The schedulers only pick block sizes: lossless with DFlash 2 too; so is graph mode's
    unfused loop (DFLASH_FUSED_CYCLE=0)."""
    target, draft, ids_list = greedy_pair
    ids = ids_list[1]
    ref = reference(target, ids, MAX_NEW)
    dec = SpeculativeDecoder(target, draft)
    for policy in (EWMAScheduler(candidates=[2, 4, 8], warmup_cycles=1),
                   CostModelScheduler(candidates=[2, 4])):
        res = dec.generate(ids, MAX_NEW, policy=policy)
        assert res.output_ids == ref
        assert {c.block_size for c in res.cycles} <= set(policy.candidates)
    monkeypatch.setenv("DFLASH_FUSED_CYCLE", "0")
    dec = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    for b in (4, 16):
        assert dec.generate(ids, MAX_NEW, block_size=b).output_ids == ref, b


def test_multiround_refuses_dflash2_in_one_line(greedy_pair):
    target, draft, _ = greedy_pair
    for mode in ("faithful", "tree"):
        with pytest.raises(UserError, match="DFlash 2") as err:
            MultiRoundDecoder(target, draft, [4, 3], mode=mode)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- T=1 exactness
VOCAB = 8
PROMPT = [1, 2, 3]
SETTINGS = {"plain": (1.0, 1.0, 0), "top_k": (1.0, 1.0, 3), "top_p": (1.0, 0.7, 0),
            "both": (0.8, 0.8, 5)}


@pytest.fixture(scope="module")
def small_pair():
    target = make_random_target(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    return target, _dflash2(target, 4, seed=4, top_k=3, num_layers=1, group=4)


@pytest.fixture(scope="module")
def exact(small_pair):
    """Per setting: the joint law of tokens 1-2 [V*V] and the marginal of token 3 [V]."""
    return exact_laws(small_pair[0], SETTINGS, VOCAB, PROMPT)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_first_tokens_follow_the_filtered_target(small_pair, exact, setting, monkeypatch):
    """400 generations of 3 tokens at block size 4: tokens 1-2 jointly and token 3's marginal
    pass chi-square and TV; acceptances, rejections and residual draws of a token outside the
    candidates all occurred; q had mass on the candidates only (3 of 8 tokens)."""
    target, draft = small_pair
    t, top_p, top_k = SETTINGS[setting]
    seen = {"calls": 0, "outside": 0}

    def spy(proposals, q, p, generator=None):
        assert bool(((q > 0).sum(-1) <= 3).all()) and bool((q.gather(1, proposals[:, None]) > 0).all())
        accepted, nxt = speculative_accept(proposals, q, p, generator)
        a = int(accepted)
        if a < proposals.numel() and float(q[a, nxt[a]]) == 0.0:
            seen["outside"] += 1
        seen["calls"] += 1
        return accepted, nxt

    monkeypatch.setattr(loop_mod, "speculative_accept", spy)
    dec = SpeculativeDecoder(target, draft)
    n = 400
    gen = torch.Generator().manual_seed(2000 + list(SETTINGS).index(setting))
    c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    c3 = torch.zeros(VOCAB, dtype=torch.long)
    accepted = rejected = 0
    for _ in range(n):
        res = dec.generate(torch.tensor([PROMPT]), 3, block_size=4, generator=gen,
                           temperature=t, top_p=top_p, top_k=top_k)
        out = res.output_ids
        assert len(out) == 3
        c12[out[0] * VOCAB + out[1]] += 1
        c3[out[2]] += 1
        accepted += sum(c.tau > 1 for c in res.cycles)
        rejected += sum(c.tau < 4 for c in res.cycles)
    joint12, marg3 = exact[setting]
    assert accepted > 0 and rejected > 0 and seen["outside"] > 0, (accepted, rejected, seen)
    assert chi2_pvalue(c12, joint12) > ALPHA
    assert tv_distance(c12, joint12) < tv_bound(joint12, n)
    assert chi2_pvalue(c3, marg3) > ALPHA
    assert tv_distance(c3, marg3) < tv_bound(marg3, n)
