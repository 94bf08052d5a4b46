"""Issue 23: the engine chosen per target family, and lossless decoding on each family.

Tiny random targets from transformers' own config classes (tests/engine/families.py). The
end-to-end checks compare greedy speculative output with ``target.generate``; a random draft
accepts little, so the rollback of partly accepted blocks is checked at the engine level too
(random acceptance lengths, each verify's logits against a fresh forward of the sequence)."""
import pytest
import torch

from families import FAMILIES, greedy_reference, make_family_draft, make_family_target
from dflash.decoding.loop import SpeculativeDecoder
from dflash.engine.select import Engines, choose_engine
from dflash.errors import UserError

# family -> (auto on CPU, auto on CUDA)
EXPECTED = {
    "qwen3_sliding": ("static", "fast"), "qwen3_moe": ("static", "fast"),
    "llama3_rope": ("static", "fast"), "qwen3_5": ("hf", "hf"), "qwen3_5_moe": ("hf", "hf"),
    "qwen3_next": ("hf", "hf"), "gemma4": ("hf", "hf"),
    "gemma4_moe": ("hf", "hf"), "gpt_oss": ("static", "fast"),
}
_cache = {}


def target_of(family):
    if family not in _cache:
        _cache[family] = make_family_target(family)
    return _cache[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_choice_per_family(family):
    target = target_of(family)
    cpu, cuda = EXPECTED[family]
    name, desc = choose_engine("auto", torch.device("cpu"), target)
    assert name == cpu and desc.startswith(f"{cpu} (") and ": " in desc
    assert choose_engine("auto", torch.device("cuda"), target)[0] == cuda
    for explicit in ("static", "fast"):
        runs = explicit == "static" and cpu == "static" or explicit == cuda == "fast"
        if runs:
            assert choose_engine(explicit, torch.device("cuda"), target)[0] == explicit
        else:  # refused in one line, before any model runs
            with pytest.raises(UserError, match=f"--engine {explicit} cannot run this target"):
                choose_engine(explicit, torch.device("cuda"), target)
    assert choose_engine("hf", torch.device("cpu"), target)[0] == "hf"


def test_description_and_note(capsys):
    target = target_of("qwen3_5")
    eng = Engines(target, None, "auto", feature_layers=[1])
    assert eng.name == "hf"
    assert eng.description == "hf (qwen3_5_text: linear-attention layers)"
    assert capsys.readouterr().err.strip() == "engine: hf (qwen3_5_text: linear-attention layers)"
    dense = Engines(target_of("llama3_rope"), None, "auto", feature_layers=[1])
    assert dense.name == "static" and capsys.readouterr().err == ""  # default path: silent


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_lossless(family):
    target = target_of(family)
    draft = make_family_draft(target)
    engines = {"auto", "hf"} | ({"fast"} if EXPECTED[family][1] == "fast" else set())
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 127, (1, n), generator=g) for n in (6, 19)]  # window 8
    refs = [greedy_reference(target, ids, 16) for ids in prompts]
    for engine in sorted(engines):
        kw = dict(compile=False, _cpu_graph_mode=True) if engine == "fast" else {}
        dec = SpeculativeDecoder(target, draft, engine=engine, **kw)
        for ids, ref in zip(prompts, refs):
            for b in (4, 8, 16):
                assert dec.generate(ids, 16, block_size=b).output_ids == ref, (engine, b)
            stop = ref[5]  # with a stop token: output ends at its first occurrence
            out = dec.generate(ids, 16, block_size=8, stop_token_ids=[stop]).output_ids
            assert out == ref[:ref.index(stop) + 1], engine


@pytest.mark.parametrize("family,engine", [("qwen3_5", "hf"), ("qwen3_next", "hf"),
                                           ("gemma4", "hf"), ("gpt_oss", "hf"),
                                           ("qwen3_sliding", "hf"), ("qwen3_sliding", "static"),
                                           ("qwen3_moe", "static"), ("gpt_oss", "static")])
def test_rollback_of_partly_accepted_blocks(family, engine):
    """Verify blocks at random acceptance lengths: each verify's logits and features equal a
    fresh forward of the committed sequence plus the block (recurrent layers: snapshot and
    replay; attention layers: cropped or overwritten caches)."""
    target = target_of(family)
    eng = Engines(target, None, engine, feature_layers=[1, 3]).ensure(128)[0]
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(1, 127, (1, 11), generator=g)
    eng.forward(seq, torch.arange(11), kv_len=11)
    for _ in range(8):
        b = int(torch.randint(2, 9, (1,), generator=g))
        block = torch.randint(1, 127, (1, b), generator=g)
        start = seq.shape[1]
        logits, feats = eng.forward(block, torch.arange(start, start + b), kv_len=start + b)
        full = target(torch.cat([seq, block], 1), output_hidden_states=True)
        want = torch.cat([full.hidden_states[2], full.hidden_states[4]], -1)[:, start:]
        # linear-attention kernels compute in float32 and chunk differently: ~1e-6; a wrong
        # recurrent state is off by ~1e-1
        tol = 1e-4 if eng.name == "hf" else 1e-7
        torch.testing.assert_close(logits, full.logits[:, start:], rtol=tol, atol=tol)
        torch.testing.assert_close(feats, want, rtol=tol, atol=tol)
        acc = int(torch.randint(0, b + 1, (1,), generator=g))  # 0 .. all of the block
        seq = torch.cat([seq, block[:, :acc]], 1)
