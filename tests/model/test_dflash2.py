"""DFlash 2 drafts (model/dflash2.py): loading, config checks, conv and walk semantics, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dflash.decoding.quickstart import DFlashDraftModel
from dflash.errors import UserError
from dflash.model.dflash2 import dflash2_from_dflash1, grouped_dynamic_conv, select_walk
from dflash.model.toy import make_random_draft, make_random_target


@pytest.fixture(scope="module")
def pair():
    target = make_random_target(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2,
                                num_kv_heads=1, seed=2)
    d1 = make_random_draft(target, block_size=6, num_layers=2, seed=3, cls=DFlashDraftModel)
    return target, dflash2_from_dflash1(d1, conv_kernel_size=3, conv_group_size=8,
                                        selector_rank=4, selector_top_k=5, seed=1, noise=0.5)


def _perturb(draft, seed=0, scale=0.2):
    """Convs away from the identity, so the checks below see every tap."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "_conv." in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft


def test_conv_semantics():
    """y[t] = sum_o (base[o] + dyn[t, o, c // (H/G)]) * x[t-o], zero before the block; batch
    dims and K > t work."""
    g = torch.Generator().manual_seed(0)
    for t, k, h, groups in ((5, 3, 12, 3), (2, 4, 8, 8), (1, 2, 6, 1)):
        x, dyn = torch.randn(2, t, h, generator=g), torch.randn(2, t, k, groups, generator=g)
        base = torch.randn(k, h, generator=g)
        want = torch.zeros_like(x)
        for i in range(t):
            for o in range(min(k, i + 1)):
                for c in range(h):
                    want[:, i, c] += (base[o, c] + dyn[:, i, o, c // (h // groups)]) * x[:, i - o, c]
        got = grouped_dynamic_conv(x, dyn, base)
        assert got.shape == x.shape and torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(grouped_dynamic_conv(x[1], dyn[1], base), want[1], atol=1e-5)


def test_walk_semantics():
    """Greedy: argmax of unary + <pred[prev] * hproj, succ[cand]> walking from the anchor;
    T > 0: q = softmax(score / T) and the first index whose cumsum exceeds u."""
    g = torch.Generator().manual_seed(1)
    t, k, r, v = 4, 3, 5, 20
    unary = torch.randn(t, k, generator=g)
    cand = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(t)])
    hproj, pred, succ = (torch.randn(t, r, generator=g), torch.randn(v, r, generator=g),
                         torch.randn(v, r, generator=g))
    anchor = torch.tensor([7])
    u = torch.rand(t, generator=g)
    for temp in (0.0, 0.7):
        tokens, q = select_walk(unary, cand, hproj, pred, succ, anchor, temp,
                                uniforms=u if temp else None)
        prev = 7
        for pos in range(t):
            score = unary[pos] + (pred[prev] * hproj[pos] * succ[cand[pos]]).sum(-1)
            if temp:
                want_q = torch.softmax(score / temp, -1)
                assert torch.allclose(q[pos], want_q, atol=1e-6)
                idx = int((want_q.cumsum(0) <= u[pos]).sum())
            else:
                assert q is None
                idx = int(score.argmax())
            prev = int(cand[pos, idx])
            assert int(tokens[pos]) == prev, (temp, pos)
    # the generator path draws its own uniforms, reproducibly
    a = select_walk(unary, cand, hproj, pred, succ, anchor, 1.0,
                    generator=torch.Generator().manual_seed(3))[0]
    b = select_walk(unary, cand, hproj, pred, succ, anchor, 1.0,
                    generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_save_load_both_codebook_spellings(pair, tmp_path):
    target, d2 = pair
    d2 = _perturb(d2)
    d2.save_pretrained(tmp_path / "dot")
    cfg = json.loads((tmp_path / "dot" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlash2DraftModel"]
    dc = cfg["dflash_config"]
    assert (dc["conv_kernel_size"], dc["conv_group_size"], dc["selector_rank"],
            dc["selector_top_k"], dc["block_size"]) == (3, 8, 4, 5, 6)
    state = load_file(str(tmp_path / "dot" / "model.safetensors"))
    assert state["layers.1.attention_conv.base_kernel"].shape == (2, 3, 32)
    assert state["layers.0.mlp_conv.kernel_projection.weight"].shape == (2 * 3 * 4, 32)
    assert "candidate_selector.predecessor_codebook.weight" in state
    # the bare spelling some checkpoints use
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(cfg))
    save_file({k.removesuffix(".weight") if "codebook" in k else k: v for k, v in state.items()},
              str(bare / "model.safetensors"))
    for folder in (tmp_path / "dot", bare):
        got = DFlashDraftModel.from_pretrained(folder, dtype=torch.float32)
        assert got.is_dflash2 and got.candidate_selector.top_k == 5
        for k, v in d2.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
        got.check_target(target)
    d1 = DFlashDraftModel.from_pretrained(tmp_path / "dot", dtype=torch.float32)
    assert d1.layers[0].attention_conv is not None
    plain = make_random_draft(target, block_size=6, num_layers=2, seed=3)
    assert not plain.is_dflash2 and plain.candidate_selector is None


@pytest.mark.parametrize("changes, message", [
    (dict(conv_kernel_size=None), "conv_kernel_size is None"),
    (dict(selector_rank=0), "selector_rank is 0"),
    (dict(selector_top_k="4"), "selector_top_k is '4'"),
    (dict(conv_group_size=5), "conv_group_size 5 does not divide hidden_size 32"),
    (dict(selector_top_k=65), "selector_top_k 65 exceeds vocab_size 64"),
])
def test_config_errors_are_one_line(pair, tmp_path, changes, message):
    _, d2 = pair
    d2.save_pretrained(tmp_path / "d")
    path = tmp_path / "d" / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg["dflash_config"].pop(k)
        else:
            cfg["dflash_config"][k] = v
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message) as err:
        DFlashDraftModel.from_pretrained(tmp_path / "d")
    assert "\n" not in str(err.value) and "DFlash 2" in str(err.value)


def test_dflash2_checkpoint_runs_in_benchmark_cli(tmp_path):
    """benchmark.py end to end on CPU with a DFlash 2 draft (tiny pair)."""
    from conftest import run_script
    from dflash.model.toy import save_toy_pair

    target, draft = save_toy_pair(tmp_path / "pair")
    d2 = dflash2_from_dflash1(DFlashDraftModel.from_pretrained(draft, dtype=torch.float32),
                              conv_kernel_size=2, conv_group_size=16, selector_rank=4,
                              selector_top_k=4, seed=0)
    d2.save_pretrained(tmp_path / "d2")
    out = tmp_path / "out"
    res = run_script(["benchmark.py", "--model-name-or-path", str(target), "--draft-name-or-path",
                      str(tmp_path / "d2"), "--dataset", "builtin-chat", "--max-samples", "1",
                      "--max-new-tokens", "8", "--block-size", "4", "--output-json",
                      str(out / "summary.json")],
                     timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary, summary


def test_spec_generate_and_fit_checks(pair):
    """spec_generate with a DFlash 2 draft equals the target's greedy output; a target whose
    output head is larger than the selector's codebooks is refused in one line."""
    target, d2 = pair
    ids = torch.tensor([[3, 9, 4, 17, 5]])
    want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                           do_sample=False, pad_token_id=0)
    assert isinstance(d2, DFlashDraftModel)  # the converter keeps the draft's class
    assert torch.equal(d2.spec_generate(target, ids, 12, None), want)
    big = make_random_target(vocab_size=80, hidden_size=32, num_layers=3, num_heads=2,
                             num_kv_heads=1, seed=2)
    with pytest.raises(UserError, match="selector codebooks of 64 rows") as err:
        d2.check_target(big)
    assert "\n" not in str(err.value)
