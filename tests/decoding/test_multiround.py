"""Multi-round exact speculative sampling: the sampler, the tree walk and both decoders.

Exactness is checked statistically with fixed seeds. Each check is a chi-square goodness-of-fit
test of the empirical distribution against the exact target distribution (cells whose expected
count is below 5 are pooled) and must give a p-value above ALPHA = 1e-3; the total-variation
distance must stay under a bound about 4x its expected sampling size (stated per test). A
deliberately wrong sampler is shown to fail the same test (p < 1e-6), so the tests have power.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from dflash.decoding.loop import SpeculativeDecoder
from dflash.engine.draft import DraftEngine
from dflash.engine.static import StaticTargetEngine, decoder_parts
from dflash.decoding.multiround import (MultiRoundDecoder, build_tree, candidates, walk_tree,
                               walk_tree_sequential)
from dflash.decoding.sampling import multiround_accept, multiround_accept_batch, residual_chain
from dflash.model.toy import make_random_draft, make_random_target

ALPHA = 1e-3


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness-of-fit p-value; cells with expected count < 5 are pooled."""
    counts = counts.double().flatten()
    n = counts.sum()
    expected = probs.double().flatten() * n
    small = expected < 5
    obs = counts[~small].tolist()
    exp = expected[~small].tolist()
    if small.any():
        obs.append(float(counts[small].sum()))
        exp.append(float(expected[small].sum()))
    if len(obs) < 2:
        return 1.0
    # zero-probability cells must stay empty (pooled cells with exp 0 and obs > 0 fail here)
    if any(e == 0 and o > 0 for o, e in zip(obs, exp)):
        return 0.0
    keep = [(o, e) for o, e in zip(obs, exp) if e > 0]
    obs, exp = [o for o, _ in keep], [e for _, e in keep]
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def tv_distance(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts = counts.double().flatten()
    return 0.5 * float((counts / counts.sum() - probs.double().flatten()).abs().sum())


def _norm(x):
    return x / x.sum()


def _cases():
    g = torch.Generator().manual_seed(1234)
    v = 10
    p = _norm(torch.rand(v, generator=g, dtype=torch.float64) ** 2)
    p_sparse = p.clone()
    p_sparse[[1, 4, 7]] = 0
    p_sparse = _norm(p_sparse)
    rnd = [_norm(torch.rand(v, generator=g, dtype=torch.float64) ** 3) for _ in range(3)]
    disjoint = torch.zeros(v, dtype=torch.float64)
    disjoint[[1, 4, 7]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # where p_sparse is 0
    half = torch.zeros(v, dtype=torch.float64)
    half[[0, 1, 2]] = 1 / 3  # partly inside, partly outside p_sparse's support
    def onehot(i):
        out = torch.zeros(v, dtype=torch.float64)
        out[i] = 1.0
        return out
    top = int(p.argmax())
    return {
        "random-1": (p, rnd[:1]),
        "random-2": (p, rnd[:2]),
        "random-3": (p, rnd[:3]),
        "identical-to-p": (p, [p.clone()]),
        "identical-after-random": (p, [rnd[0], p.clone(), rnd[1]]),
        "disjoint-support": (p_sparse, [disjoint, half]),
        "disjoint-only": (p_sparse, [disjoint]),
        "one-hot": (p, [onehot(top), onehot(3), onehot(top)]),
        "one-hot-outside-support": (p_sparse, [onehot(4), rnd[2]]),
        "sparse-target-random": (p_sparse, rnd[:3]),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_multiround_batch_matches_target(name):
    """200k draws per case: chi-square p > 1e-3, TV < 0.01 (expected TV ~ 0.002 for 10 cells)."""
    p, qs = CASES[name]
    n = 200_000
    gen = torch.Generator().manual_seed(7 + len(name))
    tokens, rounds = multiround_accept_batch(p, qs, n, gen)
    counts = torch.bincount(tokens, minlength=p.numel())
    assert chi2_pvalue(counts, p) > ALPHA
    assert tv_distance(counts, p) < 0.01
    # The round-1 acceptance rate is sum_x min(p, q_1) (5-sigma binomial tolerance).
    rate = float((rounds == 1).double().mean())
    expect = float(torch.minimum(p, qs[0]).sum())
    assert abs(rate - expect) <= 5 * math.sqrt(max(expect * (1 - expect), 1e-12) / n) + 1e-9
    assert int(rounds.min()) >= 1 and int(rounds.max()) <= len(qs) + 1


def test_degenerate_cases():
    p, _ = CASES["random-1"]
    gen = torch.Generator().manual_seed(0)
    # q == p: zero residual mass, acceptance certain, later rounds never reached
    residuals, certain = residual_chain(p, [p, p])
    assert certain.tolist() == [True, True]
    _, rounds = multiround_accept_batch(p, [p, CASES["random-2"][1][1]], 10_000, gen)
    assert bool((rounds == 1).all())
    # a proposal entirely outside the target's support never accepts and leaves r == p
    p_sparse, (disjoint,) = CASES["disjoint-only"]
    residuals, certain = residual_chain(p_sparse, [disjoint])
    assert certain.tolist() == [False] and torch.allclose(residuals[1], p_sparse)
    _, rounds = multiround_accept_batch(p_sparse, [disjoint], 10_000, gen)
    assert bool((rounds == 2).all())
    # no proposals: a plain sample, reported as the final residual (round k + 1 = 1)
    tok, rnd = multiround_accept(p, [], gen)
    assert rnd == 1 and 0 <= tok < p.numel()
    # one-hot target and proposal on the same token: certain acceptance
    one = torch.zeros(5)
    one[2] = 1
    assert multiround_accept(one, [one.clone()], gen) == (2, 1)
    # one-hot target, proposal elsewhere: rejected, the residual is the target
    other = torch.zeros(5)
    other[4] = 1
    assert multiround_accept(one, [other], gen) == (2, 2)


def test_single_draw_function_matches_target():
    """The per-call API (used by the decoders): 5k draws, chi-square p > 1e-3, TV < 0.05."""
    p, qs = CASES["random-2"]
    p4 = _norm(p[:4])
    qs4 = [_norm(q[:4] + 0.05) for q in qs]
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(4, dtype=torch.long)
    for _ in range(5_000):
        tok, _ = multiround_accept(p4, qs4, gen)
        counts[tok] += 1
    assert chi2_pvalue(counts, p4) > ALPHA
    assert tv_distance(counts, p4) < 0.05


def test_supplied_proposal_tokens_match_target():
    """Proposals drawn by the caller (as the tree walk does): 200k draws, p > 1e-3, TV < 0.01."""
    p, qs = CASES["random-3"]
    gen = torch.Generator().manual_seed(5)
    n = 200_000
    toks = torch.stack([torch.multinomial(q, n, replacement=True, generator=gen) for q in qs])
    tokens, _ = multiround_accept_batch(p, qs, n, gen, proposal_tokens=toks)
    counts = torch.bincount(tokens, minlength=p.numel())
    assert chi2_pvalue(counts, p) > ALPHA
    assert tv_distance(counts, p) < 0.01


def test_the_check_detects_a_wrong_sampler():
    """Power: resampling from p (not the residual) after a rejection is biased; p < 1e-6."""
    p, qs = CASES["random-2"]
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    t1 = torch.multinomial(qs[0], n, replacement=True, generator=gen)
    ok = torch.rand(n, generator=gen, dtype=p.dtype) * qs[0][t1] < p[t1]
    wrong = torch.where(ok, t1, torch.multinomial(p, n, replacement=True, generator=gen))
    counts = torch.bincount(wrong, minlength=p.numel())
    assert chi2_pvalue(counts, p) < 1e-6


# --------------------------------------------------------------------------- the tree walk
V_SYN = 3


def _synthetic_target(seed=21):
    """p(. | prefix) from a random table indexed by the last two tokens (V = 3)."""
    g = torch.Generator().manual_seed(seed)
    table = -torch.log(torch.rand(V_SYN + 1, V_SYN + 1, V_SYN, generator=g, dtype=torch.float64))
    table = table ** 1.5
    table = table / table.sum(-1, keepdim=True)

    def p(prefix):
        a = prefix[-2] if len(prefix) >= 2 else V_SYN
        b = prefix[-1] if prefix else V_SYN
        return table[a, b]
    return p


def _marginals(p, context, depth):
    """Exact marginal of the next ``depth`` tokens' d-th one, d = 1..depth (V = 3)."""
    out = []
    paths = [(list(context), 1.0)]
    for _ in range(depth):
        m = torch.zeros(V_SYN, dtype=torch.float64)
        nxt = []
        for pre, w in paths:
            dist = p(pre)
            m += w * dist
            nxt += [(pre + [x], w * float(dist[x])) for x in range(V_SYN)]
        out.append(m)
        paths = nxt
    return out


@pytest.mark.parametrize("walk_fn", [walk_tree, walk_tree_sequential])
def test_tree_walk_is_exact_over_three_tokens(walk_fn):
    """Full synthetic generation through walk_tree: the joint law of the first 3 emitted tokens
    (27 cells, 2500 draws) matches the target: chi-square p > 1e-3, TV < 0.15 (expected ~0.07).
    Both the batched walk (used by the decoder) and the sequential reference are checked.
    Proposals resemble the target's multi-step marginals (sharpened for round 1, flattened for
    round 2), so depth > 1 acceptances and switches to branch 2 happen often."""
    p = _synthetic_target()
    gen = torch.Generator().manual_seed(99)
    sizes = [4, 3]  # branch lengths 3 and 2
    counts = torch.zeros(V_SYN ** 3, dtype=torch.long)
    switched = deep = 0
    cache = {}
    for _ in range(2500):
        ctx = [0]
        emitted = []
        while len(emitted) < 3:
            key = tuple(ctx[-2:])
            if key not in cache:
                ms = _marginals(p, ctx, max(sizes) - 1)
                cache[key] = [torch.stack([_norm(m ** 1.6) for m in ms[:sizes[0] - 1]]),
                              torch.stack([_norm(m ** 0.6 + 0.02) for m in ms[:sizes[1] - 1]])]
            qs = cache[key]
            branches = [torch.multinomial(q, 1, generator=gen).squeeze(-1).tolist() for q in qs]
            tree = build_tree(ctx[-1], branches)
            node_probs = []
            for n in range(len(tree)):
                pre, m = [], n
                while m > 0:
                    pre.append(tree.tokens[m])
                    m = tree.parents[m]
                node_probs.append(p(ctx + pre[::-1]))
            walk = walk_fn(tree, torch.stack(node_probs), qs, gen)
            assert len(walk.path) == len(walk.tokens) - 1
            for node, tok in zip(walk.path, walk.tokens):
                assert tree.tokens[node] == tok
            if walk.accepts[1] and walk.path[0] != tree.branch_nodes[0][0]:
                switched += 1
            deep += len(walk.path) >= 2
            ctx += walk.tokens
            emitted += walk.tokens
        a, b, c = emitted[:3]
        counts[a * 9 + b * 3 + c] += 1
    exact = torch.zeros(V_SYN ** 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                exact[a * 9 + b * 3 + c] = p([0])[a] * p([0, a])[b] * p([0, a, b])[c]
    assert switched > 25 and deep > 250  # the interesting paths were exercised
    assert chi2_pvalue(counts, exact) > ALPHA
    assert tv_distance(counts, exact) < 0.15


def test_build_tree_merges_prefixes_and_masks_ancestors():
    tree = build_tree(9, [[1, 2, 3], [1, 2, 4], [5]])
    assert tree.tokens == [9, 1, 2, 3, 4, 5]
    assert tree.parents == [-1, 0, 1, 2, 2, 0]
    assert tree.depths == [0, 1, 2, 3, 3, 1]
    assert tree.branch_nodes == [[1, 2, 3], [1, 2, 4], [5]]
    mask = tree.attention_mask()
    assert mask[4].tolist() == [True, True, True, False, True, False]
    assert mask[5].tolist() == [True, False, False, False, False, True]
    # alive rounds per node: the branches through it that go deeper
    assert candidates(tree) == [[0, 1, 2], [0, 1], [0, 1], [], [], []]


# --------------------------------------------------------------------------- the decoders
VOCAB = 6
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    target = make_random_target(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=4)
    return target, draft


def _exact_first_tokens(target):
    """p(t1), p(t2 | t1) and the marginal of t3, from the plain HF forward (no cache)."""
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        p1 = torch.softmax(target(ids).logits[0, -1].double(), -1)
        two = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2 = torch.softmax(target(two).logits[:, -1].double(), -1)  # [t1, t2]
        three = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = torch.softmax(target(three).logits[:, -1].double(), -1).view(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2
    marg3 = (joint12[:, :, None] * p3).sum((0, 1))
    return joint12, marg3


@pytest.mark.parametrize("kind", ["faithful", "tree", "single-round"])
def test_decoders_first_tokens_match_target(pair, kind):
    """1200 generations at T=1 per decoder. The joint law of the first 2 emitted tokens (36
    cells; TV < 0.2, expected ~0.07) matches the target's, chi-square p > 1e-3. For the tree and
    single-round decoders (which emit several tokens per cycle) the marginal of token 3 (6 cells;
    TV < 0.09, expected ~0.03) is checked too, p > 1e-3. The faithful decoder emits one token
    per step by the same mechanism, so 2 tokens cover it."""
    target, draft = pair
    n = 1200
    length = 2 if kind == "faithful" else 3
    if kind == "single-round":
        dec = SpeculativeDecoder(target, draft)
        run = lambda g: dec.generate(torch.tensor([PROMPT]), length, 1.0, block_size=4, generator=g)
    else:
        dec = MultiRoundDecoder(target, draft, [4, 3], mode=kind)
        run = lambda g: dec.generate(torch.tensor([PROMPT]), length, 1.0, generator=g)
    gen = torch.Generator().manual_seed({"faithful": 1, "tree": 2, "single-round": 3}[kind])
    c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    c3 = torch.zeros(VOCAB, dtype=torch.long)
    hist = None
    for _ in range(n):
        res = run(gen)
        out = res.output_ids
        assert len(out) == length
        c12[out[0] * VOCAB + out[1]] += 1
        if length == 3:
            c3[out[2]] += 1
        if kind != "single-round":
            h = torch.tensor(res.round_histogram)
            hist = h if hist is None else hist + h
    joint12, marg3 = _exact_first_tokens(target)
    assert chi2_pvalue(c12, joint12) > ALPHA
    assert tv_distance(c12, joint12) < 0.2
    if length == 3:
        assert chi2_pvalue(c3, marg3) > ALPHA
        assert tv_distance(c3, marg3) < 0.09
    if hist is not None:  # round 1, round 2 and the residual were all exercised
        assert hist[0] > 0 and hist[1] > 0 and hist[2] > 0


ENGINE_KW = {"static": {"engine": "static"},
             # the CUDA fast engine's fixed-shape (graph-mode) semantics, run eagerly on CPU
             "fast-graph-semantics": {"engine": "fast", "compile": False, "_cpu_graph_mode": True}}


@pytest.mark.parametrize("engine", list(ENGINE_KW))
def test_greedy_multiround_equals_target_greedy(pair, engine):
    target, draft = pair
    ids = torch.tensor([PROMPT])
    base = SpeculativeDecoder(target, draft).generate(ids, 40, 0.0, block_size=1).output_ids
    for mode in ("faithful", "tree"):
        dec = MultiRoundDecoder(target, draft, [4, 3], mode=mode, **ENGINE_KW[engine])
        assert dec.generate(ids, 40, 0.0).output_ids == base, mode


@pytest.mark.parametrize("engine", list(ENGINE_KW))
def test_tree_commits_the_accepted_path(pair, engine):
    """Every tree pass's logits on the committed path equal a fresh full forward (so the KV
    copied by move_slots is right), branch switches do happen, and the draft's context cache
    holds exactly the features of the emitted sequence."""
    target, draft = pair
    dec = MultiRoundDecoder(target, draft, [4, 3], mode="tree", **ENGINE_KW[engine])
    passes, moves = [], []
    dec.engines.ensure(128)
    eng = dec.engines.target_engine
    orig_forward, orig_move = eng.forward, eng.move_slots

    def forward(ids, positions, kv_len=None, cache_slots=None, tree_mask=None):
        out = orig_forward(ids, positions, kv_len, cache_slots, tree_mask)
        if cache_slots is not None:
            passes.append((ids[0].clone(), positions.clone(), out[0][0].clone()))
        return out

    def move(src, dst):
        moves.append((src.clone(), dst.clone()))
        orig_move(src, dst)

    eng.forward, eng.move_slots = forward, move
    gen = torch.Generator().manual_seed(17)
    res = dec.generate(torch.tensor([PROMPT]), 60, 1.0, generator=gen)
    full = torch.tensor([PROMPT + res.output_ids])
    with torch.no_grad():
        ref = target(full).logits[0]
    checked = 0
    for ids, pos, logits in passes:
        # the root (last emitted token) attends to every committed slot, moved ones included
        p = int(pos[0])
        assert int(ids[0]) == int(full[0, p])
        assert torch.allclose(logits[0], ref[p], atol=1e-4), p
        checked += 1
    assert checked == len(passes) and moves, "expected some branch-2 paths to be moved"
    # the draft context: positions before the last emitted token hold the full sequence's features
    n = full.shape[1] - 1
    fresh_t = StaticTargetEngine(target, draft.target_layer_ids, n + 8)
    _, feats = fresh_t.forward(full[:, :n], torch.arange(n), kv_len=n)
    embed, _, _, lm_head, _ = decoder_parts(target)
    fresh_d = DraftEngine(draft, embed, lm_head, n + 8)
    fresh_d.append_context(feats, torch.arange(n))
    assert torch.allclose(dec.engines.draft_engine.k_cache[0][:, :, :n], fresh_d.k_cache[0][:, :, :n], atol=1e-4)


# --------------------------------------------------------------------------- the CLI
def _read_jsonl(path):
    import json
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_cli_spec_command_small(toy_pair, tmp_path):
    """The spec's command at small sizes, as a real subprocess, on a random tiny pair."""
    import json

    from conftest import run_script

    target, draft = toy_pair
    out = tmp_path / "multiround.jsonl"
    proc = run_script(["benchmark_multiround_spec.py", "--dataset", "builtin-math",
                       "--max-samples", "2", "--model-name-or-path", str(target),
                       "--draft-name-or-path", str(draft), "--max-new-tokens", "12",
                       "--temperature", "1.0", "--round-block-sizes", "8,6", "--mode", "both",
                       "--warmup-runs", "0", "--save-outputs-path", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "per-round acceptance" in proc.stdout and "tokens / target pass" in proc.stdout
    recs = _read_jsonl(out)
    assert recs[0]["type"] == "header" and recs[0]["config"]["round_block_sizes"] == [8, 6]
    samples = recs[1:]
    assert [r["id"] for r in samples] == ["builtin-math/0", "builtin-math/1"]
    for r in samples:
        for m in ("target_only", "single_round", "tree", "faithful"):
            assert r[m]["tokens"] >= 1 and r[m]["target_passes"] >= 1
        assert r["target_only"]["tokens_per_target_pass"] == 1.0
        assert r["faithful"]["tokens_per_target_pass"] == 1.0
        assert len(r["tree"]["round_attempts"]) == 2
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["complete"] and set(summary["speedup"]) == {"single_round", "tree", "faithful"}
    tree = summary["methods"]["tree"]
    assert set(tree["round_histogram"]) == {"round1", "round2", "residual", "bonus"}
    assert len(tree["round_acceptance_rate"]) == 2


def test_cli_resume_and_errors(toy_pair, tmp_path):
    """In-process: --resume redoes only unfinished samples; bad flags are one-line user errors."""
    from dflash.errors import UserError
    from dflash.bench.multiround_cli import main

    target, draft = toy_pair
    out = tmp_path / "r.jsonl"
    base = ["--dataset", "builtin-chat", "--max-samples", "2", "--model-name-or-path", str(target),
            "--draft-name-or-path", str(draft), "--max-new-tokens", "6", "--warmup-runs", "0",
            "--round-block-sizes", "4,3"]
    assert main(base + ["--save-outputs-path", str(out)]) == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")  # as if killed before sample 2 finished
    assert main(base + ["--save-outputs-path", str(out), "--resume"]) == 0
    recs = _read_jsonl(out)
    assert [r["type"] for r in recs] == ["header", "sample", "sample"]
    assert [r["id"] for r in recs[1:]] == ["builtin-chat/0", "builtin-chat/1"]
    assert "tree" in recs[1] and "faithful" not in recs[1]  # default mode: tree
    with pytest.raises(UserError):  # a different configuration is not mixed into the file
        main(base + ["--save-outputs-path", str(out), "--resume", "--temperature", "0.5"])
    for bad in (["--round-block-sizes", "16,x"], ["--round-block-sizes", "1,4"],
                ["--engine", "hf", "--mode", "tree"], ["--temperature", "-1"],
                ["--single-block-size", "1"]):
        with pytest.raises(UserError):
            main(base + bad)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "models" / "tiny-target"
                         / "config.json").exists(), reason="embedded pair not built yet")
def test_cli_spec_command_embedded_pair(tmp_path):
    """The spec's command (its flags, rounds 16,12, T=1) on the embedded pair at small sizes."""
    from conftest import run_script

    out = tmp_path / "embedded.jsonl"
    proc = run_script(["benchmark_multiround_spec.py", "--dataset", "builtin-math",
                       "--max-samples", "1", "--model-name-or-path", "embedded",
                       "--draft-name-or-path", "embedded", "--max-new-tokens", "24",
                       "--temperature", "1.0", "--round-block-sizes", "16,12",
                       "--warmup-runs", "0", "--save-outputs-path", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _read_jsonl(out)
    assert len(recs) == 2 and recs[1]["tree"]["tokens"] >= 1
