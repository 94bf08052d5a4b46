"""The draft training recipe's invariants, on tiny random models (CPU, fast)."""
import json
import math

import pytest
import torch

from dflash.decoding.loop import SpeculativeDecoder
from dflash import DFlashDraftModel
from dflash.model.toy import make_random_draft, make_random_target
from dflash.training.data import greedy_continue
from dflash.training.evaluate import continuation_stats
from dflash.training.features import target_features
from dflash.training.recipe import (build_block_batch, default_gamma, draft_hidden, loss_weights,
                                    recipe_loss, sample_anchors, valid_anchor_mask, weighted_ce)

B, S, BLOCK, MASK = 2, 48, 8, 127


@pytest.fixture(scope="module")
def pair():
    target = make_random_target(vocab_size=128, hidden_size=64, num_layers=4, seed=0)
    draft = make_random_draft(target, block_size=BLOCK, num_layers=2, target_layer_ids=[1, 3],
                              mask_token_id=MASK, seed=1)
    return target, draft


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (B, S), generator=g)
    lm = torch.zeros(B, S, dtype=torch.bool)
    lm[:, 10:] = True
    return ids, lm


def _block_logits(target, draft, ids, lm, anchors, keep, feats=None, noise_ids=None):
    batch = build_block_batch(ids, lm, anchors, keep, BLOCK, MASK, default_gamma(BLOCK))
    if noise_ids is not None:
        batch.noise_ids = noise_ids
    if feats is None:
        feats = target_features(target, ids, draft.config.target_layer_ids)
    h = draft_hidden(draft, target.get_input_embeddings(), feats, batch)
    return target.get_output_embeddings()(h).reshape(B, anchors.shape[1], BLOCK, -1), batch, feats


ANCHORS = torch.tensor([[12, 20, 33], [15, 27, 40]])
KEEP = torch.ones_like(ANCHORS, dtype=torch.bool)


def test_future_tokens_do_not_change_a_block(pair):
    target, draft = pair
    ids, lm = _inputs()
    ref, _, _ = _block_logits(target, draft, ids, lm, ANCHORS, KEEP)
    for j in range(ANCHORS.shape[1]):
        changed = ids.clone()
        for r in range(B):
            a = int(ANCHORS[r, j])
            # every token after the anchor: inside the block (labels only) and after it
            changed[r, a + 1:] = (changed[r, a + 1:] + 7) % 120
        out, _, _ = _block_logits(target, draft, changed, lm, ANCHORS, KEEP)
        torch.testing.assert_close(out[:, :j + 1], ref[:, :j + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, j + 1:], ref[:, j + 1:]) if j + 1 < ANCHORS.shape[1] else True


def test_context_at_or_after_anchor_is_invisible(pair):
    target, draft = pair
    ids, lm = _inputs(1)
    ref, _, feats = _block_logits(target, draft, ids, lm, ANCHORS, KEEP)
    for j in range(ANCHORS.shape[1]):
        for r in range(B):
            a = int(ANCHORS[r, j])
            f = feats.clone()
            f[r, a:] += torch.randn_like(f[r, a:])  # the anchor's own features and later
            out, _, _ = _block_logits(target, draft, ids, lm, ANCHORS, KEEP, feats=f)
            torch.testing.assert_close(out[r, j], ref[r, j], rtol=0, atol=1e-5)
            f = feats.clone()
            f[r, a - 1] += 3 * torch.randn_like(f[r, a - 1])  # the last visible position
            out, _, _ = _block_logits(target, draft, ids, lm, ANCHORS, KEEP, feats=f)
            assert (out[r, j] - ref[r, j]).abs().max() > 1e-4


def test_blocks_do_not_see_each_other(pair):
    target, draft = pair
    ids, lm = _inputs(2)
    ref, batch, feats = _block_logits(target, draft, ids, lm, ANCHORS, KEEP)
    noise = batch.noise_ids.clone().reshape(B, -1, BLOCK)
    noise[:, 1, :] = 5  # rewrite block 1 entirely
    out, _, _ = _block_logits(target, draft, ids, lm, ANCHORS, KEEP, feats=feats,
                              noise_ids=noise.reshape(B, -1))
    torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]], rtol=0, atol=1e-5)
    assert (out[:, 1] - ref[:, 1]).abs().max() > 1e-4


def test_labels_positions_and_noise_layout():
    ids, lm = _inputs(3)
    batch = build_block_batch(ids, lm, ANCHORS, KEEP, BLOCK, MASK, 7.0)
    labels = batch.labels.reshape(B, -1, BLOCK)
    noise = batch.noise_ids.reshape(B, -1, BLOCK)
    pos = batch.position_ids[:, S:].reshape(B, -1, BLOCK)
    assert torch.equal(batch.position_ids[:, :S], torch.arange(S).expand(B, -1))
    for r in range(B):
        for j, a in enumerate(ANCHORS[r].tolist()):
            # same position, no shift: slot k predicts input_ids[a + k] and sits at a + k
            assert labels[r, j].tolist() == ids[r, a:a + BLOCK].tolist()
            assert pos[r, j].tolist() == list(range(a, a + BLOCK))
            assert noise[r, j, 0] == ids[r, a] and (noise[r, j, 1:] == MASK).all()


def test_loss_weights_and_slot_zero():
    gamma = default_gamma(16)
    assert gamma == 7.0 and default_gamma(10) == 5.0 and default_gamma(8) == 4.0
    w = loss_weights(16, gamma)
    assert w[0] == 0
    for k in range(1, 16):
        assert math.isclose(float(w[k]), math.exp(-(k - 1) / gamma), rel_tol=1e-6)
    ids, lm = _inputs(4)
    batch = build_block_batch(ids, lm, ANCHORS, KEEP, BLOCK, MASK, 4.0)
    ww = batch.weights.reshape(B, -1, BLOCK)
    assert (ww[:, :, 0] == 0).all()
    torch.testing.assert_close(ww[0, 0], loss_weights(BLOCK, 4.0))
    # blocks running past the end and padded (keep False) blocks carry no weight
    anchors = torch.tensor([[S - 3, 0], [20, 0]])
    keep = torch.tensor([[True, False], [True, False]])
    batch = build_block_batch(ids, lm, anchors, keep, BLOCK, MASK, 4.0)
    ww = batch.weights.reshape(B, -1, BLOCK)
    assert (ww[0, 0, 3:] == 0).all() and (ww[0, 0, 1:3] > 0).all()
    assert (ww[:, 1] == 0).all()


def test_slot_zero_gets_no_gradient(pair):
    target, draft = pair
    ids, lm = _inputs(5)
    batch = build_block_batch(ids, lm, ANCHORS, KEEP, BLOCK, MASK, 4.0)
    h = torch.randn(B, ANCHORS.shape[1] * BLOCK, 64, requires_grad=True)
    total, wsum, _ = weighted_ce(h, target.get_output_embeddings(), batch.labels, batch.weights)
    (total / wsum).backward()
    g = h.grad.reshape(B, -1, BLOCK, 64)
    assert (g[:, :, 0] == 0).all() and (g[:, :, 1].abs().sum() > 0)


def test_anchor_sampling():
    ids, lm = _inputs(6)
    lm[1, 30:] = False  # a shorter response in row 1
    gen = torch.Generator().manual_seed(0)
    anchors, keep = sample_anchors(lm, 64, gen)
    valid = valid_anchor_mask(lm)
    for r in range(B):
        chosen = anchors[r][keep[r]].tolist()
        assert chosen == sorted(set(chosen))
        assert all(valid[r, a] and lm[r, a] and lm[r, a + 1] for a in chosen)
        assert len(chosen) == int(valid[r].sum())  # fewer valid than asked: all of them
    assert keep[1].sum() == 19 and not keep[1, 19:].any()
    anchors, keep = sample_anchors(lm, 5, gen)
    assert keep.all() and anchors.shape == (B, 5)


def test_recipe_loss_runs_and_is_finite(pair):
    target, draft = pair
    ids, lm = _inputs(7)
    loss, st = recipe_loss(target, draft, ids, lm, num_anchors=6, gamma=4.0,
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and st["blocks"] == 12


def test_batched_greedy_matches_plain_greedy(pair):
    target, _ = pair
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    outs = greedy_continue(target, prompts, 12, stop_ids=[], pad_id=0, batch_size=3,
                           log=lambda *_: None)
    plain = SpeculativeDecoder(target, None)
    for p, o in zip(prompts, outs):
        ref = plain.generate(torch.tensor(p), max_new_tokens=12, block_size=1).output_ids
        assert o == ref


def test_continuation_stats():
    st = continuation_stats([list(range(70)), [1, 2] * 40])
    assert st["loop_free_share"] == 0.5 and 0 < st["distinct_4_mean"] < 1


def _tiny_tokenizer(folder):
    from dflash.training.train_target import train_tokenizer

    text = ["def add(a, b):\n    return a + b\n", "How many apples?\nThe answer is 3.\n"] * 20
    return train_tokenizer(text, folder, vocab_size=300, log=lambda *_: None)


def test_cli_trains_saves_reloads_and_decodes_losslessly(tmp_path):
    from transformers import AutoModelForCausalLM

    from dflash.training import train_draft as train

    tok = _tiny_tokenizer(tmp_path / "target")
    target = make_random_target(vocab_size=320, hidden_size=64, num_layers=4, seed=3)
    target.config.eos_token_id = tok.eos_token_id
    target.save_pretrained(str(tmp_path / "target"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"turns": ["def add(a, b):\n"]}, {"turns": ["How many apples?"]},
        {"text": "def f(x):\n    return"}, {"ids": [5, 6, 7, 8]}]) + "\n")
    data = tmp_path / "data.pt"
    assert train.main(["gen-data", "--target", str(tmp_path / "target"), "--prompts", str(prompts),
                       "--out", str(data), "--max-new-tokens", "24", "--device", "cpu"]) == 0
    out = tmp_path / "draft"
    common = ["train-draft", "--target", str(tmp_path / "target"), "--data", str(data),
              "--out", str(out), "--block-size", "8", "--num-layers", "2",
              "--target-layer-ids", "1,2", "--steps", "6", "--batch", "2", "--anchors", "4",
              "--lr", "1e-3", "--device", "cpu", "--save-every", "0"]
    # interrupted after 3 steps, then resumed: same weights as one uninterrupted run
    assert train.main(common + ["--stop-after", "3"]) == 0
    assert (out / "checkpoint.pt").exists()
    assert train.main(common + ["--resume", "--heldout", str(data)]) == 0
    assert not (out / "checkpoint.pt").exists()
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 6 and set(info["simulated"]["tau"]) == {str(b) for b in range(2, 17)}
    out2 = tmp_path / "draft2"
    assert train.main([*common[:6], str(out2), *common[7:]]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    # Same process, same kernels and inputs, yet MKL may pick alignment-dependent paths: compare
    # with a tolerance far below what a wrong resume (lost optimizer state, reset schedule) moves.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_size"] == 8 and cfg["num_target_layers"] == 4
    assert cfg["dflash_config"] == {"mask_token_id": tok.mask_token_id, "target_layer_ids": [1, 2]}
    draft = DFlashDraftModel.from_pretrained(out, dtype=torch.float32)
    tgt = AutoModelForCausalLM.from_pretrained(str(tmp_path / "target"), dtype=torch.float32).eval()
    spec, plain = SpeculativeDecoder(tgt, draft), SpeculativeDecoder(tgt, None)
    for p in ([5, 6, 7, 8, 9], [40, 41, 42]):
        ids = torch.tensor(p)
        r1 = spec.generate(ids, max_new_tokens=30, block_size=8, stop_token_ids=[tok.eos_token_id])
        r0 = plain.generate(ids, max_new_tokens=30, block_size=1, stop_token_ids=[tok.eos_token_id])
        assert r1.output_ids == r0.output_ids


def test_embedded_pair_fits_together():
    """The committed pair: within 25 MB, eos/mask ids consistent, chat template usable."""
    from transformers import AutoConfig, AutoTokenizer

    from dflash.model.hub import EMBEDDED_DRAFT, EMBEDDED_TARGET

    if not (EMBEDDED_TARGET / "model.safetensors").exists():
        pytest.skip("embedded pair not present")
    weights = sum(f.stat().st_size for d in (EMBEDDED_TARGET, EMBEDDED_DRAFT)
                  for f in d.iterdir() if f.is_file())
    assert weights <= 25_000_000
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    cfg = AutoConfig.from_pretrained(str(EMBEDDED_TARGET))
    dcfg = json.loads((EMBEDDED_DRAFT / "config.json").read_text())
    assert cfg.eos_token_id == tok.eos_token_id and tok.pad_token_id is not None
    assert dcfg["dflash_config"]["mask_token_id"] == tok.convert_tokens_to_ids("<|mask|>")
    assert dcfg["block_size"] == 16 and dcfg["num_target_layers"] == cfg.num_hidden_layers
    code = 'def f(x):\n    """Return x."""\n'
    text = tok.apply_chat_template([{"role": "user", "content": code}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == code
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "Hi?\n"


def test_target_features_are_hf_hidden_states_shifted_by_one():
    """Layer l's feature is HF's hidden_states[l + 1]; for the last layer that is the final-normed
    state (the reference's rule), for the others the layer's output."""
    target = make_random_target(num_layers=3)
    ids = torch.randint(1, 60, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = target(input_ids=ids, output_hidden_states=True).hidden_states
    got = target_features(target, ids, [0, 2])
    torch.testing.assert_close(got, torch.cat([hs[1], hs[3]], dim=-1))
