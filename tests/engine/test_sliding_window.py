"""Issue 21: targets with sliding-window layers decode losslessly on every engine.

A Qwen3 target with ``use_sliding_window`` (window 8, layers 1-3 sliding): greedy speculative
output equals ``target.generate`` with the static, fast (CPU graph mode) and hf engines, for
prompts longer than the window and block sizes 4/8/16. Before the fix the static engine
ignored the window and diverged from the first generated tokens."""
import pytest
import torch

from families import greedy_reference, make_family_target
from dflash.decoding.loop import SpeculativeDecoder
from dflash.engine.static import StaticTargetEngine, layer_windows
from dflash.model.toy import make_random_draft


@pytest.fixture(scope="module")
def pair():
    target = make_family_target("qwen3_sliding")
    return target, make_random_draft(target, block_size=16, dtype=torch.float64)


def test_windows_read_from_the_config(pair):
    target, _ = pair
    assert layer_windows(target.config, 4) == [None, 8, 8, 8]

    class Cfg:  # a sliding_window without layer_types: every layer slides (HF's cache rule)
        sliding_window = 5
    assert layer_windows(Cfg(), 2) == [5, 5]
    Cfg.sliding_window = None
    assert layer_windows(Cfg(), 2) == [None, None]


@pytest.mark.parametrize("engine", ["static", "fast", "hf"])
def test_sliding_window_target_is_greedy_lossless(pair, engine):
    target, draft = pair
    kw = dict(compile=False, _cpu_graph_mode=True) if engine == "fast" else {}
    dec = SpeculativeDecoder(target, draft, engine=engine, **kw)
    assert dec.engine_name == engine
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate((5, 13, 27)):  # two prompts longer than the window
        ids = torch.randint(1, 127, (1, n), generator=g)
        ref = greedy_reference(target, ids, 20)
        for b in (4, 8, 16):
            assert dec.generate(ids, 20, block_size=b).output_ids == ref, (engine, i, b)


def test_tree_mask_applies_the_window(pair):
    """Tree verification (cache_slots + tree_mask, used by the multi-round sampler) with a
    chain-shaped tree equals the plain causal forward, window included."""
    target, _ = pair
    eng = StaticTargetEngine(target, [1], 64)
    ids = torch.randint(1, 127, (1, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24)
    plain, _ = eng.forward(ids, pos, kv_len=24)
    eng.forward(ids[:, :18], pos[:18], kv_len=18)
    chain = torch.ones(6, 6, dtype=torch.bool).tril()
    tree, _ = eng.forward(ids[:, 18:], pos[18:], kv_len=24, cache_slots=pos[18:], tree_mask=chain)
    torch.testing.assert_close(tree[0], plain[0, 18:], rtol=1e-9, atol=1e-9)
    hf = target(ids).logits
    torch.testing.assert_close(plain, hf, rtol=1e-9, atol=1e-9)
