"""The fused sampling cycle (``fused_cycle.SamplingCycle``) and its capture-safe pieces.

CPU graph mode runs the cycle eagerly with the same fixed shapes as its CUDA graph. Its
emitted tokens must follow the filtered target law exactly (chi-square p > 1e-3 and TV under
3x its expected size, fixed seeds, the exact laws of ``test_filtered_sampling``) at b = 1, 4
and 16, with and without top-p / top-k; the same seed gives the same tokens; the cheaper
filters (``filtered_probs``, and ``sparse_filtered`` for top-k) keep exactly ``probs_at``'s
set, ties and T != 1 included.
"""
from __future__ import annotations

import pytest
import torch

from dflash.decoding import sampling
from dflash.decoding.fused_cycle import SamplingCycle
from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.sampling import filtered_probs, probs_at, sample, sparse_filtered
from dflash.model.toy import make_random_draft, make_random_target
from tests.decoding.test_filtered_sampling import (ALPHA, PROMPT, SETTINGS, VOCAB, chi2_pvalue,
                                                   exact_laws, tv_bound, tv_distance)

CASES = {"plain": (1.0, 1.0, 0), **SETTINGS}


@pytest.fixture(scope="module")
def decoder():
    target = make_random_target(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=4)
    dec = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    assert dec.graphs
    return dec


@pytest.fixture(scope="module")
def exact(decoder):
    return exact_laws(decoder.target, CASES)


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("setting", list(CASES))
def test_fused_cycle_follows_the_filtered_target(decoder, exact, setting, b):
    """400 generations of 3 tokens per case: tokens 1-2 jointly and token 3 (both from the
    fused cycle after the prefill's first token); b > 1 must see acceptances and rejections."""
    t, top_p, top_k = CASES[setting]
    n = 400
    gen = torch.Generator().manual_seed(300 + 7 * b + list(CASES).index(setting))
    c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    c3 = torch.zeros(VOCAB, dtype=torch.long)
    taus = []
    for _ in range(n):
        res = decoder.generate(torch.tensor([PROMPT]), 3, temperature=t, top_p=top_p,
                               top_k=top_k, block_size=b, generator=gen)
        out = res.output_ids
        c12[out[0] * VOCAB + out[1]] += 1
        c3[out[2]] += 1
        taus += [c.tau for c in res.cycles]
    assert isinstance(decoder._cycles.get((b > 1, (t, top_p, top_k))), SamplingCycle)
    if b > 1:
        assert max(taus) > 1 and min(taus) < b, "no acceptance or no rejection: vacuous"
    joint12, marg3 = exact[setting]
    assert chi2_pvalue(c12, joint12) > ALPHA
    assert tv_distance(c12, joint12) < tv_bound(joint12, n)
    assert chi2_pvalue(c3, marg3) > ALPHA
    assert tv_distance(c3, marg3) < tv_bound(marg3, n)


@pytest.mark.parametrize("b", [1, 4])
def test_same_seed_same_tokens(decoder, b):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return decoder.generate(torch.tensor([PROMPT]), 24, temperature=0.8, top_p=0.8,
                                top_k=5, block_size=b, generator=gen).output_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def _tied_logits(gen, rows, vocab, scale):
    """Logits on a coarse grid (many exact ties), some rows flat, one row all equal."""
    x = (torch.randn(rows, vocab, generator=gen) * scale * 4).round() / 4
    x[0] = 0.0
    x[1, : vocab // 2] = x[1].max()
    return x


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_filtered_probs_keeps_probs_at_set(temperature, monkeypatch):
    """Same kept set as probs_at (exactly) and the same law (up to float rounding), on the
    top-k path, the values-sort path (TOPK_CANDIDATES_MAX lowered) and without filters."""
    gen = torch.Generator().manual_seed(int(temperature * 10))
    vocab = 48
    for dtype in (torch.float32, torch.bfloat16):
        logits = _tied_logits(gen, 12, vocab, 1.5).to(dtype)
        for top_k in (0, 1, 3, 7, 20, vocab - 1, vocab, vocab + 5):
            for top_p in (1.0, 0.95, 0.5, 0.1, 1e-9):
                for limit in (sampling.TOPK_CANDIDATES_MAX, 4):
                    monkeypatch.setattr(sampling, "TOPK_CANDIDATES_MAX", limit)
                    ref = probs_at(logits, temperature, top_p, top_k)
                    got = filtered_probs(logits, temperature, top_p, top_k)
                    case = (dtype, top_k, top_p, limit)
                    assert torch.equal(got > 0, ref > 0), case
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=str(case))
                    if 0 < top_k < vocab:
                        got = _dense(*sparse_filtered(logits, temperature, top_p, top_k), vocab)
                        assert torch.equal(got > 0, ref > 0), ("sparse",) + case
                        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6,
                                                   msg=str(("sparse",) + case))


def _dense(ids, probs, vocab):
    """A sparse law (ids, probs) as a dense [n, vocab] one; zero slots' ids are ignored."""
    ids = torch.where(probs > 0, ids, 0)
    return torch.zeros(probs.shape[0], vocab).scatter_add_(-1, ids, probs)


def test_race_sample_law():
    """The exponential race draws each row's categorical (zero-weight tokens never, weights
    need not be normalised)."""
    gen = torch.Generator().manual_seed(2)
    w = torch.tensor([[0.0, 3.0, 1.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    n = 20000
    draws = sample(w.repeat(n, 1), gen).view(n, 2)
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=5)
        probs = w[row] / w[row].sum()
        assert chi2_pvalue(counts, probs) > ALPHA
        assert tv_distance(counts, probs) < tv_bound(probs, n)
