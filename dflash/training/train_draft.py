"""Training a DFlash draft for a Hugging Face causal LM (Qwen3, Llama): the published recipe.

See ``shared/reference/training-recipe.md``. In short:

* data: prompts continued greedily by the target itself (``gen-data``), the response tokens
  carry the loss mask;
* a step: target features of every position (selected layers' outputs, concatenated, no
  shift); random anchors ``a`` with ``loss_mask[a] and loss_mask[a+1]``; for each anchor a
  block ``[input_ids[a], MASK x (b-1)]`` at positions ``a .. a+b-1``; the block attends to
  context positions strictly before ``a`` and bidirectionally to its own block only; slot
  ``k`` predicts ``input_ids[a+k]`` (same position, slot 0 untrained) with weight
  ``exp(-(k-1)/gamma)``;
* only the draft layers, ``fc``, ``hidden_norm`` and ``norm`` train; the target's embedding
  and LM head are shared and frozen; AdamW, warm-up + cosine, gradient clipping 1.0, bf16
  autocast on CUDA with fp32 master weights.

Commands (each has --help)::

    python -m dflash.train gen-data    --target T --prompts p.jsonl --out data.pt
    python -m dflash.train train-draft --target T --data data.pt --out my-draft
    python -m dflash.train eval        --target T --draft my-draft --data heldout.pt \\
                                       [--decode builtin-code humaneval]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.draft import DFlashDraft, DraftConfig, default_target_layer_ids

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """Loss-decay constant of the recipe: 7 for b16, 5 for b10, 4 for b8 (else ~0.45 b)."""
    return GAMMA_BY_BLOCK.get(block_size, max(1.0, 0.45 * block_size))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- target side
def _decoder_layers(target):
    inner = target.model if hasattr(target, "model") else target.base_model
    return inner, inner.layers


@contextmanager
def capture_layers(target, layer_ids: list[int]):
    """Record the raw output of the listed decoder layers (what the decoding engine uses).

    HF's ``output_hidden_states`` returns the *normed* state for the last layer, so hooks
    are used instead: features are exactly ``h`` after layer ``l``, as at inference.
    """
    _, layers = _decoder_layers(target)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for lid in sorted(set(layer_ids)):
        def hook(_mod, _inp, out, lid=lid):
            store[lid] = out[0] if isinstance(out, tuple) else out
        handles.append(layers[lid].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
    """Concatenated outputs of ``layer_ids`` for every position: [B, S, n_f*H] (no shift)."""
    inner, _ = _decoder_layers(target)
    with capture_layers(target, layer_ids) as store:
        inner(input_ids=input_ids, use_cache=False)
    return torch.cat([store[l] for l in layer_ids], dim=-1)


def target_text_config(target):
    cfg = target.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def make_draft_config(target, *, num_layers: int = 4, block_size: int = 16,
                      mask_token_id: int, target_layer_ids: list[int] | None = None,
                      intermediate_size: int | None = None) -> DraftConfig:
    """A draft config matching ``target`` (same width, heads, vocabulary and RoPE)."""
    cfg = target_text_config(target)
    n_target = cfg.num_hidden_layers
    ids = list(target_layer_ids) if target_layer_ids else default_target_layer_ids(n_target, num_layers)
    if any(not 0 <= i < n_target for i in ids):
        raise ValueError(f"target layer ids {ids} outside the target's {n_target} layers")
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = getattr(cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    scaling = getattr(cfg, "rope_scaling", None)
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = dict(rope)
    heads = cfg.num_attention_heads
    rows = target.get_input_embeddings().weight.shape[0]
    if not 0 <= mask_token_id < rows:
        raise ValueError(f"mask token id {mask_token_id} outside the embedding table ({rows} rows)")
    return DraftConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate_size or cfg.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size, block_size=block_size, num_target_layers=n_target,
        mask_token_id=int(mask_token_id), target_layer_ids=[int(i) for i in ids],
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_scaling=scaling, attention_bias=bool(getattr(cfg, "attention_bias", False)),
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 40960)),
        dtype="float32")


def resolve_mask_token_id(tokenizer, target, explicit: int | None = None) -> int:
    """The explicit id, else the tokenizer's mask token, else the first row past the tokenizer."""
    if explicit is not None:
        return int(explicit)
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    rows = target.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) < rows:
        return len(tokenizer)
    raise ValueError("no mask token: pass --mask-token-id (an id inside the embedding table)")


def init_draft_weights(draft: DFlashDraft, std: float = 0.02, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


# ----------------------------------------------------------------------------- recipe core
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


# ----------------------------------------------------------------------------- data
def read_prompt_file(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def encode_prompt(tokenizer, row: dict, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt row: {"ids": [...]}, {"text": raw} or {"turns": [...]}/{"prompt"}."""
    if "ids" in row:
        return [int(i) for i in row["ids"]]
    if "text" in row:
        return tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    turns = row.get("turns") or [row["prompt"]]
    if chat_template and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(turns)]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(turns), add_special_tokens=True)["input_ids"]


@torch.no_grad()
def greedy_continue(target, prompts: list[list[int]], max_new_tokens: int, *,
                    stop_ids=(), pad_id: int = 0, batch_size: int = 256,
                    log=print) -> list[list[int]]:
    """Greedy continuations of many prompts, batched with left padding and a KV cache.

    Each continuation ends at its first stop token (kept) or after ``max_new_tokens``.
    """
    from transformers import DynamicCache

    dev = target.get_input_embeddings().weight.device
    stops = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], device=dev)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    t0 = time.time()
    done_n = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        n, width = len(idx), max(len(prompts[i]) for i in idx)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        res = target(input_ids=ids, attention_mask=attn, position_ids=pos,
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
        if not bool(torch.isfinite(res.logits).all()):
            # a fully padded attention row gave NaN on this backend: no padding instead
            log("gen-data: non-finite logits with left padding; regrouping by prompt length")
            by_len: dict[int, list[int]] = {}
            for i in idx:
                by_len.setdefault(len(prompts[i]), []).append(i)
            for group in by_len.values():
                sub = greedy_continue(target, [prompts[i] for i in group], max_new_tokens,
                                      stop_ids=stop_ids, pad_id=pad_id, batch_size=batch_size,
                                      log=lambda *_: None)
                for i, o in zip(group, sub):
                    out[i] = o
            done_n += n
            continue
        nxt = res.logits[:, -1].argmax(-1)
        gen = torch.empty((n, max_new_tokens), dtype=torch.long, device=dev)
        finished = torch.zeros(n, dtype=torch.bool, device=dev)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=dev)
        last_pos = pos[:, -1:]
        for t in range(max_new_tokens):
            gen[:, t] = nxt
            hit = torch.isin(nxt, stops) & ~finished
            lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
            finished |= hit
            if t + 1 == max_new_tokens or (t % 16 == 15 and bool(finished.all())):
                break
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            res = target(input_ids=nxt[:, None], attention_mask=attn, position_ids=last_pos,
                         past_key_values=res.past_key_values, use_cache=True)
            nxt = res.logits[:, -1].argmax(-1)
        gen, lengths = gen.cpu(), lengths.cpu()
        for r, i in enumerate(idx):
            out[i] = gen[r, :int(lengths[r])].tolist()
        done_n += n
        el = time.time() - t0
        log(f"gen-data: {done_n}/{len(prompts)} prompts, {el:.0f} s, "
            f"ETA {el / done_n * (len(prompts) - done_n):.0f} s")
    return out  # type: ignore[return-value]


def generate_data(target, tokenizer, rows: list[dict], max_new_tokens: int, *, batch_size=256,
                  chat_template=True, max_prompt_len: int | None = None, log=print) -> dict:
    """The draft's training data: prompts and the target's greedy continuations."""
    prompts = [encode_prompt(tokenizer, r, chat_template) for r in rows]
    if max_prompt_len:
        prompts = [p[-max_prompt_len:] for p in prompts]
    keep = [i for i, p in enumerate(prompts) if len(p) > 0]
    prompts = [prompts[i] for i in keep]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    conts = greedy_continue(target, prompts, max_new_tokens, stop_ids=stop, pad_id=pad,
                            batch_size=batch_size, log=log)
    return {"sequences": [p + c for p, c in zip(prompts, conts)],
            "prompt_lens": [len(p) for p in prompts],
            "kinds": [rows[i].get("kind", "") for i in keep],
            "meta": {"max_new_tokens": max_new_tokens, "chat_template": chat_template,
                     "num_prompts": len(prompts)}}


def collate(data: dict, idx: list[int], pad_id: int, max_len: int | None = None,
            pad_multiple: int = 1):
    """Right-padded [B, S] input_ids and loss_mask (1 on continuation tokens); S is rounded
    up to ``pad_multiple`` (fewer distinct shapes for the GPU kernels)."""
    seqs = [data["sequences"][i] for i in idx]
    plens = [data["prompt_lens"][i] for i in idx]
    if max_len:
        cut = [max(0, len(s) - max_len) for s in seqs]
        seqs = [s[c:] for s, c in zip(seqs, cut)]
        plens = [max(0, p - c) for p, c in zip(plens, cut)]
    width = max(len(s) for s in seqs)
    width = -(-width // pad_multiple) * pad_multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lm = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, p) in enumerate(zip(seqs, plens)):
        ids[r, :len(s)] = torch.tensor(s)
        lm[r, p:len(s)] = True
    return ids, lm


# ----------------------------------------------------------------------------- training
def train_draft(target, data: dict, out_dir: Path, *, mask_token_id: int, block_size=16,
                num_layers=4, target_layer_ids=None, intermediate_size=None, steps=5000,
                batch=16, anchors=32, lr=6e-4, warmup_frac=0.04, weight_decay=0.0,
                gamma=None, grad_clip=1.0, seed=0, time_budget=None, save_every=1000,
                resume=False, max_len=None, log_every=50, device="auto", stop_after=None,
                log=print) -> dict:
    """Train a draft on ``data`` (from ``generate_data``); save the z-lab format to out_dir."""
    from tqdm import tqdm

    from .train_target import Schedule, lr_schedule

    dev = pick_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gamma = gamma or default_gamma(block_size)
    target = target.to(dev).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    cfg = make_draft_config(target, num_layers=num_layers, block_size=block_size,
                            mask_token_id=mask_token_id, target_layer_ids=target_layer_ids,
                            intermediate_size=intermediate_size)
    draft = DFlashDraft(cfg)
    init_draft_weights(draft, seed=seed)
    draft = draft.to(dev).train()
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.95),
                            weight_decay=weight_decay)
    step, elapsed_before = 0, 0.0
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        log(f"draft: resumed from {ckpt} at step {step}")
    sched = Schedule(steps, time_budget, elapsed=elapsed_before)
    n_params = sum(p.numel() for p in draft.parameters())
    n_seq = len(data["sequences"])
    pad = mask_token_id
    amp = dev.type == "cuda"
    log(f"draft: {n_params / 1e6:.2f}M trainable params, {num_layers} layers, block "
        f"{block_size}, gamma {gamma}, features of target layers {cfg.target_layer_ids}, "
        f"{n_seq} sequences; up to {steps} steps"
        + (f" within {time_budget:.0f} s" if time_budget else "")
        + f" x {batch} seqs x {anchors} anchors, lr {lr}, device {dev}")
    history = []
    t0 = time.time()
    start_step = step
    bar = tqdm(total=steps, initial=step, desc="draft", mininterval=5.0, file=sys.stdout)
    ema = None
    trained_tokens = 0.0

    def save(final=False):
        draft_out = copy.deepcopy(draft).eval()
        if final:
            draft_out = draft_out.to(torch.bfloat16)
        draft_out.save_pretrained(out_dir)
        if not final:
            torch.save({"draft": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed_s": sched.elapsed(), "config": cfg.to_dict()}, ckpt)

    while (prog := sched.progress(step)) < 1.0:
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, n_seq, size=batch).tolist()
        ids, lm = collate(data, idx, pad, max_len, pad_multiple=64)
        ids, lm = ids.to(dev), lm.to(dev)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = lr_schedule(prog, lr, warmup_frac)
        loss, st = recipe_loss(target, draft, ids, lm, num_anchors=anchors, gamma=gamma,
                               generator=gen, amp=amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(draft.parameters(), grad_clip)
        opt.step()
        step += 1
        trained_tokens += st["blocks"] * (block_size - 1)
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % log_every == 0:
            el = time.time() - t0
            history.append({"step": step, "loss": round(lv, 4), "loss_ema": round(ema, 4),
                            "acc_w": round(st["acc_w"], 4), "grad_norm": round(float(gnorm), 3),
                            "lr": opt.param_groups[0]["lr"], "elapsed_s": round(el, 1)})
            bar.total = sched.projected_steps(step)
            bar.set_postfix(loss=f"{ema:.3f}", acc=f"{st['acc_w']:.3f}",
                            tok_s=f"{trained_tokens / el:,.0f}")
        bar.update(1)
        if save_every and step % save_every == 0:
            save()
        if stop_after is not None and step - start_step >= stop_after and sched.progress(step) < 1:
            save()
            bar.close()
            log(f"draft: stopped after {stop_after} steps at step {step}; continue with --resume")
            return {"steps": step, "stopped": True}
    bar.close()
    seconds = time.time() - t0
    save(final=True)
    if ckpt.exists():
        ckpt.unlink()
    info = {"params": n_params, "steps": step, "batch": batch, "anchors": anchors,
            "block_size": block_size, "gamma": gamma, "lr": lr, "warmup_frac": warmup_frac,
            "weight_decay": weight_decay, "grad_clip": grad_clip, "seed": seed,
            "num_layers": num_layers, "target_layer_ids": cfg.target_layer_ids,
            "mask_token_id": mask_token_id, "seconds": round(seconds, 1),
            "final_loss_ema": round(ema, 4) if ema is not None else None,
            "device": str(dev), "history": history,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    log(f"draft: {step} steps in {seconds:.0f} s, loss (ema) {ema:.3f}; saved to {out_dir}")
    return info


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def simulated_tau(target, draft: DFlashDraft, data: dict, block_sizes=range(2, 17), *,
                  batch=8, anchors_per_chunk=64, max_sequences=None, max_len=None) -> dict:
    """Held-out simulated acceptance: for every response position a with a full block, the
    draft proposes a block; tau = 1 + number of leading argmax matches with the target's own
    greedy continuation. Returns {b: mean tau} plus per-slot accuracy at the largest b."""
    dev = draft.device
    cfg = draft.config
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    n = len(data["sequences"]) if max_sequences is None else min(max_sequences, len(data["sequences"]))
    sums = {b: [0.0, 0] for b in block_sizes}
    b_max = max(block_sizes)
    slot_hits = torch.zeros(b_max, dtype=torch.float64)
    slot_count = 0
    for s0 in range(0, n, batch):
        ids, lm = collate(data, list(range(s0, min(n, s0 + batch))), cfg.mask_token_id, max_len)
        ids, lm = ids.to(dev), lm.to(dev)
        feats = target_features(target, ids, cfg.target_layer_ids).to(draft.dtype)
        pos_all = torch.arange(lm.shape[1], device=dev)
        seq_end = (torch.where(lm, pos_all[None], torch.full_like(lm, -1, dtype=torch.long))
                   .max(1).values + 1)  # responses run to the end of each sequence
        for b in block_sizes:
            pos = torch.arange(lm.shape[1], device=dev)
            ok = lm & (pos[None] + b - 1 < seq_end[:, None])
            counts = ok.sum(1)
            order = torch.where(ok, pos[None].expand_as(ok), pos[None] + lm.shape[1]).argsort(1)
            for c0 in range(0, int(counts.max()) if counts.numel() else 0, anchors_per_chunk):
                sel = order[:, c0:c0 + anchors_per_chunk]
                keep = (torch.arange(c0, c0 + sel.shape[1], device=dev)[None] < counts[:, None])
                anchors = torch.where(keep, sel, torch.zeros_like(sel))
                bb = build_block_batch(ids, lm, anchors, keep, b, cfg.mask_token_id, 1.0)
                h = draft_hidden(draft, embed, feats, bb)
                pred = lm_head(h.to(lm_head.weight.dtype)).argmax(-1)
                pred = pred.reshape(len(sel), -1, b)[:, :, 1:]
                lab = bb.labels.reshape(len(sel), -1, b)[:, :, 1:]
                match = (pred == lab)
                tau = 1 + match.long().cumprod(-1).sum(-1)
                sums[b][0] += float(tau[keep].sum())
                sums[b][1] += int(keep.sum())
                if b == b_max:
                    slot_hits[1:] += match[keep].double().sum(0).cpu()
                    slot_count += int(keep.sum())
    out = {"tau": {b: round(v[0] / max(1, v[1]), 4) for b, v in sums.items()},
           "blocks": {b: v[1] for b, v in sums.items()},
           f"slot_accuracy_b{b_max}": [round(float(x), 4) for x in (slot_hits / max(1, slot_count))[1:]]}
    return out


def continuation_stats(outputs: list[list[int]], n: int = 4, tail: int = 64, max_period: int = 32) -> dict:
    """Non-degeneracy of continuations: distinct-n ratio (unique n-grams / n-grams, pooled over
    continuations and averaged per continuation) and the share of continuations whose last
    ``tail`` tokens are not one short cycle (a period <= ``max_period`` repeated)."""
    per, loops = [], 0
    for out in outputs:
        grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
        if grams:
            per.append(len(set(grams)) / len(grams))
        t = out[-tail:]
        if len(t) == tail and any(all(t[i] == t[i - p] for i in range(p, tail))
                                  for p in range(1, max_period + 1)):
            loops += 1
    return {f"distinct_{n}_mean": round(sum(per) / max(1, len(per)), 4),
            "loop_free_share": round(1 - loops / max(1, len(outputs)), 4),
            "continuations": len(outputs)}


def decode_check(target, draft, tokenizer, prompt_sets: list[str], *, n_prompts=8,
                 max_new_tokens=128, block_size=16, engine="static", log=print) -> dict:
    """Real decoding loop (SpeculativeDecoder, greedy) vs plain greedy: tau and losslessness."""
    from ..datasets import load_prompts
    from ..decoding.loop import SpeculativeDecoder

    dev = target.get_input_embeddings().weight.device
    spec = SpeculativeDecoder(target, draft, engine=engine)
    plain = SpeculativeDecoder(target, None, engine=engine)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = {}
    for name in prompt_sets:
        rows, source = load_prompts(name, n_prompts)
        taus, cycles, lossless, outputs, t_spec, t_plain = [], 0, True, [], 0.0, 0.0
        per_prompt = []
        for row in rows:
            ids = torch.tensor(encode_prompt(tokenizer, {"turns": row["turns"][:1]}), device=dev)
            r1 = spec.generate(ids, max_new_tokens=max_new_tokens, block_size=block_size,
                               stop_token_ids=stops)
            r0 = plain.generate(ids, max_new_tokens=max_new_tokens, block_size=1,
                                stop_token_ids=stops)
            lossless &= r1.output_ids == r0.output_ids
            taus += [c.tau for c in r1.cycles]
            per_prompt.append(r1.mean_tau)
            cycles += len(r1.cycles)
            outputs.append(r0.output_ids)
            t_spec += r1.total_s
            t_plain += r0.total_s
        out[name] = {"prompts": len(rows), "source": source, "cycles": cycles,
                     "mean_tau": round(sum(taus) / max(1, len(taus)), 3),
                     "mean_tau_per_prompt": round(sum(per_prompt) / max(1, len(per_prompt)), 3),
                     "tau_by_prompt": [round(t, 3) for t in per_prompt],
                     "lossless": bool(lossless), "spec_s": round(t_spec, 2),
                     "plain_s": round(t_plain, 2), **continuation_stats(outputs)}
        log(f"decode {name}: mean tau {out[name]['mean_tau']} over {cycles} cycles, "
            f"lossless {lossless}, distinct-4 {out[name]['distinct_4_mean']}, "
            f"loop-free {out[name]['loop_free_share']}")
    return out


def greedy_stats(target, tokenizer, prompt_sets: list[str], *, n_prompts=None,
                 max_new_tokens=128, batch_size=64, log=print) -> dict:
    """Non-degeneracy of the target's greedy continuations on prompt sets (batched)."""
    from ..datasets import load_prompts

    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for name in prompt_sets:
        rows, _ = load_prompts(name, n_prompts)
        prompts = [encode_prompt(tokenizer, {"turns": r["turns"][:1]}) for r in rows]
        conts = greedy_continue(target, prompts, max_new_tokens, stop_ids=stops, pad_id=pad,
                                batch_size=batch_size, log=lambda *_: None)
        out[name] = continuation_stats(conts)
        out[name]["ended_with_eos"] = sum(1 for c in conts if c and c[-1] in stops)
        out[name]["mean_length"] = round(sum(map(len, conts)) / max(1, len(conts)), 1)
        out[name]["examples"] = [tokenizer.decode(c) for c in conts[:2]]
        log(f"greedy {name}: {out[name]['continuations']} prompts, distinct-4 "
            f"{out[name]['distinct_4_mean']}, loop-free {out[name]['loop_free_share']}")
    return out


# ----------------------------------------------------------------------------- CLI
def _load_target(path: str, device: torch.device, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model.hub import resolve_model_dir

    folder = resolve_model_dir(path, what="target")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    return model, tok


def _layer_ids(text: str | None):
    return [int(x) for x in text.split(",")] if text else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dflash.train",
                                 description="Train a DFlash draft for a HF causal LM "
                                             "(Qwen3/Llama) with the published recipe.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("gen-data", help="continue prompts greedily with the target")
    g.add_argument("--target", required=True, help="target folder or hub id ('embedded' works)")
    g.add_argument("--prompts", required=True, nargs="+",
                   help="JSONL files; rows {'turns': [...]} (chat template applied), "
                        "{'text': raw text} or {'ids': [...]}")
    g.add_argument("--out", required=True, help="output .pt file")
    g.add_argument("--max-new-tokens", type=int, default=192)
    g.add_argument("--max-prompt-len", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--no-chat-template", action="store_true")
    g.add_argument("--device", default="auto")

    t = sub.add_parser("train-draft", help="train a draft on generated data")
    t.add_argument("--target", required=True)
    t.add_argument("--data", required=True, help=".pt file from gen-data")
    t.add_argument("--out", required=True, help="draft folder (z-lab format)")
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--num-layers", type=int, default=4)
    t.add_argument("--target-layer-ids", default=None, help="comma list, e.g. 1,2,3,4")
    t.add_argument("--intermediate-size", type=int, default=None)
    t.add_argument("--mask-token-id", type=int, default=None,
                   help="default: tokenizer's mask token, else first id past the tokenizer")
    t.add_argument("--steps", type=int, default=5000)
    t.add_argument("--batch", type=int, default=16, help="sequences per step")
    t.add_argument("--anchors", type=int, default=32, help="random anchors per sequence")
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--warmup-frac", type=float, default=0.04)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--gamma", type=float, default=None, help="default 7 (b16), 5 (b10), 4 (b8)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--max-len", type=int, default=None, help="keep the last N tokens of a sequence")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds: shorten the schedule (measured after 20 steps) to fit")
    t.add_argument("--save-every", type=int, default=1000, help="checkpoint period (steps)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this run")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--heldout", default=None, help="gen-data .pt for a simulated-tau sweep at the end")

    e = sub.add_parser("eval", help="simulated tau sweep and/or the real decoding loop")
    e.add_argument("--target", required=True)
    e.add_argument("--draft", required=True)
    e.add_argument("--data", default=None, help="held-out gen-data .pt for simulated tau")
    e.add_argument("--block-sizes", default="2-16", help="range a-b or comma list")
    e.add_argument("--decode", nargs="*", default=[],
                   help="prompt sets for the real decoding loop (builtin-code, humaneval, ...)")
    e.add_argument("--n-prompts", type=int, default=8)
    e.add_argument("--greedy-stats", nargs="*", default=[],
                   help="prompt sets for the non-degeneracy stats of the target's greedy "
                        "continuations (all prompts of each set, batched)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    if args.cmd == "gen-data":
        target, tok = _load_target(args.target, dev)
        rows = [r for f in args.prompts for r in read_prompt_file(Path(f))]
        data = generate_data(target, tok, rows, args.max_new_tokens, batch_size=args.batch_size,
                             chat_template=not args.no_chat_template,
                             max_prompt_len=args.max_prompt_len)
        torch.save(data, args.out)
        print(f"gen-data: {len(data['sequences'])} sequences -> {args.out}")
    elif args.cmd == "train-draft":
        target, tok = _load_target(args.target, dev)
        data = torch.load(args.data, weights_only=False)
        mask_id = resolve_mask_token_id(tok, target, args.mask_token_id)
        info = train_draft(target, data, Path(args.out), mask_token_id=mask_id,
                           block_size=args.block_size, num_layers=args.num_layers,
                           target_layer_ids=_layer_ids(args.target_layer_ids),
                           intermediate_size=args.intermediate_size, steps=args.steps,
                           batch=args.batch, anchors=args.anchors, lr=args.lr,
                           warmup_frac=args.warmup_frac, weight_decay=args.weight_decay,
                           gamma=args.gamma, grad_clip=args.grad_clip, seed=args.seed,
                           time_budget=args.time_budget, save_every=args.save_every,
                           resume=args.resume, max_len=args.max_len, device=args.device,
                           stop_after=args.stop_after)
        if info.get("stopped"):
            return 0
        if args.heldout:
            draft = DFlashDraft.from_pretrained(args.out, dtype=torch.float32, device=dev)
            info["simulated"] = simulated_tau(target, draft, torch.load(args.heldout, weights_only=False))
            print("simulated tau:", info["simulated"]["tau"])
        (Path(args.out) / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    elif args.cmd == "eval":
        target, tok = _load_target(args.target, dev)
        from ..model.hub import resolve_model_dir
        draft = DFlashDraft.from_pretrained(resolve_model_dir(args.draft, what="draft"),
                                                 dtype=torch.float32, device=dev)
        res = {}
        if args.data:
            if "-" in args.block_sizes:
                lo, hi = (int(x) for x in args.block_sizes.split("-"))
                sizes = list(range(lo, hi + 1))
            else:
                sizes = [int(x) for x in args.block_sizes.split(",")]
            res["simulated"] = simulated_tau(target, draft, torch.load(args.data, weights_only=False),
                                             sizes)
            print("simulated tau:", res["simulated"]["tau"])
        if args.decode:
            res["decode"] = decode_check(target, draft, tok, args.decode, n_prompts=args.n_prompts,
                                         max_new_tokens=args.max_new_tokens,
                                         block_size=draft.block_size)
        if args.greedy_stats:
            res["greedy_stats"] = greedy_stats(target, tok, args.greedy_stats,
                                               max_new_tokens=args.max_new_tokens)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        else:
            print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
