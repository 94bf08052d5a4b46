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
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import parse_int_list
from ..model.draft import DFlashDraft, DraftConfig, default_target_layer_ids
from .data import collate, generate_data, read_prompt_file
from .evaluate import decode_check, greedy_stats, simulated_tau
from .recipe import default_gamma, recipe_loss
from ..engine.device import pick_device


# ----------------------------------------------------------------------------- draft setup
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


# ----------------------------------------------------------------------------- CLI
def _load_target(path: str, device: torch.device, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model.hub import resolve_model_dir

    folder = resolve_model_dir(path, what="target")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    return model, tok


def _layer_ids(text: str | None):
    return parse_int_list(text, "--target-layer-ids", minimum=0, duplicates="refuse",
                          example="1,9,17") if text else None


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
