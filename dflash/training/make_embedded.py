"""Build the embedded tiny pair end to end: corpus -> tokenizer -> target -> data -> draft -> eval.

    python -m dflash.training.make_embedded --out OUT [--work /tmp/work] [options]

writes ``OUT/tiny-target/`` (Qwen3, bf16 safetensors, tokenizer with chat template),
``OUT/tiny-draft/`` (DFlash draft, z-lab format, bf16) and ``OUT/metrics.json``. The
defaults are the settings used for the committed ``models/tiny-*`` (one GPU, minutes);
``scripts/train_embedded.sh`` is the exact GPU invocation. ``--smoke`` shrinks everything
for a CPU check of the whole pipeline in a minute or two.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch

from . import evaluate as E
from . import train_draft as T
from .data import generate_data
from . import train_target as TT
from .synth_text import synth_examples


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def code_prompts(docs: list[str], n: int, seed: int) -> list[dict]:
    """Prompts cut from Python files at line ends, like a code benchmark's prompts.

    Most (75%) start at a ``def``/``class`` line; when a docstring follows, the prompt
    usually (85%) ends right after it (the HumanEval shape); otherwise 1-24 lines are taken.
    """
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        lines = rng.choice(docs).split("\n")
        if len(lines) < 4:
            continue
        starts = [i for i, l in enumerate(lines) if l.lstrip().startswith(("def ", "class "))]
        if starts and rng.random() < 0.75:
            i = rng.choice(starts)
            if rng.random() < 0.3:  # include a few lines before (imports, decorators)
                i = max(0, i - rng.randint(1, 6))
            end = None
            for j in range(i + 1, min(len(lines), i + 30)):
                if '"""' in lines[j] or "'''" in lines[j]:
                    q = '"""' if '"""' in lines[j] else "'''"
                    if lines[j].count(q) >= 2:
                        end = j + 1
                        break
                    for k in range(j + 1, min(len(lines), j + 40)):
                        if q in lines[k]:
                            end = k + 1
                            break
                    break
            if end is None or rng.random() < 0.15:
                end = i + rng.randint(1, 24)
        else:
            i = rng.randrange(len(lines))
            end = i + rng.randint(1, 24)
        text = "\n".join(lines[i:end]).rstrip("\n")
        if len(text.strip()) < 8:
            continue
        out.append({"turns": [text + "\n"], "kind": "code"})
    return out


def synth_prompts(n: int, seed: int) -> list[dict]:
    return [{"turns": [q], "kind": "chat"} for q, _ in synth_examples(n // 2, n - n // 2, seed)]


def file_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dflash.training.make_embedded", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where tiny-target/, tiny-draft/, metrics.json go")
    ap.add_argument("--work", default=None, help="scratch folder (corpus, data); default OUT/work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU check of the pipeline")
    # corpus / tokenizer
    ap.add_argument("--python-mb", type=float, default=40.0)
    ap.add_argument("--n-math", type=int, default=20000)
    ap.add_argument("--n-chat", type=int, default=15000)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer-sample-mb", type=float, default=12.0)
    # target
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--target-steps", type=int, default=4000)
    ap.add_argument("--target-batch", type=int, default=32)
    ap.add_argument("--target-seq-len", type=int, default=512)
    ap.add_argument("--target-lr", type=float, default=2e-3)
    ap.add_argument("--target-budget", type=float, default=100.0,
                    help="seconds (0: no time limit, --target-steps only)")
    ap.add_argument("--target-from", default=None,
                    help="reuse this trained target folder (skip tokenizer and target training)")
    # draft data
    ap.add_argument("--n-code-prompts", type=int, default=20480)
    ap.add_argument("--n-chat-prompts", type=int, default=4096)
    ap.add_argument("--n-heldout-code", type=int, default=256)
    ap.add_argument("--n-heldout-chat", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=192)
    ap.add_argument("--max-prompt-len", type=int, default=320)
    ap.add_argument("--gen-batch", type=int, default=1024)
    # draft
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--draft-layer-ids", default="1,2,3,4")
    ap.add_argument("--draft-intermediate", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--draft-steps", type=int, default=20000)
    ap.add_argument("--draft-batch", type=int, default=32)
    ap.add_argument("--draft-anchors", type=int, default=48)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--draft-budget", type=float, default=300.0, help="seconds")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: the draft's budget shrinks to leave "
                         "--eval-reserve seconds for evaluation")
    ap.add_argument("--eval-reserve", type=float, default=75.0)
    ap.add_argument("--pack", default=None,
                    help="also write tiny-target.tar.gz / tiny-draft.tar.gz / metrics.json / "
                         "draft_heldout.pt here as soon as each exists")
    # evaluation
    ap.add_argument("--decode-sets", nargs="*",
                    default=["builtin-code", "humaneval", "builtin-math", "builtin-chat"])
    ap.add_argument("--decode-prompts", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    if args.smoke:
        args.python_mb, args.n_math, args.n_chat = 1.5, 300, 300
        args.vocab_size, args.tokenizer_sample_mb = 1024, 1.0
        args.hidden, args.layers, args.intermediate = 64, 4, 128
        args.target_steps, args.target_batch, args.target_seq_len = 40, 8, 128
        args.n_code_prompts, args.n_chat_prompts, args.n_heldout_code, args.n_heldout_chat = 48, 16, 8, 4
        args.gen_tokens, args.gen_batch, args.max_prompt_len = 32, 32, 64
        args.draft_layers, args.draft_layer_ids, args.draft_intermediate = 2, "1,2", 128
        args.draft_steps, args.draft_batch, args.draft_anchors = 20, 4, 8
        args.decode_prompts, args.decode_tokens = 2, 32

    t_all = time.time()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dev = T.pick_device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    metrics: dict = {"args": vars(args), "python": platform.python_version(),
                     "torch": torch.__version__, "device": str(dev),
                     "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                     "stages_s": {}}
    import transformers
    metrics["transformers"] = transformers.__version__

    pack_dir = Path(args.pack) if args.pack else None
    if pack_dir:
        pack_dir.mkdir(parents=True, exist_ok=True)

    def stage(name, t0):
        metrics["stages_s"][name] = round(time.time() - t0, 1)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if pack_dir:
            shutil.copy(out / "metrics.json", pack_dir / "metrics.json")

    def pack(folder: Path):
        if pack_dir:
            with tarfile.open(pack_dir / f"{folder.name}.tar.gz", "w:gz") as tf:
                tf.add(folder, arcname=folder.name)
            log(f"packed {folder.name} -> {pack_dir}")

    # 1. corpus
    t0 = time.time()
    corpus = work / "corpus"
    metrics["corpus"] = TT.build_corpus(corpus, args.python_mb, args.n_math, args.n_chat,
                                        seed=args.seed, log=log)
    train_docs = TT.read_docs(corpus / "train.jsonl")
    held_docs = TT.read_docs(corpus / "heldout.jsonl")
    stage("corpus", t0)

    target_dir = out / "tiny-target"
    if args.target_from:
        # reuse an already trained target (and its tokenizer) unchanged
        t0 = time.time()
        if Path(args.target_from).resolve() != target_dir.resolve():
            shutil.rmtree(target_dir, ignore_errors=True)
            shutil.copytree(args.target_from, target_dir)
        metrics["target_training"] = {"reused_from": str(args.target_from)}
        log(f"target: reusing {args.target_from}")
        stage("target", t0)
    else:
        # 2. tokenizer
        t0 = time.time()
        tok = TT.train_tokenizer([d["text"] for d in train_docs], target_dir, args.vocab_size,
                                 args.tokenizer_sample_mb, args.seed, log=log)
        stream = TT.encode_docs(tok, [d["text"] for d in train_docs])
        metrics["train_tokens"] = int(len(stream))
        metrics["bytes_per_token"] = round(sum(len(d["text"]) for d in train_docs) / len(stream), 3)
        log(f"corpus: {len(stream) / 1e6:.2f}M train tokens ({metrics['bytes_per_token']} bytes/token)")
        stage("tokenizer", t0)

        # 3. target
        t0 = time.time()
        metrics["target_training"] = TT.train_target(
            stream, tok, target_dir, steps=args.target_steps, batch=args.target_batch,
            seq_len=args.target_seq_len, lr=args.target_lr, seed=args.seed, device=args.device,
            time_budget=args.target_budget or None, log=log,
            model_kwargs=dict(hidden=args.hidden, layers=args.layers, heads=args.heads,
                              kv_heads=args.kv_heads, intermediate=args.intermediate))
        stage("target", t0)
        pack(target_dir)
        del stream

    # reload exactly what was saved (bf16 weights), computing in float32
    from transformers import AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).to(dev).eval()
    tok = TT.load_tokenizer(target_dir)

    # 4. draft data: the target's own greedy continuations
    t0 = time.time()
    py_train = [d["text"] for d in train_docs if d["kind"] == "python"]
    py_held = [d["text"] for d in held_docs if d["kind"] == "python"] or py_train[:5]
    rows = code_prompts(py_train, args.n_code_prompts, args.seed + 10) + \
        synth_prompts(args.n_chat_prompts, args.seed + 11)
    held_rows = code_prompts(py_held, args.n_heldout_code, args.seed + 20) + \
        synth_prompts(args.n_heldout_chat, args.seed + 21)
    data = generate_data(target, tok, rows, args.gen_tokens, batch_size=args.gen_batch,
                           max_prompt_len=args.max_prompt_len, log=log)
    held = generate_data(target, tok, held_rows, args.gen_tokens, batch_size=args.gen_batch,
                           max_prompt_len=args.max_prompt_len, log=log)
    torch.save(data, work / "draft_data.pt")
    torch.save(held, work / "draft_heldout.pt")
    if pack_dir:
        shutil.copy(work / "draft_heldout.pt", pack_dir / "draft_heldout.pt")
    gen_lens = [len(s) - p for s, p in zip(data["sequences"], data["prompt_lens"])]
    metrics["draft_data"] = {
        "train_sequences": len(data["sequences"]), "heldout_sequences": len(held["sequences"]),
        "response_tokens": int(sum(gen_lens)),
        "mean_prompt_tokens": round(sum(data["prompt_lens"]) / len(data["prompt_lens"]), 1),
        "train_continuation_stats": E.continuation_stats(
            [s[p:] for s, p in zip(data["sequences"], data["prompt_lens"])])}
    log(f"draft data: {metrics['draft_data']}")
    stage("gen_data", t0)

    # 5. draft
    t0 = time.time()
    draft_dir = out / "tiny-draft"
    budget = args.draft_budget
    if args.deadline:
        left = args.deadline - (time.time() - t_all) - args.eval_reserve
        if left < budget:
            budget = max(30.0, left)
            log(f"draft: budget {budget:.0f} s to meet the {args.deadline:.0f} s deadline")
    metrics["draft_budget_s"] = round(budget, 1)
    info = T.train_draft(target, data, draft_dir, mask_token_id=tok.mask_token_id,
                         block_size=args.block_size, num_layers=args.draft_layers,
                         target_layer_ids=[int(x) for x in args.draft_layer_ids.split(",")],
                         intermediate_size=args.draft_intermediate, steps=args.draft_steps,
                         batch=args.draft_batch, anchors=args.draft_anchors, lr=args.draft_lr,
                         seed=args.seed, time_budget=budget, save_every=0,
                         device=args.device, log_every=100, log=log)
    metrics["draft_training"] = {k: v for k, v in info.items() if k != "history"}
    metrics["draft_history"] = info["history"][::5] + info["history"][-1:]
    stage("draft", t0)
    pack(draft_dir)
    metrics["sizes_mb"] = {"tiny-target": round(file_mb(target_dir), 2),
                           "tiny-draft": round(file_mb(draft_dir), 2)}
    log(f"sizes (MB): {metrics['sizes_mb']}")

    # 6. evaluation (each part guarded: the models are already saved)
    t0 = time.time()
    from ..model.draft import DFlashDraft
    draft = DFlashDraft.from_pretrained(draft_dir, dtype=torch.float32, device=dev)
    try:
        metrics["perplexity"] = TT.evaluate_target(target_dir, corpus, device=args.device, log=log)
    except Exception as err:  # noqa: BLE001
        log(f"perplexity failed: {err!r}")
    try:
        sim = E.simulated_tau(target, draft, held)
        metrics["simulated_tau"] = sim
        log(f"simulated tau (held-out): {sim['tau']}")
        log(f"slot accuracy b16: {sim.get('slot_accuracy_b16')}")
    except Exception as err:  # noqa: BLE001
        log(f"simulated tau failed: {err!r}")
    try:
        metrics["decode"] = E.decode_check(target, draft, tok, args.decode_sets,
                                           n_prompts=args.decode_prompts,
                                           max_new_tokens=args.decode_tokens,
                                           block_size=args.block_size, log=log)
    except Exception as err:  # noqa: BLE001
        log(f"decode check failed: {err!r}")
    stage("eval", t0)
    metrics["total_s"] = round(time.time() - t_all, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if pack_dir:
        shutil.copy(out / "metrics.json", pack_dir / "metrics.json")

    # summary
    log("=" * 60)
    log(f"total {metrics['total_s']} s; stages {metrics['stages_s']}")
    log(f"sizes (MB) {metrics['sizes_mb']}")
    if "perplexity" in metrics:
        log(f"perplexity {metrics['perplexity']}")
    if "simulated_tau" in metrics:
        log(f"simulated tau {metrics['simulated_tau']['tau']}")
    for name, d in metrics.get("decode", {}).items():
        log(f"decode {name}: tau {d['mean_tau']} lossless {d['lossless']} "
            f"distinct-4 {d['distinct_4_mean']} loop-free {d['loop_free_share']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
