"""The sampling cycle's Triton kernels (dflash/engine/cuda/sampling.py) against the law of
``dflash.decoding.sampling.probs_at`` and exact speculative sampling.

1. The law: the sparse (top-k) law keeps probs_at's set exactly (ties broken by id, 16-bit
   logits compared as they are) with the same probabilities (1e-5), and the dense path's
   log-normaliser matches logsumexp (1e-5), on rows spanning several chunks.
2. Exactness of the whole accept step (proposals, acceptance, residual / bonus): many
   independent draws (one launch each, a draw axis over the rng rows) of the accepted count
   and the token after it jointly, and of the first emitted token, against their exact laws
   (chi-square p > 1e-3, TV under 3x its expected size; helpers of test_filtered_sampling),
   on rows where acceptance and rejection both happen.
3. Determinism: the same [seed, counter] gives the same tokens, the one-draw launch equals
   the draw axis's row, and the advanced counter gives other tokens.
4. CUDA only: SamplingCycle with the kernels, captured in graphs, replays fresh draws with
   the filtered target's law (a tiny random pair) and is deterministic per seed.

The kernel tests run on CUDA, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1
pytest ...`` with triton importable; small vocabularies and chunks, fewer draws: ~2-3 min
on 2 cores; SAMPLING_KERNELS_ALL=1 adds the b = 16 and top-k-only exactness cases, ~5 min
more); elsewhere (the CPU wheels of torch in CI) they skip.
"""
import math
import os

import pytest
import torch

from dflash.decoding.sampling import probs_at
from dflash.engine.cuda import sampling as ks
from tests.decoding.test_filtered_sampling import ALPHA, chi2_pvalue, tv_bound, tv_distance

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = HAVE_TRITON and (CUDA or INTERPRET)
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs Triton with CUDA, or "
                                   "TRITON_INTERPRET=1 (CPU torch wheels lack Triton)")
needs_cuda = pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
DEVICE = "cuda" if CUDA else "cpu"
HALF = torch.bfloat16 if CUDA else torch.float16  # the interpreter lacks bf16
DRAWS = 20000 if CUDA else 200


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter():
    """Under the interpreter, patch triton.language once per launch instead of once per
    device-function call (it re-patches at every nested call: most of its time here)."""
    if not (KERNELS and INTERPRET and not CUDA):
        yield
        return
    try:
        import triton.runtime.interpreter as interp
        patch, call = interp._patch_lang, interp.GridExecutor.__call__
    except (ImportError, AttributeError):  # another Triton: run slowly
        yield
        return
    done = {}

    def cached(fn):
        key = tuple(sorted(id(v) for v in fn.__globals__.values()
                           if v is interp.tl or v is interp.tl.core))
        if key not in done:
            done[key] = patch(fn)
        return done[key]

    def launch(self, *args, **kwargs):
        done.clear()
        try:
            return call(self, *args, **kwargs)
        finally:
            for scope in reversed(list(done.values())):
                scope.restore()
            done.clear()

    interp._patch_lang, interp.GridExecutor.__call__ = cached, launch
    try:
        yield
    finally:
        interp._patch_lang, interp.GridExecutor.__call__ = patch, call


def test_modes():
    """Which settings the kernels take (the rest keeps the torch path)."""
    v = 1000
    assert ks.mode(v, 1.0, 0) == "dense" and ks.mode(v, 1.0, v) == "dense"
    assert ks.mode(v, 0.9, 50) == "sparse" and ks.mode(v, 1.0, 1) == "sparse"
    assert ks.mode(v, 0.9, ks.K_MAX) == "sparse"
    assert ks.mode(v, 0.9, 0) is None and ks.mode(v, 1.0, ks.K_MAX + 1) is None
    assert ks.mode(v, 0.9, v) is None  # top-p alone


def _tied_rows(gen, rows, vocab, scale=1.5):
    """Logits on a coarse grid (many exact ties), one row flat over its top half, one with
    -0.0 and +0.0 entries."""
    x = (torch.randn(rows, vocab, generator=gen) * scale * 4).round() / 4
    x[1, : vocab // 2] = x[1].max()
    x[2, ::3] = -0.0
    x[2, 1::3] = 0.0
    return x


def _ambiguous_rows(logits, temperature, top_p, top_k):
    """Rows where a token's mass before it is within 1e-4 of top_p (float64 reference):
    float32 rounding may flip such a token; their set is not compared."""
    x = logits.double() / temperature
    s = x.sort(dim=-1, descending=True, stable=True).values[:, :top_k]
    p = torch.softmax(s, -1)
    before = p.cumsum(-1) - p
    return ((before - top_p).abs() < 1e-4).any(-1)


def _dense(ids, probs, vocab):
    ids = torch.where(probs > 0, ids, 0)
    return torch.zeros(probs.shape[0], vocab, dtype=torch.float32).scatter_add_(-1, ids, probs)


LAW_CASES = [(k, p) for k in (1, 5) for p in (1.0, 0.9, 0.5)] + [(50, 1.0), (50, 0.9), (50, 0.5)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_sparse_law_is_probs_at(dtype, temperature):
    """Kept set == probs_at's (ties by id, -0.0 == 0.0), probabilities within 1e-5; rows of
    300 tokens in chunks of 64 (top-k 1, 5) or 128 (top-k 50) columns."""
    gen = torch.Generator().manual_seed(int(temperature * 10) + (dtype == torch.float32))
    vocab = 300
    logits = _tied_rows(gen, 4, vocab).to(dtype)
    checked = 0
    for top_k, top_p in LAW_CASES:
        if top_k == 50 and (dtype, temperature) not in ((torch.float32, 0.7), (HALF, 1.3),
                                                         (torch.float32, 1.0)):
            continue  # the interpreter's top-50 is slow: three of the six cases
        config = (64, 2) if top_k == 50 else (8, 8)
        ids, probs, _ = ks.sparse_law(logits.to(DEVICE), temperature, top_p, top_k,
                                      config=config)
        got = _dense(ids.cpu(), probs.cpu(), vocab)
        ref = probs_at(logits, temperature, top_p, top_k)
        rows = ~_ambiguous_rows(logits, temperature, top_p, top_k) if top_p < 1 else (
            torch.ones(len(logits), dtype=torch.bool))
        case = (dtype, temperature, top_k, top_p)
        assert torch.equal(got[rows] > 0, ref[rows] > 0), case
        torch.testing.assert_close(got[rows], ref[rows], rtol=0, atol=1e-5, msg=str(case))
        assert bool((probs.cpu()[:, top_k:] == 0).all()), case
        checked += int(rows.sum())
    assert checked >= 10  # most rows are unambiguous


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_dense_lse(dtype):
    """The dense path's log-normaliser of logits / T: rows of 1000 tokens in 16 chunks."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 1000, generator=gen) * 3).to(dtype)
    logits[3, 10:] = -math.inf  # a row with few live tokens
    for t in (0.7, 1.0, 1.3):
        got = ks.dense_lse(logits.to(DEVICE), t, chunk=64).cpu()
        ref = torch.logsumexp(logits.float() / t, dim=-1)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# --- exactness of the accept step ----------------------------------------------------------

SETTINGS = {"plain": (1.0, 1.0, 0), "both": (0.8, 0.8, 4), "top_k": (1.3, 1.0, 3)}


def _rows_pair(b, vocab, seed):
    """Target logits [b, V] and draft logits [b-1, V]: the draft near the target in some rows
    (acceptance likely) and far in others, masses outside each other's support."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(b, vocab, generator=g) * 1.5
    q = p[:-1] + torch.randn(b - 1, vocab, generator=g) * torch.linspace(0.3, 2.5, b - 1)[:, None]
    return p, q


def _exact_accept_law(P, Q):
    """Exact law of (accepted count a, the token after it) [(n+1) * V] and of the first
    emitted token [V], for proposals x_i ~ Q[i] independently (P, Q float64)."""
    n, vocab = Q.shape[0], P.shape[1]
    joint = torch.zeros(n + 1, vocab, dtype=torch.float64)
    reach = 1.0
    for m in range(n + 1):
        if m == n:
            joint[m] = reach * P[m]
            break
        beta = float(torch.minimum(P[m], Q[m]).sum())
        r = (P[m] - Q[m]).clamp_min(0)
        law = r / r.sum() if float(r.sum()) > 0 else P[m]
        joint[m] = reach * (1 - beta) * law
        reach *= beta
    return joint.flatten(), P[0]


def _laws(p_logits, q_logits, setting):
    t, top_p, top_k = SETTINGS[setting]
    return (probs_at(p_logits, t, top_p, top_k).double(),
            probs_at(q_logits, t, top_p, top_k).double())


def _draw(p_logits, q_logits, setting, rng):
    """One launch set of the kernels for all of ``rng``'s rows: (accepted [D], next [D, b])."""
    t, top_p, top_k = SETTINGS[setting]
    pl, ql = p_logits.to(DEVICE), q_logits.to(DEVICE)
    b = pl.shape[0]
    if ks.mode(pl.shape[1], top_p, top_k) == "dense":
        chunk = 16
        if b > 1:
            props, lse = ks.dense_propose(ql, t, rng, chunk=chunk)
        else:
            props, lse, ql = None, None, None
        acc, nxt = ks.dense_accept(pl, props, ql, lse, t, rng, chunk=chunk)
    else:
        cfg = (8, 2)
        qi = qp = props = None
        if b > 1:
            qi, qp, props = ks.sparse_law(ql, t, top_p, top_k, rng, config=cfg)
        pi, pp, _ = ks.sparse_law(pl, t, top_p, top_k, config=cfg)
        acc, nxt = ks.sparse_accept(props, qi, qp, pi, pp, rng)
    return acc.reshape(-1).cpu(), nxt.reshape(rng.shape[:-1] + (b,)).cpu(), (
        None if props is None else props.reshape(rng.shape[:-1] + (b - 1,)).cpu())


def _rng(draws, seed, counter=0):
    rng = torch.empty(draws, 2, dtype=torch.int64)
    rng[:, 0] = torch.randint(0, 2 ** 62, (draws,), generator=torch.Generator().manual_seed(seed))
    rng[:, 1] = counter
    return rng.to(DEVICE)


EXACT_CASES = [(b, s) for b in (1, 4, 16) for s in SETTINGS]


@needs_kernels
@pytest.mark.parametrize("b,setting", EXACT_CASES)
def test_accept_step_is_exact(b, setting):
    """DRAWS independent draws: (a, token after a) jointly and the first emitted token
    against their exact laws; on 13 tokens (21 on b = 16, chunks of 16), acceptance and
    rejection both seen. b = 16 and the top-k setting run on CUDA only (interpreter time)."""
    if not CUDA and (b == 16 or setting == "top_k") and not os.environ.get("SAMPLING_KERNELS_ALL"):
        pytest.skip("interpreter: b = 1 and 4, two settings")
    vocab = 21 if b == 16 else 13
    p_logits, q_logits = _rows_pair(b, vocab, 40 + b)
    P, Q = _laws(p_logits, q_logits, setting)
    rng = _rng(DRAWS, 1000 + b + len(setting))
    acc, nxt, props = _draw(p_logits, q_logits, setting, rng)
    assert bool((rng[:, 1].cpu() == 1).all())  # each draw advanced its counter
    tok = nxt.gather(1, acc[:, None])[:, 0]
    assert bool((nxt == tok[:, None]).all())
    n = b - 1
    if n:
        # the proposals are drawn from the filtered draft (never outside its support)
        assert bool((Q.gather(1, props.T) > 0).all())
        assert 0 < int((acc > 0).sum()) and int((acc < n).sum()) > 0, "vacuous"
    joint, first_law = _exact_accept_law(P, Q)
    cells = torch.bincount(acc * vocab + tok, minlength=(n + 1) * vocab)
    assert chi2_pvalue(cells, joint) > ALPHA
    assert tv_distance(cells, joint) < tv_bound(joint, DRAWS)
    first = torch.where(acc > 0, props[:, 0], tok) if n else tok
    counts = torch.bincount(first, minlength=vocab)
    assert chi2_pvalue(counts, first_law) > ALPHA
    assert tv_distance(counts, first_law) < tv_bound(first_law, DRAWS)
    if n:  # the accepted count's own law
        a_law = joint.view(n + 1, vocab).sum(1)
        a_counts = torch.bincount(acc, minlength=n + 1)
        assert chi2_pvalue(a_counts, a_law) > ALPHA


@needs_kernels
@pytest.mark.parametrize("setting", ["plain", "both"])
def test_same_counter_same_tokens(setting):
    """rng [seed, counter]: the same state, the same tokens; the one-draw launch is the draw
    axis's row with that state; the advanced counter draws other tokens."""
    b, vocab = 4, 96
    p_logits, q_logits = _rows_pair(b, vocab, 3)
    p_logits, q_logits = p_logits * 0.3, q_logits * 0.3  # flat: draws rarely coincide
    state = torch.tensor([123456789, 5], dtype=torch.int64)
    outs = []
    for _ in range(2):
        rng = state.clone().to(DEVICE)
        outs.append(_draw(p_logits, q_logits, setting, rng))
        assert rng.cpu().tolist() == [123456789, 6]
    assert all(torch.equal(x, y) for x, y in zip(outs[0], outs[1]))
    many = torch.stack([state, state + torch.tensor([1, 0]), state + torch.tensor([0, 1])])
    rows = _draw(p_logits, q_logits, setting, many.to(DEVICE))
    acc, nxt, props = rows
    assert int(acc[0]) == int(outs[0][0][0]) and torch.equal(nxt[0], outs[0][1])
    assert torch.equal(props[0], outs[0][2])
    drawn = torch.cat([props, nxt], dim=1)
    assert not torch.equal(drawn[2], drawn[0])  # counter + 1
    assert not torch.equal(drawn[1], drawn[0])  # another seed


# --- the cycle ------------------------------------------------------------------------------

@pytest.mark.skipif(not (HAVE_TRITON and INTERPRET), reason="the interpreter's CPU cycle")
def test_cpu_cycle_runs_the_kernels(monkeypatch):
    """CPU graph mode under the interpreter with DFLASH_SAMPLING_KERNELS=1: the fused cycle
    runs the kernels' law (dense, sparse; top-p alone keeps the torch path), the same seed
    gives the same tokens and another seed others."""
    from dflash.decoding.loop import SpeculativeDecoder
    from dflash.model.toy import make_random_draft, make_random_target

    monkeypatch.setenv("DFLASH_SAMPLING_KERNELS", "1")
    monkeypatch.setenv("DFLASH_TOPK_CONFIG", "8,2")
    target = make_random_target(vocab_size=8, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=4)
    dec = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    for st, b, law in [((1.0, 1.0, 0), 1, "dense"), ((0.9, 1.0, 0), 4, "dense"),
                       ((0.8, 0.8, 5), 4, "sparse"), ((1.0, 0.7, 0), 4, None)]:
        def run(seed):
            return dec.generate(torch.tensor([[1, 2, 3]]), 8, temperature=st[0], top_p=st[1],
                                top_k=st[2], block_size=b,
                                generator=torch.Generator().manual_seed(seed)).output_ids
        first = run(5)
        assert dec._cycles[(b > 1, st)].kernels_used == law
        assert run(5) == first and run(6) != first, (st, b)


# --- the cycle on CUDA ----------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("setting", ["plain", "both"])
def test_cycle_graphs_replay_fresh_draws(setting, monkeypatch):
    """The tiny random pair on CUDA (fast engine, graphs): the cycle runs the kernels, the
    same seed gives the same tokens (first, capturing, generation included), and the first
    three tokens follow the filtered target (chi-square, TV) over 1500 generations."""
    from dflash.decoding.fused_cycle import SamplingCycle
    from dflash.decoding.loop import SpeculativeDecoder
    from dflash.model.toy import make_random_draft, make_random_target
    from tests.decoding.test_filtered_sampling import PROMPT, VOCAB, exact_laws

    monkeypatch.delenv("DFLASH_SAMPLING_KERNELS", raising=False)
    cases = {"plain": (1.0, 1.0, 0), "both": (0.8, 0.8, 5)}
    st = cases[setting]
    target = make_random_target(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=3)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=4)
    exact = exact_laws(target, {setting: st})[setting]
    device = torch.device("cuda")
    dec = SpeculativeDecoder(target.to(device), draft.to(device), engine="fast")
    prompt = torch.tensor([PROMPT], device=device)
    kw = dict(temperature=st[0], top_p=st[1], top_k=st[2])
    for b in (1, 4):
        runs = [dec.generate(prompt, 24, block_size=b,
                             generator=torch.Generator(device).manual_seed(77), **kw).output_ids
                for _ in range(2)]
        assert runs[0] == runs[1]
        cycle = dec._cycles.get((b > 1, st))
        assert isinstance(cycle, SamplingCycle) and cycle.kernels_used == ks.mode(VOCAB, *st[1:])
        assert cycle._graphs, "the cycle was not captured"
        gen = torch.Generator(device).manual_seed(500 + b)
        n = 1500
        c12 = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
        c3 = torch.zeros(VOCAB, dtype=torch.long)
        for _ in range(n):
            o = dec.generate(prompt, 3, block_size=b, generator=gen, **kw).output_ids
            c12[o[0] * VOCAB + o[1]] += 1
            c3[o[2]] += 1
        j12, m3 = exact
        assert chi2_pvalue(c12, j12) > ALPHA and tv_distance(c12, j12) < tv_bound(j12, n)
        assert chi2_pvalue(c3, m3) > ALPHA and tv_distance(c3, m3) < tv_bound(m3, n)
