"""Training a DFlash 2 draft: the DFlash 1 recipe plus the candidate selector's loss.

Objective of one step (per sequence batch; anchors, blocks, masks and slot weights
``w_k = exp(-(k-1)/gamma)`` exactly as ``recipe.py`` builds them for DFlash 1)::

    L = L_draft + selector_weight * L_select

* ``L_draft``: the DFlash 1 loss on the draft's logits, sum_k w_k CE(logits_k, y_k) / sum w_k,
  where slot k of the block at anchor a predicts ``y_k = input_ids[a+k]``.
* ``L_select``: teacher-forced selector loss. At slot k (k >= 1) the candidates are the top
  ``selector_top_k`` tokens of the draft logits, ``unary[c]`` their logits; the predecessor is
  the true previous token ``y_{k-1}`` (the anchor for k = 1); ``h_k`` is the final-normed
  block state. ``score_c = unary[c] + <pred(y_{k-1}) * proj(h_k), succ(c)>`` and the loss is
  the cross-entropy of softmax(score) over the candidates at the true token ``y_k``, weighted
  by ``w_k``, normalised by the weight of the positions counted.
* Only positions whose true token is among the candidates count. Why not add it as an
  extra candidate: the walk at decoding time can only choose among the top-k, so where the
  true token is missing the block is rejected there whatever the selector does; adding it
  would train pair scores for a choice the walk never sees (and duplicate L_draft, which
  already pulls the true token into the top-k). Teacher forcing matches decoding: while a
  block is being accepted, the walk's ``prev`` is exactly the true previous token.
* Gradients of L_select flow into the selector and, through ``unary`` and ``h_k``, into the
  draft body (one joint model); the top-k choice itself is not differentiated.

The dynamic convolutions run over each block's own positions (zeros before the block's
anchor), so a batch of concatenated blocks is convolved block by block (``blockwise_conv``).

    python -m dflash.training.dflash2 --out models/tiny-draft-dflash2 [options]

initialises from the embedded DFlash 1 draft (``dflash2_from_dflash1``), makes CPU-sized
data with the embedded target (``dflash2_data.make_data``) and trains (see ``--help``).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model import dflash2 as D2
from ..model.draft import DFlashDraft
from ..model.ops import rope_cos_sin
from .data import collate
from .features import target_features
from .recipe import BlockBatch, build_block_batch, default_gamma, sample_anchors


# ----------------------------------------------------------------------------- forward
def blockwise_conv(x, dyn, base, *, block_size: int):
    """``grouped_dynamic_conv`` on [B, N*b, H] states, each block of b positions on its own."""
    lead, q = x.shape[:-2], x.shape[-2]
    n = q // block_size
    xb = x.reshape(*lead, n, block_size, x.shape[-1])
    db = dyn.reshape(*lead, n, block_size, *dyn.shape[-2:])
    return D2.grouped_dynamic_conv(xb, db, base).reshape(x.shape)


def _layer(layer, h, ctx, q_rope, k_rope, mask, conv):
    # DraftLayer.forward for DFlash 2 layers with an explicit mask and a block-wise conv
    x, kernel = layer.attention_conv.prepare(layer.input_layernorm(h), conv=conv)
    attn = layer.self_attn
    q = attn.project_q(x, *q_rope)
    k, v = attn.project_kv(torch.cat([ctx, x], dim=1), *k_rope)
    h = h + layer.attention_conv.finish(attn.attend(q, k, v, mask), kernel, conv=conv)
    x, kernel = layer.mlp_conv.prepare(layer.post_attention_layernorm(h), conv=conv)
    return h + layer.mlp_conv.finish(layer.mlp(x), kernel, conv=conv)


def draft2_hidden(draft: DFlashDraft, embed, features: torch.Tensor, batch: BlockBatch):
    """Final-normed block states [B, N*b, H] of a DFlash 2 draft for a recipe block batch."""
    noise = draft.embed_block(embed, batch.noise_ids)
    ctx = draft.project_context(features.to(noise.dtype))
    q_len = noise.shape[1]
    k_rope = rope_cos_sin(draft.inv_freq, batch.position_ids, noise.dtype, draft.attention_scaling)
    q_rope = (k_rope[0][:, -q_len:], k_rope[1][:, -q_len:])
    conv = partial(blockwise_conv, block_size=draft.block_size)
    h = noise
    for layer in draft.layers:
        h = _layer(layer, h, ctx, q_rope, k_rope, batch.attention_mask, conv)
    return draft.norm(h)


# ----------------------------------------------------------------------------- losses
def selector_scores(selector, hidden, unary, cand, prev):
    """score [n, k] = unary + <pred(prev) * proj(hidden), succ(cand)> (the walk's score)."""
    a = selector.predecessor_codebook(prev) * selector.hidden_projection(hidden)  # [n, r]
    succ = selector.successor_codebook(cand)                                      # [n, k, r]
    return unary + torch.einsum("nkr,nr->nk", succ, a).float()


def dflash2_losses(draft: DFlashDraft, hidden, lm_head, batch: BlockBatch) -> dict:
    """The two losses (tensors) and their statistics for states ``hidden`` [B, N*b, H]."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y, w = batch.labels.reshape(-1), batch.weights.reshape(-1)
    sel = (w > 0).nonzero().squeeze(-1)  # slots >= 1 only: slot 0 has weight 0
    prev = batch.labels.reshape(-1)[sel - 1]  # slot k-1 of the same block (slot 0 = anchor)
    y, w, hs = y[sel], w[sel], h[sel]
    logits = draft.compute_logits(hs, lm_head).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    wsum = w.sum().clamp(min=1e-6)
    unary, cand = torch.topk(logits, draft.candidate_selector.top_k, dim=-1)
    hit = cand == y[:, None]
    inside = hit.any(-1)
    score = selector_scores(draft.candidate_selector, hs, unary, cand.detach(), prev)
    sel_ce = torch.logsumexp(score, -1) - (score * hit).sum(-1)  # 0 where not inside
    w_in = w * inside
    w_in_sum = w_in.sum().clamp(min=1e-6)
    with torch.no_grad():
        top1 = (logits.argmax(-1) == y).float()
        pick = cand.gather(1, score.argmax(-1, keepdim=True)).squeeze(-1) == y
        stats = {"acc_draft": float((top1 * w).sum() / wsum),
                 "acc_select": float((pick.float() * w).sum() / wsum),
                 "in_topk": float((inside.float() * w).sum() / wsum),
                 "blocks": int(batch.keep.sum())}
    return {"draft": (ce * w).sum() / wsum, "select": (sel_ce * w_in).sum() / w_in_sum,
            "stats": stats}


def dflash2_step(target, draft, input_ids, loss_mask, *, num_anchors: int, gamma: float,
                 generator=None):
    """One teacher-forced forward of a DFlash 2 draft -> dflash2_losses(...)."""
    cfg = draft.config
    feats = target_features(target, input_ids, cfg.target_layer_ids)
    anchors, keep = sample_anchors(loss_mask, num_anchors, generator)
    batch = build_block_batch(input_ids, loss_mask, anchors, keep, cfg.block_size,
                              cfg.mask_token_id, gamma)
    h = draft2_hidden(draft, target.get_input_embeddings(), feats, batch)
    return dflash2_losses(draft, h, target.get_output_embeddings(), batch)


@torch.no_grad()
def evaluate_losses(target, draft, data: dict, *, anchors: int = 32, gamma: float = 7.0,
                    batch: int = 8, seed: int = 1) -> dict:
    """Mean losses/statistics over ``data`` (fixed anchors from ``seed``)."""
    was_training = draft.training
    draft.eval()
    gen = torch.Generator().manual_seed(seed)
    acc: dict = {}
    n = len(data["sequences"])
    parts = 0
    for s0 in range(0, n, batch):
        ids, lm = collate(data, list(range(s0, min(n, s0 + batch))), draft.mask_token_id)
        out = dflash2_step(target, draft, ids, lm, num_anchors=anchors, gamma=gamma, generator=gen)
        for k, v in [("loss_draft", float(out["draft"])), ("loss_select", float(out["select"])),
                     *out["stats"].items()]:
            acc[k] = acc.get(k, 0.0) + v
        parts += 1
    draft.train(was_training)
    return {k: round(v / max(1, parts), 4) if k != "blocks" else int(v) for k, v in acc.items()}


# ----------------------------------------------------------------------------- training
def train_dflash2(target, draft: DFlashDraft, data: dict, *, steps: int = 1000, batch: int = 8,
                  anchors: int = 16, lr_new: float = 2e-3, lr_body: float = 2e-4,
                  lr_conv: float | None = None, selector_weight: float = 1.0, gamma: float | None = None,
                  warmup_frac: float = 0.04, grad_clip: float = 1.0, seed: int = 0,
                  time_budget: float | None = None, log_every: int = 25, log=print) -> dict:
    """Train ``draft`` (float32, in place) on ``data``; returns the training info/history.

    Learning rates: ``lr_new`` for the selector, ``lr_conv`` (default ``lr_new``) for the
    convs, ``lr_body`` for the weights a DFlash 1 initialisation already trained; 0 freezes
    a part (the body gets a smaller rate: it is trained already and the CPU data is small)."""
    from .train_target import Schedule, lr_schedule

    gamma = gamma or default_gamma(draft.block_size)
    for p in target.parameters():
        p.requires_grad_(False)
    lr_conv = lr_new if lr_conv is None else lr_conv
    parts: dict = {"selector": [], "conv": [], "body": []}
    for name, p in draft.named_parameters():
        part = "selector" if "candidate_selector" in name else "conv" if "_conv." in name else "body"
        parts[part].append(p)
    peaks = {"selector": lr_new, "conv": lr_conv, "body": lr_body}
    groups = []
    for part, ps in parts.items():
        for p in ps:
            p.requires_grad_(peaks[part] > 0)
        if peaks[part] > 0:
            groups.append({"params": ps, "peak": peaks[part]})
    opt = torch.optim.AdamW(groups, lr=lr_new, betas=(0.9, 0.95), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    draft.train()
    sched = Schedule(steps, time_budget)
    n_seq, pad = len(data["sequences"]), draft.mask_token_id
    history, ema, step, t0 = [], None, 0, time.time()
    while (prog := sched.progress(step)) < 1.0:
        rng = np.random.default_rng([seed, step])
        ids, lm = collate(data, rng.integers(0, n_seq, size=batch).tolist(), pad)
        for g in opt.param_groups:
            g["lr"] = lr_schedule(prog, g["peak"], warmup_frac)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        out = dflash2_step(target, draft, ids, lm, num_anchors=anchors, gamma=gamma, generator=gen)
        loss = out["draft"] + selector_weight * out["select"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        step += 1
        cur = {"draft": float(out["draft"].detach()), "select": float(out["select"].detach())}
        ema = cur if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in cur.items()}
        if step % log_every == 0:
            row = {"step": step, "loss_draft": round(cur["draft"], 4),
                   "loss_select": round(cur["select"], 4),
                   "loss_draft_ema": round(ema["draft"], 4),
                   "loss_select_ema": round(ema["select"], 4),
                   **{k: round(v, 4) for k, v in out["stats"].items() if k != "blocks"},
                   "grad_norm": round(float(gnorm), 3), "elapsed_s": round(time.time() - t0, 1)}
            history.append(row)
            log(json.dumps(row))
    return {"steps": step, "seconds": round(time.time() - t0, 1), "batch": batch,
            "anchors": anchors, "lr_new": lr_new, "lr_conv": lr_conv, "lr_body": lr_body, "gamma": gamma,
            "selector_weight": selector_weight, "warmup_frac": warmup_frac,
            "grad_clip": grad_clip, "seed": seed, "history": history,
            "final_ema": {k: round(v, 4) for k, v in (ema or {}).items()}}


def save_draft(draft: DFlashDraft, folder: Path, dtype=torch.bfloat16) -> None:
    copy.deepcopy(draft).to(dtype).eval().save_pretrained(folder)


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from . import train_target as TT
    from .dflash2_data import make_data

    ap = argparse.ArgumentParser(prog="python -m dflash.training.dflash2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the DFlash 2 draft")
    ap.add_argument("--target", default="models/tiny-target")
    ap.add_argument("--init", default="models/tiny-draft", help="DFlash 1 draft to convert")
    ap.add_argument("--data", default=None, help="gen-data .pt (default: made here, then saved "
                                                 "as WORK/data.pt)")
    ap.add_argument("--work", default="/tmp/dflash2_work")
    ap.add_argument("--heldout", type=int, default=32, help="sequences kept out of training")
    ap.add_argument("--conv-kernel-size", type=int, default=4)
    ap.add_argument("--conv-group-size", type=int, default=64)
    ap.add_argument("--selector-rank", type=int, default=32)
    ap.add_argument("--selector-top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--time-budget", type=float, default=660.0, help="seconds of training")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--lr-new", type=float, default=2e-3)
    ap.add_argument("--lr-conv", type=float, default=None, help="default: --lr-new")
    ap.add_argument("--lr-body", type=float, default=2e-4)
    ap.add_argument("--selector-weight", type=float, default=1.0)
    ap.add_argument("--zero-projection", action=argparse.BooleanOptionalAction, default=True,
                    help="start the selector's hidden_projection at 0 (default on)")
    ap.add_argument("--seed", type=int, default=0)
    # 1: on a busy 2-core machine two OpenMP threads per process ran a step ~7x slower
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        lines.append(line)

    t_all = time.time()
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    if args.data:
        data = torch.load(args.data, weights_only=False)
    else:
        data = make_data(target, TT.load_tokenizer(args.target), work, seed=args.seed, log=log)
        torch.save(data, work / "data.pt")
    n_held = min(args.heldout, len(data["sequences"]) // 4)
    held = {k: (v[:n_held] if isinstance(v, list) else v) for k, v in data.items()}
    train = {k: (v[n_held:] if isinstance(v, list) else v) for k, v in data.items()}
    d1 = DFlashDraft.from_pretrained(args.init, dtype=torch.float32)
    draft = D2.dflash2_from_dflash1(d1, conv_kernel_size=args.conv_kernel_size,
                                    conv_group_size=args.conv_group_size,
                                    selector_rank=args.selector_rank,
                                    selector_top_k=args.selector_top_k, seed=args.seed)
    draft = draft.float()
    if args.zero_projection:
        # the walk starts as the draft's own argmax (score = unary): training starts from no
        # harm; the codebooks stay random so the projection still gets a gradient
        with torch.no_grad():
            draft.candidate_selector.hidden_projection.weight.zero_()
    log(f"init: {args.init} -> DFlash 2 ({sum(p.numel() for p in draft.parameters()):,} params); "
        f"{len(train['sequences'])} train / {n_held} held-out sequences")
    before = evaluate_losses(target, draft, held)
    log(f"held-out before: {before}")
    info = train_dflash2(target, draft, train, steps=args.steps, batch=args.batch,
                         anchors=args.anchors, lr_new=args.lr_new, lr_body=args.lr_body,
                         lr_conv=args.lr_conv,
                         selector_weight=args.selector_weight, seed=args.seed,
                         time_budget=args.time_budget, log=log)
    save_draft(draft, out)
    saved = DFlashDraft.from_pretrained(out, dtype=torch.float32)
    after = evaluate_losses(target, saved, held)
    log(f"held-out after (saved bf16 weights): {after}")
    metrics = {"args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.processor() or platform.machine(), "threads": args.threads,
               "data": {"sequences": len(data["sequences"]), "heldout": n_held,
                        "response_tokens": int(sum(len(s) - p for s, p in
                                                   zip(data["sequences"], data["prompt_lens"]))),
                        **{k: v for k, v in data.get("meta", {}).items()}},
               "heldout_before": before, "heldout_after": after,
               "training": info, "total_s": round(time.time() - t_all, 1)}
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "training_log.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
