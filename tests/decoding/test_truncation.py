"""Truncation mode (``draft_block_size``): the draft always drafts its trained block size and a
cycle of block size b verifies only the first b tokens. It must stay lossless (greedy equality,
exact sampling), and a truncated block must be exactly a prefix of the full one."""
import pytest
import torch

from conftest import EMBEDDED
from dflash.decoding.loop import SpeculativeDecoder
from dflash.model.toy import make_random_draft, make_random_target

from tests.decoding.test_lossless import MAX_NEW, prompts, reference

SIZES = (4, 8, 12)


class Cycling:
    """A policy that walks through fixed sizes (exercises size changes mid-generation)."""
    max_block_size = 16

    def __init__(self, sizes):
        self.sizes = sizes

    def select(self, i):
        return self.sizes[i % len(self.sizes)]

    def update(self, *a):
        pass


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def pair(request):
    target = make_random_target(arch=request.param, vocab_size=96, hidden_size=64, num_layers=3)
    return target, make_random_draft(target, block_size=16, num_layers=2)


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_truncated_greedy_equals_target_generate(pair, engine):
    target, draft = pair
    decoder = SpeculativeDecoder(target, draft, engine=engine)
    for ids in prompts(target.config.vocab_size, n=10 if engine == "static" else 3):
        ref = reference(target, ids, MAX_NEW)
        for b in SIZES:
            res = decoder.generate(ids, MAX_NEW, block_size=b, draft_block_size=16)
            assert res.output_ids == ref, (b, ids)
            assert {c.block_size for c in res.cycles} == {b}
        res = decoder.generate(ids, MAX_NEW, policy=Cycling([4, 16, 8, 12, 2]),
                               draft_block_size=16)
        assert res.output_ids == ref


def test_truncated_greedy_with_stop_tokens(pair):
    target, draft = pair
    decoder = SpeculativeDecoder(target, draft)
    for i, ids in enumerate(prompts(target.config.vocab_size, n=6, seed=1)):
        stop = reference(target, ids, MAX_NEW)[3 + i]
        ref = reference(target, ids, MAX_NEW, stop=stop)
        for b in SIZES:
            res = decoder.generate(ids, MAX_NEW, block_size=b, stop_token_ids=[stop],
                                   draft_block_size=16)
            assert res.output_ids == ref and res.stopped, (b, i)


def test_truncated_graph_mode_path_is_lossless():
    """The fast engine's fixed-shape path (run eagerly on CPU, float64)."""
    target = make_random_target(vocab_size=96, hidden_size=64, num_layers=3, dtype=torch.float64)
    draft = make_random_draft(target, block_size=16, dtype=torch.float64)
    fast = SpeculativeDecoder(target, draft, engine="fast", compile=False, _cpu_graph_mode=True)
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        ids = torch.randint(1, 95, (1, 4 + 3 * i), generator=g)
        ref = reference(target, ids, 33)
        for b in SIZES:
            assert fast.generate(ids, 33, block_size=b, draft_block_size=16).output_ids == ref


def _spy_on_draft(decoder, capacity):
    """Record (first position, greedy proposals of the whole drafted block) per draft call."""
    decoder.reserve(capacity)
    eng = decoder.engines.draft_engine
    calls, orig = [], eng.propose_logits

    def spy(block_ids, positions, kv_len=None):
        out = orig(block_ids, positions, kv_len=kv_len)
        calls.append((int(positions[0]), out[0].argmax(-1).tolist()))
        return out

    eng.propose_logits = spy
    return calls


def test_truncated_block_is_a_prefix_of_the_full_block():
    """Greedy: a truncated cycle drafts exactly what a b=16 cycle would from the same state, and
    accepts min(run + 1, b) where run is the full block's matching prefix. Uses the embedded
    b16-trained pair (random drafts accept nothing, which would make this vacuous)."""
    if not EMBEDDED:
        pytest.skip("needs the embedded pair (models/tiny-target, models/tiny-draft)")
    from dflash.bench.common import load_pair

    pair = load_pair("embedded", "embedded", torch.device("cpu"), "float32")
    code = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
    ids = torch.tensor([pair.tokenizer.encode(code)])
    n_new = 64
    runs = {}
    for mode, kw in (("full", dict(block_size=16)),
                     ("trunc", dict(policy=Cycling([4, 8, 12, 3]), draft_block_size=16))):
        decoder = SpeculativeDecoder(pair.target, pair.draft)
        calls = _spy_on_draft(decoder, 512)
        res = decoder.generate(ids, n_new, **kw)
        runs[mode] = (res, calls)
    out = runs["full"][0].output_ids
    assert runs["trunc"][0].output_ids == out
    seq = ids[0].tolist() + out  # token at absolute position p: seq[p]
    full_by_start = dict(runs["full"][1])
    res, calls = runs["trunc"]
    assert len(calls) == len(res.cycles) and all(len(c[1]) == 15 for c in calls)
    shared = 0
    for (start, props), cycle in zip(calls, res.cycles):
        if start in full_by_start:  # same state as a full cycle: same proposals
            assert props == full_by_start[start]
            shared += 1
        run = 0
        while run < 15 and start + 1 + run < len(seq) and props[run] == seq[start + 1 + run]:
            run += 1
        if start + cycle.block_size < len(seq):  # the verified block lies inside the output
            assert cycle.tau == min(run + 1, cycle.block_size)
    assert shared >= 2
    assert max(c.tau for c in res.cycles) > 1, "no proposal accepted: the test would be vacuous"


def test_bad_draft_block_size_is_refused(pair):
    target, draft = pair
    from dflash.errors import UserError

    with pytest.raises(UserError, match="draft block size"):
        SpeculativeDecoder(target, draft).generate(torch.tensor([[1, 2]]), 4, block_size=4,
                                                   draft_block_size=1)


class Recording(Cycling):
    """Logs the order of the protocol calls the decoding loop makes."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.calls = []

    def select(self, i):
        self.calls.append(("select", i))
        return super().select(i)

    def update(self, tau, cycle_s, block_size, cycle_idx):
        self.calls.append(("update", cycle_idx, tau, block_size))


@pytest.mark.parametrize("engine", ["static", "fast-graph-semantics"])
def test_policy_update_is_deferred_by_one_cycle_and_complete(pair, engine):
    """generate() reports cycle i to the policy during cycle i + 1 (so the policy's Python
    overlaps that cycle's GPU work): select(i + 1) comes before update(i), every cycle is
    reported once, in order, with its own block size and tau, the last one after the loop.
    The fused graph cycle asks for the next size during the current cycle, which keeps this
    order but may add one unused select(n) at the end."""
    target, draft = pair
    policy = Recording([4, 16, 8])
    kw = {} if engine == "static" else dict(engine="fast", compile=False, _cpu_graph_mode=True)
    res = SpeculativeDecoder(target, draft, **kw).generate(
        prompts(target.config.vocab_size, n=1)[0], MAX_NEW, policy=policy, draft_block_size=16)
    n = len(res.cycles)
    assert n >= 3
    updates = [c for c in policy.calls if c[0] == "update"]
    assert updates == [("update", i, c.tau, c.block_size) for i, c in enumerate(res.cycles)]
    expected = [("select", 0)]
    for i in range(1, n):
        expected += [("select", i), ("update", i - 1, res.cycles[i - 1].tau,
                                     res.cycles[i - 1].block_size)]
    last = ("update", n - 1, res.cycles[-1].tau, res.cycles[-1].block_size)
    calls = policy.calls
    if engine != "static" and calls[-2:] == [("select", n), last]:
        calls = calls[:-2] + [last]  # the fused cycle's unused choice for a cycle n
    assert calls == expected + [last]
