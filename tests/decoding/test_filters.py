"""The top-p / top-k filter itself, option validation, and spec_generate's two call orders."""
from __future__ import annotations

import math

import pytest
import torch

from dflash.decoding.loop import SpeculativeDecoder
from dflash.decoding.multiround import MultiRoundDecoder
from dflash.decoding.quickstart import DFlashDraftModel
from dflash.decoding.sampling import check_sampling, choose, probs_at
from dflash.errors import UserError
from dflash.model.toy import make_random_draft, make_random_target


def _logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_no_filter_is_the_plain_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    plain = torch.softmax(logits.float() / 0.7, dim=-1)
    # the same op on the same input: the unfiltered path is literally unchanged
    assert torch.equal(probs_at(logits, 0.7), plain)
    assert torch.equal(probs_at(logits, 0.7, 1.0, 0), plain)
    for k in (50, 51, 10_000):  # top_k >= vocab keeps everything
        assert torch.equal(probs_at(logits, 0.7, 1.0, k), plain)


def test_top_k_keeps_the_k_largest_renormalised():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=g)
    out = probs_at(logits, 1.3, top_k=5)
    plain = torch.softmax(logits / 1.3, dim=-1)
    top = logits.topk(5, dim=-1).indices
    for row in range(4):
        support = set(out[row].nonzero().flatten().tolist())
        assert support == set(top[row].tolist())
        ref = plain[row, top[row]] / plain[row, top[row]].sum()
        assert torch.allclose(out[row, top[row]], ref, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(4), atol=1e-6)


def test_top_p_counts_the_mass_before_each_token():
    logits = _logits_of([0.1, 0.5, 0.15, 0.25])  # order: 1 (0.5), 3 (0.25), 2 (0.15), 0 (0.1)
    # mass before: 0, 0.5, 0.75, 0.9
    cases = {0.4: {1}, 0.5001: {1, 3}, 0.74: {1, 3}, 0.76: {1, 3, 2}, 0.95: {0, 1, 2, 3}}
    for top_p, keep in cases.items():
        out = probs_at(logits, 1.0, top_p=top_p)
        assert set(out.nonzero().flatten().tolist()) == keep, top_p
        base = torch.tensor([0.1, 0.5, 0.15, 0.25])
        mask = torch.zeros(4, dtype=torch.bool)
        mask[list(keep)] = True
        ref = torch.where(mask, base, torch.zeros(4))
        assert torch.allclose(out, ref / ref.sum(), atol=1e-6), top_p


def test_tiny_top_p_keeps_only_the_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=g)
    out = probs_at(logits, 0.5, top_p=1e-9)
    expect = torch.zeros_like(out).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    assert torch.equal(out, expect)


def test_top_k_is_applied_before_top_p():
    logits = _logits_of([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalises to (4/9, 3/9, 2/9): mass before token 2 is 7/9 > 0.75, so it goes;
    # applied to the raw distribution (mass before 0.7 < 0.75) it would stay.
    out = probs_at(logits, 1.0, top_p=0.75, top_k=3)
    assert torch.allclose(out, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=1e-6)


def test_ties_break_by_token_id():
    logits = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    out = probs_at(logits, 1.0, top_k=2)  # three tokens tie for first: the two lowest ids stay
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    flat = torch.zeros(4)  # uniform: mass before is 0, .25, .5, .75
    assert torch.allclose(probs_at(flat, 1.0, top_p=0.5), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(probs_at(flat, 1.0, top_p=1e-6), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # the same rule on every row of a batch, whatever the row's position
    batch = torch.stack([logits, logits.flip(0)])
    out = probs_at(batch, 1.0, top_k=2)
    assert torch.allclose(out[1], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))


def test_choose_greedy_ignores_filters_and_top_k_1_is_greedy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 16, generator=g)
    arg = logits.argmax(-1)
    assert torch.equal(choose(logits, 0.0, g, top_p=0.1, top_k=3), arg)
    assert torch.equal(choose(logits, 1.5, g, top_k=1), arg)
    assert torch.equal(choose(logits, 1.5, g, top_p=1e-9), arg)
    sample = choose(logits, 1.0, g, top_k=3)
    assert all(int(s) in logits[i].topk(3).indices.tolist() for i, s in enumerate(sample))


@pytest.mark.parametrize("args,option", [
    ((-0.5, 1.0, 0), "--temperature"), ((math.nan, 1.0, 0), "--temperature"),
    ((math.inf, 1.0, 0), "--temperature"), (("1", 1.0, 0), "--temperature"),
    ((1.0, 0.0, 0), "--top-p"), ((1.0, -0.1, 0), "--top-p"), ((1.0, 1.5, 0), "--top-p"),
    ((1.0, math.nan, 0), "--top-p"), ((1.0, None, 0), "--top-p"),
    ((1.0, 1.0, -1), "--top-k"), ((1.0, 1.0, 2.5), "--top-k"), ((1.0, 1.0, True), "--top-k"),
    ((1.0, 1.0, "5"), "--top-k"), ((1.0, 1.0, math.inf), "--top-k"),
])
def test_check_sampling_rejects_bad_values(args, option):
    with pytest.raises(UserError) as err:
        check_sampling(*args)
    line = err.value.one_line()
    assert line.startswith(option + " must be") and "\n" not in line


def test_check_sampling_accepts_and_normalises():
    assert check_sampling(0, 1, 0) == (0.0, 1.0, 0)
    assert check_sampling(1.0, 0.9, 50) == (1.0, 0.9, 50)
    assert check_sampling(0.7, 1e-6, 50.0) == (0.7, 1e-6, 50)
    assert isinstance(check_sampling(1, 1, 50.0)[2], int)


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    target = make_random_target(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, seed=5)
    draft = make_random_draft(target, block_size=4, num_layers=1, seed=6, cls=DFlashDraftModel)
    return target, draft


@pytest.mark.parametrize("kw,option", [({"top_p": 0.0}, "--top-p"), ({"top_p": 2}, "--top-p"),
                                       ({"top_k": -3}, "--top-k"), ({"top_k": 1.5}, "--top-k"),
                                       ({"temperature": -1}, "--temperature")])
def test_decoders_refuse_bad_values(pair, kw, option):
    target, draft = pair
    ids = torch.tensor([[1, 2, 3]])
    kw = {"temperature": 1.0, **kw}
    calls = [lambda: SpeculativeDecoder(target, draft).generate(ids, 4, **kw),
             lambda: MultiRoundDecoder(target, draft, [4, 3]).generate(ids, 4, **kw),
             lambda: draft.spec_generate(target, ids, 4, **kw)]
    for call in calls:
        with pytest.raises(UserError, match=f"^{option} must be"):
            call()


def test_default_filters_change_nothing(pair):
    """Same seed, same tokens: explicit defaults and a top_k >= vocab are the unfiltered path."""
    target, draft = pair
    dec = SpeculativeDecoder(target, draft)
    ids = torch.tensor([[1, 2, 3]])
    runs = [dict(), dict(top_p=1.0, top_k=0), dict(top_k=32), dict(top_k=1000)]
    outs = [dec.generate(ids, 24, 1.0, generator=torch.Generator().manual_seed(9), **kw).output_ids
            for kw in runs]
    assert all(o == outs[0] for o in outs[1:])


def test_spec_generate_accepts_both_positional_orders(pair):
    target, draft = pair
    ids = torch.tensor([[1, 2, 3, 4]])
    greedy = SpeculativeDecoder(target, draft).generate(ids, 12, 0.0, block_size=4).output_ids
    expect = ids[0].tolist() + greedy

    def run(*args, **kw):
        return draft.spec_generate(target, ids, 12, *args, **kw)[0].tolist()

    assert run() == expect
    assert run([], 0.0) == expect                        # reference: stop ids, temperature
    assert run(None) == expect
    assert run((), 0.0, 1.0, 0) == expect                # ... top_p, top_k
    assert run(None, 1.0, 1.0, 1) == expect              # top_k=1 sampling is greedy
    assert run([], 1.0, 1e-9) == expect                  # so is a tiny top_p
    assert run(torch.tensor([]), 0.0) == expect          # stop ids as a tensor
    assert run(0.0, []) == expect                        # earlier order: temperature, stop ids
    assert run(0.0, None, 4, "auto", None) == expect     # ..., block_size, engine, generator
    assert run(0, []) == expect
    assert run(stop_token_ids=[], temperature=1.0, top_k=1) == expect
    assert run(temperature=0.0, stop_token_ids=[]) == expect
    assert run([], temperature=1.0, top_p=1e-9) == expect
    # a stop id given in either order ends the output there
    stop = greedy[3]
    cut = expect[:4 + greedy.index(stop) + 1]
    assert run([stop], 0.0) == cut and run(0.0, [stop]) == cut
    with pytest.raises(TypeError, match="multiple values for argument 'temperature'"):
        run([], 0.0, temperature=1.0)
    with pytest.raises(TypeError, match="positional arguments"):
        run([], 0.0, 1.0, 0, 5)


def _cached_reference():
    """The reference's model.py from the wheel tests/model/test_reference.py caches (no
    download here); None when it is not cached."""
    import importlib.util
    import zipfile
    from pathlib import Path

    wheel = Path(__file__).resolve().parents[2] / ".cache" / "reference" / "dflash-0.1.0-py3-none-any.whl"
    if not wheel.exists():
        return None
    try:
        import tempfile
        with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "dflash_reference_filter.py"
            path.write_bytes(zf.read("dflash/model.py"))
            spec = importlib.util.spec_from_file_location("dflash_reference_filter", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        return mod
    except Exception:  # noqa: BLE001 - an unreadable cache is a skip, not a failure
        return None


@pytest.mark.parametrize("t,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 20),
                                           (1.3, 0.8, 50), (0.5, 0.95, 3), (1.0, 1e-9, 0),
                                           (1.0, 0.5, 1000)])
def test_filter_matches_the_reference(t, top_p, top_k):
    """Same filtered distribution as the reference's on random logits (no ties, where
    tie-breaking is the only freedom: it leaves theirs to torch.topk / sort)."""
    ref = _cached_reference()
    if ref is None:
        pytest.skip("reference dflash==0.1.0 wheel not cached in .cache/reference")
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 200, generator=g) * 4
    ours, theirs = probs_at(logits, t, top_p, top_k), ref._sampling_probs(logits, t, top_p, top_k)
    assert torch.equal(ours > 0, theirs > 0)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
