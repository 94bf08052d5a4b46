"""Issue 23, acceptance 2: speculative sampling emits the target's (filtered) distribution
exactly on an MoE family (qwen3_moe, static engine) and a hybrid one (qwen3_5, hf engine with
recurrent-state rollback), with the briefly trained drafts of tests/engine/families.py.

Fixed seeds; over DRAWS runs the first emitted token (the target's own prefill sample) and the
second (the first to pass the draft's acceptance test, accepted or resampled from the
residual) are counted. Expected laws in float64 from HF forwards with an independent filter;
token 2's is the mixture sum_x1 p(x1) p(x2 | x1). Bounds: chi-square (cells with expected
count < 5 pooled; a sampled zero-probability cell fails) p > ALPHA = 1e-3, and total variation
under 3x its expected size 0.5 * sum_x sqrt(2 p (1 - p) / (pi n))."""
import math

import pytest
import torch
from scipy.stats import chisquare

from families import family_case
from dflash.decoding.loop import SpeculativeDecoder

ALPHA, DRAWS = 1e-3, 300
SETTINGS = {"plain": (1.0, 0), "top_p_top_k": (0.8, 6)}  # (top_p, top_k) at T=1


def filtered(logits, top_p, top_k):
    """Rows of probabilities: top_k by (logit desc, id), softmax, keep tokens whose mass before
    them is < top_p, renormalise (the reference's filter, written independently)."""
    out = torch.zeros_like(logits, dtype=torch.float64)
    for r, row in enumerate(logits.double()):
        order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))[:top_k or None]
        p = torch.softmax(row[order], 0)
        before = torch.cumsum(p, 0) - p
        keep = before < top_p
        # no token within 1e-6 of the top-p boundary: float32 rounding cannot flip one
        assert bool(((before - top_p).abs() > 1e-6).all()) or top_p >= 1.0
        idx = torch.tensor(order)[keep]
        out[r, idx] = p[keep] / p[keep].sum()
    return out


def chi2_p(counts, probs):
    counts, probs = counts.double(), probs.double()
    if float(counts[probs == 0].sum()) > 0:
        return 0.0
    counts, probs = counts[probs > 0], probs[probs > 0]  # zero cells: none drawn (above)
    exp = probs * counts.sum()
    small = exp < 5
    o, e = counts[~small].tolist(), exp[~small].tolist()
    if bool(small.any()):
        o.append(float(counts[small].sum()))
        e.append(float(exp[small].sum()))
    return 1.0 if len(o) < 2 else float(chisquare(o, [x * sum(o) / sum(e) for x in e]).pvalue)


def tv_bound(probs, n):
    return 3 * 0.5 * float(torch.sqrt(2 * probs * (1 - probs) / (math.pi * n)).sum())


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5"])
def test_family_sampling_exact(family, setting):
    top_p, top_k = SETTINGS[setting]
    target, draft, prompts, _ = family_case(family)
    ids = prompts[4]  # longer than the window of 8
    with torch.no_grad():
        p1 = filtered(target(ids).logits[0, -1:], top_p, top_k)[0]
        firsts = p1.nonzero().squeeze(-1)
        both = torch.cat([ids.expand(len(firsts), -1), firsts[:, None]], 1)
        p2 = (p1[firsts, None] * filtered(target(both).logits[:, -1], top_p, top_k)).sum(0)
    dec = SpeculativeDecoder(target, draft)
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(2, p1.numel())
    for _ in range(DRAWS):
        out = dec.generate(ids, 2, temperature=1.0, top_p=top_p, top_k=top_k, block_size=4,
                           generator=g).output_ids
        counts[0, out[0]] += 1
        counts[1, out[1]] += 1
    for k, probs in enumerate((p1, p2)):
        tv = 0.5 * float((counts[k] / DRAWS - probs).abs().sum())
        assert chi2_p(counts[k], probs) > ALPHA, (family, setting, k)
        assert tv < tv_bound(probs, DRAWS), (family, setting, k, tv)
