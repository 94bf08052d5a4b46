"""Speculative sampling with top-p / top-k emits the *filtered* target distribution exactly.

Statistical checks with fixed seeds, on a vocabulary of 8: chi-square goodness of fit (cells
with expected count < 5 pooled; a sampled zero-probability cell fails outright) must give
p > ALPHA = 1e-3, and the total variation distance must stay under 3x its expected size
``E[TV] ~ 0.5 * sum_x sqrt(2 p(x) (1 - p(x)) / (pi n))`` (stated per check by
:func:`tv_bound`). The expected law is computed here from the HF forward in float64 with an
independent implementation of the reference filter (:func:`filtered`); the settings are chosen
so that no token sits within 1e-4 of a top-p or top-k boundary in any context the tests reach
(checked), so float32 rounding in the decoders cannot flip a token in or out.
"""
from __future__ import annotations

import math

import pytest
import torch

from dflash.decoding import loop as loop_mod
from dflash.decoding import multiround as multiround_mod
from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.multiround import MultiRoundDecoder
from dflash.decoding.sampling import multiround_accept_batch, probs_at, speculative_accept
from dflash.model.toy import make_random_draft, make_random_target

from scipy.stats import chisquare

ALPHA = 1e-3
VOCAB = 8
PROMPT = [1, 2, 3]
SETTINGS = {  # name: (temperature, top_p, top_k)
    "top_k": (1.0, 1.0, 3),
    "top_p": (1.0, 0.7, 0),
    "both": (0.8, 0.8, 5),
}


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value, cells with expected count < 5 pooled; 0 if a zero cell was hit."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if float(counts[probs == 0].sum()) > 0:
        return 0.0
    expected = probs * counts.sum()
    small = expected < 5
    obs, exp = counts[~small].tolist(), expected[~small].tolist()
    if bool(small.any()) and float(expected[small].sum()) > 0:
        obs.append(float(counts[small].sum()))
        exp.append(float(expected[small].sum()))
    if len(obs) < 2:
        return 1.0
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def tv_distance(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts = counts.double().flatten()
    return 0.5 * float((counts / counts.sum() - probs.double().flatten()).abs().sum())


def filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Reference filter, row by row in float64: sort by (logit desc, id), keep top_k, softmax,
    keep the tokens whose mass before them is < top_p, renormalise."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for row, vals in enumerate(logits.double().reshape(-1, logits.shape[-1]) / temperature):
        order = sorted(range(vals.numel()), key=lambda i: (-float(vals[i]), i))
        if top_k:
            order = order[:top_k]
        p = torch.softmax(vals[order], 0)
        before, keep = 0.0, []
        for j, i in enumerate(order):
            if before < top_p:
                keep.append((i, float(p[j])))
            before += float(p[j])
        total = sum(w for _, w in keep)
        for i, w in keep:
            out.view(-1, logits.shape[-1])[row, i] = w / total
    return out


def boundary_margin(logits: torch.Tensor, temperature, top_p, top_k) -> float:
    """Smallest distance of any token to a filter boundary (top-k logit gap, top-p mass)."""
    x = logits.double() / temperature
    s = x.sort(-1, descending=True).values
    margin = math.inf
    if top_k:
        margin = float((s[:, top_k - 1] - s[:, top_k]).min())
        s = s[:, :top_k]
    p = torch.softmax(s, -1)
    if top_p < 1:
        margin = min(margin, float(((p.cumsum(-1) - p) - top_p).abs().min()))
    return margin


def tv_bound(probs: torch.Tensor, n: int, factor: float = 3.0) -> float:
    p = probs.double().flatten()
    return factor * 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    target = make_random_target(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=4)
    return target, draft


def exact_laws(target, settings, vocab=VOCAB, prompt=PROMPT):
    """Per setting: the joint law of tokens 1-2 [V*V] and the marginal of token 3 [V]."""
    with torch.no_grad():
        l1 = target(torch.tensor([prompt])).logits[0, -1:]
        l2 = target(torch.tensor([prompt + [a] for a in range(vocab)])).logits[:, -1]
        l3 = target(torch.tensor([prompt + [a, b] for a in range(vocab)
                                  for b in range(vocab)])).logits[:, -1]
    out = {}
    for name, (t, top_p, top_k) in settings.items():
        assert boundary_margin(torch.cat([l1, l2, l3]), t, top_p, top_k) > 1e-4, name
        p1, p2 = filtered(l1, t, top_p, top_k)[0], filtered(l2, t, top_p, top_k)
        p3 = filtered(l3, t, top_p, top_k).view(vocab, vocab, vocab)
        joint12 = p1[:, None] * p2
        out[name] = (joint12.flatten(), (joint12[:, :, None] * p3).sum((0, 1)))
    return out


@pytest.fixture(scope="module")
def exact(pair):
    return exact_laws(pair[0], SETTINGS)


def _run(kind, target, draft):
    if kind == "single-round":
        dec = SpeculativeDecoder(target, draft)
        return lambda n, g, **kw: dec.generate(torch.tensor([PROMPT]), n, block_size=4,
                                               generator=g, **kw)
    dec = MultiRoundDecoder(target, draft, [4, 3], mode=kind)
    return lambda n, g, **kw: dec.generate(torch.tensor([PROMPT]), n, generator=g, **kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", ["single-round", "faithful", "tree"])
def test_first_tokens_follow_the_filtered_target(pair, exact, kind, setting):
    """500 generations per case. Tokens 1-2 jointly (at most k^2 of the 64 cells carry mass)
    and, for the decoders that emit several tokens per pass, the marginal of token 3 (which
    comes after an accepted proposal or a residual draw); both chi-square p > 1e-3 and TV under
    3x its expected size. Acceptances and rejections must both have occurred."""
    target, draft = pair
    t, top_p, top_k = SETTINGS[setting]
    n = 500
    length = 2 if kind == "faithful" else 3
    run = _run(kind, target, draft)
    gen = torch.Generator().manual_seed(1000 + 10 * list(SETTINGS).index(setting) + len(kind))
    c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    c3 = torch.zeros(VOCAB, dtype=torch.long)
    accepted = rejected = 0
    for _ in range(n):
        res = run(length, gen, temperature=t, top_p=top_p, top_k=top_k)
        out = res.output_ids
        assert len(out) == length
        c12[out[0] * VOCAB + out[1]] += 1
        if length == 3:
            c3[out[2]] += 1
        if kind == "single-round":
            accepted += sum(c.tau > 1 for c in res.cycles)
            rejected += sum(c.tau < 4 for c in res.cycles)
        else:
            accepted += sum(res.round_accepts)
            rejected += res.residual_draws
    joint12, marg3 = exact[setting]
    assert accepted > 0 and rejected > 0, "the test would not exercise acceptance and residuals"
    assert chi2_pvalue(c12, joint12) > ALPHA
    assert tv_distance(c12, joint12) < tv_bound(joint12, n)
    if length == 3:
        assert chi2_pvalue(c3, marg3) > ALPHA
        assert tv_distance(c3, marg3) < tv_bound(marg3, n)


def test_the_check_detects_unfiltered_output(pair, exact):
    """Power: unfiltered sampling fails the top-k law at once (tokens outside the top 3)."""
    target, draft = pair
    run = _run("single-round", target, draft)
    gen = torch.Generator().manual_seed(5)
    c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    for _ in range(100):
        out = run(2, gen, temperature=1.0).output_ids
        c12[out[0] * VOCAB + out[1]] += 1
    assert chi2_pvalue(c12, exact["top_k"][0]) < 1e-6


def _support_ok(probs: torch.Tensor, top_k: int) -> bool:
    return bool(((probs > 0).sum(-1) <= top_k).all())


def test_proposals_come_from_the_filtered_draft(pair, monkeypatch):
    """Every decoder tests proposals against a filtered q (at most top_k tokens) that gives
    them positive probability, and a filtered p; top_k=2 of 8 would be broken at once."""
    target, draft = pair
    top_k, seen = 2, {"single-round": 0, "faithful": 0, "tree": 0}

    def spy_single(proposals, q, p, generator=None):
        assert _support_ok(q, top_k) and _support_ok(p, top_k)
        assert bool((q.gather(1, proposals[:, None]) > 0).all())
        seen["single-round"] += 1
        return speculative_accept(proposals, q, p, generator)

    orig_accept, orig_walk = multiround_mod.multiround_accept, multiround_mod.walk_tree

    def spy_faithful(p, qs, generator=None, proposal_tokens=None):
        assert _support_ok(p, top_k) and all(_support_ok(q, top_k) for q in qs)
        seen["faithful"] += 1
        return orig_accept(p, qs, generator, proposal_tokens)

    def spy_tree(tree, node_probs, branch_probs, generator=None):
        assert _support_ok(node_probs, top_k)
        for i, q in enumerate(branch_probs):
            assert _support_ok(q, top_k)
            toks = torch.tensor([tree.tokens[node] for node in tree.branch_nodes[i]])
            assert bool((q.gather(1, toks[:, None]) > 0).all())
        seen["tree"] += 1
        return orig_walk(tree, node_probs, branch_probs, generator)

    monkeypatch.setattr(loop_mod, "speculative_accept", spy_single)
    monkeypatch.setattr(multiround_mod, "multiround_accept", spy_faithful)
    monkeypatch.setattr(multiround_mod, "walk_tree", spy_tree)
    gen = torch.Generator().manual_seed(8)
    for kind in seen:
        run = _run(kind, target, draft)
        for _ in range(10):
            out = run(12, gen, temperature=1.0, top_k=top_k).output_ids
            assert len(out) == 12
    assert all(seen.values()), seen


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_samplers_with_filtered_distributions(setting):
    """The accept functions themselves on filtered p and q from random logits (where q puts
    mass outside p's support and vice versa). Single round: 6000 blocks, first token, TV < 3x
    expected. Multi-round (3 rounds): 100k vectorised draws, TV < 3x expected. Chi-square
    p > 1e-3 both."""
    t, top_p, top_k = SETTINGS[setting]
    g = torch.Generator().manual_seed(21 + len(setting))
    v, b = 12, 3
    p = probs_at(torch.randn(b, v, generator=g) * 1.5, t, top_p, top_k)
    q = probs_at(torch.randn(b - 1, v, generator=g) * 1.5, t, top_p, top_k)
    assert bool(((p[:-1] > 0) & (q == 0)).any()) and bool(((q > 0) & (p[:-1] == 0)).any())
    n = 6000
    first = torch.zeros(v, dtype=torch.long)
    for _ in range(n):
        proposals = torch.multinomial(q, 1, generator=g).squeeze(-1)
        acc, nxt = speculative_accept(proposals, q, p, g)
        first[int(proposals[0]) if int(acc) >= 1 else int(nxt[0])] += 1
    assert chi2_pvalue(first, p[0]) > ALPHA
    assert tv_distance(first, p[0]) < tv_bound(p[0], n)
    qs = [probs_at(torch.randn(v, generator=g) * 2, t, top_p, top_k) for _ in range(3)]
    m = 100_000
    tokens, _ = multiround_accept_batch(p[0], qs, m, g)
    counts = torch.bincount(tokens, minlength=v)
    assert chi2_pvalue(counts, p[0]) > ALPHA
    assert tv_distance(counts, p[0]) < tv_bound(p[0], m)
