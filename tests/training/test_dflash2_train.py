"""DFlash 2 training (dflash/training/dflash2.py) on a tiny random pair (CPU, a few seconds)."""
import torch

from dflash.model.dflash2 import dflash2_from_dflash1
from dflash.model.draft import DFlashDraft
from dflash.model.toy import make_random_draft, make_random_target
from dflash.training.dflash2 import (draft2_hidden, dflash2_step, evaluate_losses, save_draft,
                                     selector_scores, train_dflash2)
from dflash.training.features import target_features
from dflash.training.recipe import build_block_batch

BLOCK, MASK = 8, 127


def _pair():
    target = make_random_target(vocab_size=128, hidden_size=64, num_layers=4, seed=0)
    d1 = make_random_draft(target, block_size=BLOCK, num_layers=2, target_layer_ids=[1, 3],
                           mask_token_id=MASK, seed=1)
    d2 = dflash2_from_dflash1(d1, conv_kernel_size=3, conv_group_size=16, selector_rank=8,
                              selector_top_k=4, seed=2, noise=0.5).float()
    return target, d2


def _data(target, n=12, length=40, seed=0):
    """Sequences whose 'responses' are the target's own greedy continuation (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (n, 8), generator=g)
    with torch.no_grad():
        while ids.shape[1] < length:
            ids = torch.cat([ids, target(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    seqs = ids.tolist()
    return {"sequences": seqs, "prompt_lens": [8] * n, "meta": {}}


def test_blockwise_forward_matches_the_decoding_forward():
    target, draft = _pair()
    ids = torch.randint(0, 120, (1, 30), generator=torch.Generator().manual_seed(3))
    lm = torch.ones_like(ids, dtype=torch.bool)
    anchors = torch.tensor([[5, 17]])
    keep = torch.ones_like(anchors, dtype=torch.bool)
    batch = build_block_batch(ids, lm, anchors, keep, BLOCK, MASK, 4.0)
    feats = target_features(target, ids, draft.target_layer_ids)
    with torch.no_grad():
        h = draft2_hidden(draft, target.get_input_embeddings(), feats, batch)
        for j, a in enumerate(anchors[0].tolist()):
            # the decoder's view of one block: context < a, then the block (own positions)
            noise = draft.embed_block(target.get_input_embeddings(), batch.noise_ids[:, j * BLOCK:(j + 1) * BLOCK])
            pos = torch.cat([torch.arange(a), torch.arange(a, a + BLOCK)])[None]
            ref = draft(noise, feats[:, :a], pos)
            torch.testing.assert_close(h[:, j * BLOCK:(j + 1) * BLOCK], ref, rtol=1e-4, atol=1e-4)
    # the selector score is the walk's score
    sel = draft.candidate_selector
    hid = torch.randn(3, 64)
    unary, cand = torch.randn(3, 4), torch.randint(0, 128, (3, 4))
    prev = torch.randint(0, 128, (3,))
    got = selector_scores(sel, hid, unary, cand, prev)
    want = unary + torch.stack([(sel.successor_codebook.weight[cand[i]]
                                 @ (sel.predecessor_codebook.weight[prev[i]]
                                    * sel.hidden_projection(hid[i])))
                                for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_few_steps_decrease_the_selector_loss_and_the_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    target, draft = _pair()
    data = _data(target)
    before = evaluate_losses(target, draft, data, anchors=8, gamma=4.0, batch=6)
    assert 0 < before["in_topk"] <= 1
    # the selector alone (draft logits fixed, so the same positions count before and after)
    info = train_dflash2(target, draft, data, steps=20, batch=4, anchors=8, lr_new=2e-2,
                         lr_conv=0, lr_body=0, gamma=4.0, log_every=10, log=lambda *_: None)
    after = evaluate_losses(target, draft, data, anchors=8, gamma=4.0, batch=6)
    assert info["steps"] == 20 and len(info["history"]) == 2
    assert after["loss_select"] < 0.8 * before["loss_select"], (before, after)
    assert after["in_topk"] == before["in_topk"]
    # the whole model: the DFlash 1 part of the objective goes down too
    train_dflash2(target, draft, data, steps=10, batch=4, anchors=8, lr_new=1e-2,
                  lr_body=3e-3, gamma=4.0, log=lambda *_: None)
    last = evaluate_losses(target, draft, data, anchors=8, gamma=4.0, batch=6)
    assert last["loss_draft"] < after["loss_draft"], (after, last)

    save_draft(draft, tmp_path / "d2", dtype=torch.float32)
    back = DFlashDraft.from_pretrained(tmp_path / "d2", dtype=torch.float32)
    assert back.is_dflash2 and back.config.selector_top_k == 4
    for (k, v), (k2, v2) in zip(sorted(draft.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    ids, lm = torch.tensor([data["sequences"][0]]), torch.ones(1, 40, dtype=torch.bool)
    with torch.no_grad():
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = dflash2_step(target, draft.eval(), ids, lm, num_anchors=4, gamma=4.0, generator=g1)
        b = dflash2_step(target, back, ids, lm, num_anchors=4, gamma=4.0, generator=g2)
    torch.testing.assert_close(a["select"], b["select"])
