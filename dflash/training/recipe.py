"""The recipe's core: random anchors, block batches, decayed loss weights, the weighted loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.draft import DFlashDraft
from .features import target_features


GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """Loss-decay constant of the recipe: 7 for b16, 5 for b10, 4 for b8 (else ~0.45 b)."""
    return GAMMA_BY_BLOCK.get(block_size, max(1.0, 0.45 * block_size))


def valid_anchor_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: position a can start a block (loss_mask[a] and loss_mask[a+1])."""
    lm = loss_mask.bool()
    valid = torch.zeros_like(lm)
    valid[:, :-1] = lm[:, :-1] & lm[:, 1:]
    return valid


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` valid anchors per row, random without replacement, sorted.

    Returns (anchors [B, N] long, keep [B, N] bool); rows with fewer valid anchors are
    padded with anchor 0 and keep False.
    """
    valid = valid_anchor_mask(loss_mask)
    b, s = valid.shape
    n = min(num_anchors, s)
    scores = torch.rand((b, s), generator=generator, device="cpu").to(valid.device)
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    vals, idx = scores.topk(n, dim=1)
    keep = vals >= 0
    order = torch.where(keep, idx, idx + s).argsort(dim=1)
    idx, keep = idx.gather(1, order), keep.gather(1, order)
    return torch.where(keep, idx, torch.zeros_like(idx)), keep


@dataclass
class BlockBatch:
    noise_ids: torch.Tensor       # [B, N*b]   anchor token then mask tokens
    position_ids: torch.Tensor    # [B, S+N*b] context 0..S-1, then anchor+k
    attention_mask: torch.Tensor  # [B, 1, N*b, S+N*b] bool, True = visible
    labels: torch.Tensor          # [B, N*b]   input_ids[anchor+k] (clamped where out of range)
    weights: torch.Tensor         # [B, N*b]   loss weight (0 for slot 0, pads, beyond the end)
    anchors: torch.Tensor         # [B, N]
    keep: torch.Tensor            # [B, N]


def loss_weights(block_size: int, gamma: float, device=None) -> torch.Tensor:
    """Per-slot weights: 0 for slot 0, exp(-(k-1)/gamma) for k >= 1."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def build_block_batch(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                      keep: torch.Tensor, block_size: int, mask_token_id: int,
                      gamma: float) -> BlockBatch:
    """Everything one draft training forward needs for blocks starting at ``anchors``."""
    bsz, s = input_ids.shape
    n = anchors.shape[1]
    b = block_size
    dev = input_ids.device
    k = torch.arange(b, device=dev)
    pos = anchors[:, :, None] + k                                   # [B, N, b]
    in_range = pos < s
    pos_c = pos.clamp(max=s - 1)
    labels = input_ids.gather(1, pos_c.reshape(bsz, -1)).reshape(bsz, n, b)
    lmask = loss_mask.bool().gather(1, pos_c.reshape(bsz, -1)).reshape(bsz, n, b)
    w = loss_weights(b, gamma, dev)[None, None, :] * (keep[:, :, None] & in_range & lmask).float()

    noise = torch.full((bsz, n, b), mask_token_id, dtype=input_ids.dtype, device=dev)
    noise[:, :, 0] = input_ids.gather(1, anchors)

    ctx_pos = torch.arange(s, device=dev)
    ctx_vis = (ctx_pos[None, None, :] < anchors[:, :, None]) & keep[:, :, None]  # [B, N, S]
    ctx_vis = ctx_vis[:, :, None, :].expand(bsz, n, b, s).reshape(bsz, n * b, s)
    blk = torch.arange(n, device=dev).repeat_interleave(b)
    blk_vis = (blk[:, None] == blk[None, :])[None].expand(bsz, -1, -1)  # own block only
    mask = torch.cat([ctx_vis, blk_vis], dim=-1)[:, None]

    position_ids = torch.cat([ctx_pos[None].expand(bsz, -1), pos.reshape(bsz, -1)], dim=1)
    return BlockBatch(noise.reshape(bsz, -1), position_ids, mask, labels.reshape(bsz, -1),
                      w.reshape(bsz, -1), anchors, keep)


def draft_hidden(draft: DFlashDraft, embed, features: torch.Tensor, batch: BlockBatch):
    noise = embed(batch.noise_ids)
    return draft(noise, features.to(noise.dtype), batch.position_ids, batch.attention_mask)


def weighted_ce(hidden: torch.Tensor, lm_head, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int = 4096):
    """(sum of w * CE, sum of w, number of weighted argmax hits) over chunks of positions."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y, w = labels.reshape(-1), weights.reshape(-1)
    sel = (w > 0).nonzero().squeeze(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    hits = 0.0
    for i in range(0, sel.numel(), chunk):
        j = sel[i:i + chunk]
        logits = lm_head(h[j]).float()
        ce = F.cross_entropy(logits, y[j], reduction="none")
        total = total + (ce * w[j]).sum()
        hits += float(((logits.argmax(-1) == y[j]).float() * w[j]).sum())
    return total, w.sum(), hits


def recipe_loss(target, draft, input_ids, loss_mask, *, num_anchors: int, gamma: float,
                generator: torch.Generator | None = None, amp: bool = False):
    """One training forward of the recipe; returns (loss, stats dict)."""
    cfg = draft.config
    feats = target_features(target, input_ids, cfg.target_layer_ids)
    anchors, keep = sample_anchors(loss_mask, num_anchors, generator)
    batch = build_block_batch(input_ids, loss_mask, anchors, keep, cfg.block_size,
                              cfg.mask_token_id, gamma)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=amp):
        h = draft_hidden(draft, embed, feats, batch)
        total, wsum, hits = weighted_ce(h, lm_head, batch.labels, batch.weights)
    wsum = wsum.clamp(min=1e-6)
    return total / wsum, {"weight": float(wsum), "acc_w": hits / float(wsum),
                          "blocks": int(keep.sum())}
