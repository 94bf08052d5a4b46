"""Speculative sampling at temperature > 0 keeps the target's distribution exactly.

Statistical tests with fixed seeds: chi-square goodness of fit at significance 1e-3 and a total
variation bound, on a small vocabulary.
"""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.sampling import speculative_accept
from dflash.model.toy import make_random_draft, make_random_target

ALPHA = 1e-3


def check_distribution(samples, probs, tv_bound):
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    counts = np.bincount(np.asarray(samples), minlength=len(probs)).astype(np.float64)
    n = counts.sum()
    keep = probs * n >= 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert counts[probs == 0].sum() == 0, "sampled a token the target never emits"
    p_value = chisquare(obs, exp).pvalue
    tv = 0.5 * np.abs(counts / n - probs).sum()
    assert p_value > ALPHA, f"chi-square p={p_value:.2e}"
    assert tv < tv_bound, f"total variation {tv:.4f}"


@pytest.mark.parametrize("case", ["random", "disjoint", "identical", "onehot"])
def test_speculative_accept_first_two_tokens(case):
    g = torch.Generator().manual_seed(7)
    vocab, b = 12, 4
    p = torch.softmax(torch.randn(b, vocab, generator=g) * 1.5, dim=-1)
    if case == "random":
        q = torch.softmax(torch.randn(b - 1, vocab, generator=g) * 1.5, dim=-1)
    elif case == "disjoint":  # draft puts mass where the target has none
        p[:, 6:] = 0
        p = p / p.sum(-1, keepdim=True)
        q = torch.zeros(b - 1, vocab)
        q[:, 6:] = 1 / 6
    elif case == "identical":
        q = p[: b - 1].clone()
    else:
        q = torch.zeros(b - 1, vocab)
        q[:, 3] = 1.0
    first, second = [], []
    n = 12000
    for _ in range(n):
        proposals = torch.multinomial(q, 1, generator=g).squeeze(-1)
        acc, nxt = speculative_accept(proposals, q, p, g)
        acc = int(acc)
        first.append(int(proposals[0]) if acc >= 1 else int(nxt[0]))
        if acc >= 1:
            second.append(int(proposals[1]) if acc >= 2 else int(nxt[1]))
    check_distribution(first, p[0].numpy(), tv_bound=0.03)
    if case != "disjoint":  # disjoint supports never accept, so there is no second token
        # The second token exists only after an acceptance: the bound follows its sample count.
        check_distribution(second, p[1].numpy(), tv_bound=1.5 * np.sqrt(vocab / len(second)))


def exact_marginals(target, prompt, steps, temperature):
    """Exact marginal distributions of the first ``steps`` sampled tokens (tiny vocabulary)."""
    vocab = target.config.vocab_size
    seqs = prompt.clone()  # [N, P] all prefixes so far
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    with torch.no_grad():
        for _ in range(steps):
            logits = target(seqs).logits[:, -1].double()
            probs = torch.softmax(logits / temperature, dim=-1)  # [N, V]
            joint = weights[:, None] * probs
            marginals.append(joint.sum(0).numpy())
            weights = joint.reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(vocab, 0),
                              torch.arange(vocab).repeat(seqs.shape[0])[:, None]], dim=1)
    return marginals


@pytest.mark.parametrize("block_size,draft_block_size,seed,n", [
    (4, None, 11, 2500),  # native: the draft proposes the verified block
    (3, 4, 12, 2000),     # truncation: b=3 verified out of a drafted block of 4
])
def test_speculative_decoding_first_tokens_follow_target(block_size, draft_block_size, seed, n):
    target = make_random_target(vocab_size=10, hidden_size=32, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, mask_token_id=9, seed=4)
    decoder = SpeculativeDecoder(target, draft)
    prompt = torch.tensor([[1, 2, 3, 4]])
    temperature = 1.0
    exact = exact_marginals(target, prompt, 3, temperature)
    g = torch.Generator().manual_seed(seed)
    draws, taus = [], []
    for _ in range(n):
        res = decoder.generate(prompt, 3, temperature=temperature, block_size=block_size,
                               generator=g, draft_block_size=draft_block_size)
        draws.append(res.output_ids)
        taus += [c.tau for c in res.cycles]
    assert max(taus) > 1, "the draft never got a proposal accepted: the test would be vacuous"
    for step in range(3):
        check_distribution([d[step] for d in draws], exact[step], tv_bound=0.05)
