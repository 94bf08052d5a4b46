"""Build a tiny target LLM from scratch: corpus, byte-level BPE tokenizer, Qwen3 model.

Corpus: Python source files found under this interpreter's library folders (standard library
and site-packages) plus generated math and chat text (``dflash/synth_text.py``) laid out the
way the tokenizer's chat template renders a conversation. Files are split into train and
held-out sets by file, so held-out perplexity is measured on unseen files.

Commands (each has --help)::

    python -m dflash.training.train_target corpus    --out data/corpus [--python-mb 40 ...]
    python -m dflash.training.train_target tokenizer --corpus data/corpus --out models/my-target
    python -m dflash.training.train_target train     --corpus data/corpus --tokenizer models/my-target \\
                                            --out models/my-target [--steps 2500 ...]
    python -m dflash.training.train_target eval      --corpus data/corpus --model models/my-target

``python -m dflash.make_embedded`` runs these (and the draft recipe) end to end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from .synth_text import render_document, synth_examples
from ..engine.device import pick_device

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"

# user text, then a newline unless it already ends with one; assistant text likewise. The
# generation prompt adds nothing: the model simply continues after the user's text, so a raw
# code prompt (ending in a newline) is rendered unchanged. enable_thinking is accepted and
# ignored (this model has no thinking mode).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{{- content -}}"
    "{%- if not content.endswith('\n') -%}{{- '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
)


# ----------------------------------------------------------------------------- corpus
def library_dirs() -> list[Path]:
    """Standard-library and site-packages folders of this interpreter (and its base)."""
    dirs = []
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars) if scheme_vars else sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                dirs.append(Path(paths[key]))
    try:
        import site
        dirs += [Path(p) for p in site.getsitepackages()]
    except Exception:
        pass
    out, seen = [], set()
    for d in dirs:
        if d.is_dir():
            real = d.resolve()
            if real not in seen:
                seen.add(real)
                out.append(real)
    return out


def find_python_files(dirs: list[Path]) -> list[Path]:
    """Every ``*.py`` path under ``dirs`` (sorted; sizes are checked when reading)."""
    files, seen_dirs = [], set()
    for root in dirs:
        for dirpath, dirnames, filenames in os.walk(root):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames.sort()
            files += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")]
    return files


def read_source(path: Path, max_line=240, min_bytes=200, max_bytes=100_000) -> str | None:
    """The file's text, or None for tiny, huge, binary-ish, generated-looking or non-UTF-8 files."""
    try:
        if not min_bytes <= path.stat().st_size <= max_bytes:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if "\x00" in text:
        return None
    lines = text.splitlines()
    if not lines or max(len(l) for l in lines) > max_line:
        return None
    non_ascii = sum(1 for ch in text if ord(ch) > 127)
    if non_ascii > 0.02 * len(text):
        return None
    return text.replace("\r\n", "\n").replace("\t", "    ")


def build_corpus(out_dir: Path, python_mb: float = 40.0, n_math: int = 20000, n_chat: int = 15000,
                 heldout_frac: float = 0.02, seed: int = 0, dirs: list[Path] | None = None,
                 log=print) -> dict:
    """Write ``train.jsonl`` / ``heldout.jsonl`` (one document per line) under ``out_dir``."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = dirs or library_dirs()
    files = find_python_files(dirs)
    rng = random.Random(seed)
    rng.shuffle(files)
    budget = int(python_mb * 1e6)
    docs, hashes, total = [], set(), 0
    for f in files:
        if total >= budget:
            break
        text = read_source(f)
        if text is None:
            continue
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in hashes:
            continue
        hashes.add(h)
        docs.append({"kind": "python", "text": text})
        total += len(text)
    synth = synth_examples(n_math, n_chat, seed + 1)
    for q, a in synth:
        docs.append({"kind": "math" if "answer is" in a else "chat",
                     "text": render_document(q, a), "prompt": q})
    rng.shuffle(docs)
    n_held = max(1, int(len(docs) * heldout_frac))
    held, train = docs[:n_held], docs[n_held:]
    for name, rows in (("train", train), ("heldout", held)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    stats = {
        "library_dirs": [str(d) for d in dirs],
        "python_files_found": len(files),
        "python_docs": sum(d["kind"] == "python" for d in docs),
        "python_bytes": total,
        "synth_docs": len(synth),
        "synth_bytes": sum(len(d["text"]) for d in docs if d["kind"] != "python"),
        "train_docs": len(train), "heldout_docs": len(held),
        "seed": seed, "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"corpus: {stats['python_docs']} python files ({total / 1e6:.1f} MB) + "
        f"{len(synth)} generated docs ({stats['synth_bytes'] / 1e6:.1f} MB); "
        f"{len(train)} train / {len(held)} held-out docs in {stats['seconds']} s")
    return stats


def read_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], out_dir: Path, vocab_size: int = 4096,
                    sample_mb: float = 12.0, seed: int = 0, log=print):
    """Byte-level BPE with eos/pad/mask specials and the chat template; saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    sample, size = [], 0
    for i in order:
        if size >= sample_mb * 1e6:
            break
        sample.append(docs[i])
        size += len(docs[i])
    tok = Tokenizer(models.BPE())
    # Newlines are tokens of their own, so a prompt that ends in "\n" (a code prompt, or a
    # chat turn rendered by the template) tokenizes exactly as the same text inside a file.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   mask_token=MASK, model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained on {size / 1e6:.1f} MB in "
        f"{time.time() - t0:.1f} s (eos {fast.eos_token_id}, pad {fast.pad_token_id}, "
        f"mask {fast.mask_token_id})")
    return fast


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def encode_docs(tokenizer, docs: list[str], batch: int = 2000) -> np.ndarray:
    """All documents as one uint16/int32 stream, each followed by eos."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    parts = []
    for i in range(0, len(docs), batch):
        for enc in backend.encode_batch(docs[i:i + batch], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream.astype(np.uint16 if len(tokenizer) <= 65535 else np.int32)


# ----------------------------------------------------------------------------- model
def target_config(tokenizer, hidden=256, layers=6, heads=4, kv_heads=2, intermediate=1024,
                  max_positions=2048, rope_theta=10000.0):
    from transformers import Qwen3Config

    vocab = len(tokenizer)
    vocab = (vocab + 63) // 64 * 64
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        rope_theta=rope_theta, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0, use_cache=True)


def lr_schedule(progress: float, peak: float, warmup_frac: float = 0.04,
                floor: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup_frac`` of training, then cosine decay to
    ``floor * peak``; ``progress`` in [0, 1] (a step fraction, or a time fraction under a
    time budget)."""
    if progress < warmup_frac:
        return peak * max(progress / warmup_frac, 1e-3)
    q = min(1.0, (progress - warmup_frac) / max(1e-9, 1.0 - warmup_frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


class Schedule:
    """Training progress by steps, or by wall-clock time when ``time_budget`` is set (then
    training ends at the budget or at ``steps``, whichever comes first)."""

    def __init__(self, steps: int, time_budget: float | None = None, elapsed: float = 0.0):
        self.steps, self.time_budget = steps, time_budget
        self.t0 = time.time() - elapsed

    def elapsed(self) -> float:
        return time.time() - self.t0

    def progress(self, step: int) -> float:
        p = step / max(1, self.steps)
        if self.time_budget:
            p = max(p, self.elapsed() / self.time_budget)
        return min(1.0, p)

    def projected_steps(self, step: int) -> int:
        """Steps the run will reach (for progress bars)."""
        if not self.time_budget or step == 0:
            return self.steps
        el = self.elapsed()
        return min(self.steps, max(step, int(step * self.time_budget / max(el, 1e-6))))


def train_target(stream: np.ndarray, tokenizer, out_dir: Path, *, steps=2500, batch=32,
                 seq_len=512, lr=2e-3, weight_decay=0.1, seed=0, device="auto",
                 time_budget: float | None = None, model_kwargs: dict | None = None,
                 log=print) -> dict:
    """Train a Qwen3ForCausalLM on random windows of ``stream``; save bf16 to ``out_dir``."""
    from tqdm import tqdm
    from transformers import GenerationConfig, Qwen3ForCausalLM

    dev = pick_device(device)
    torch.manual_seed(seed)
    np_rng = np.random.default_rng(seed)
    cfg = target_config(tokenizer, **(model_kwargs or {}))
    model = Qwen3ForCausalLM(cfg).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    data = torch.from_numpy(stream.astype(np.int64))
    n_windows = len(data) - seq_len - 1
    if n_windows <= 0:
        raise ValueError(f"corpus of {len(data)} tokens is shorter than one window")
    amp = dev.type == "cuda"
    sched = Schedule(steps, time_budget)
    log(f"target: {n_params / 1e6:.2f}M params, {len(data) / 1e6:.2f}M tokens, "
        f"up to {steps} steps x {batch} x {seq_len}"
        + (f" within {time_budget:.0f} s" if time_budget else "") + f", lr {lr}, device {dev}")
    t0 = time.time()
    bar = tqdm(total=steps, desc="target", mininterval=5.0, file=sys.stdout)
    losses = []
    step = 0
    while (p := sched.progress(step)) < 1.0:
        starts = torch.from_numpy(np_rng.integers(0, n_windows, size=batch))
        idx = starts[:, None] + torch.arange(seq_len + 1)[None]
        chunk = data[idx].to(dev, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_schedule(p, lr)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            lv = float(loss.detach())
            losses.append((step, lv))
            el = time.time() - t0
            bar.total = sched.projected_steps(step)
            bar.set_postfix(loss=f"{lv:.3f}",
                            tok_s=f"{step * batch * seq_len / el:,.0f}")
        bar.update(1)
    if not losses or losses[-1][0] != step:
        losses.append((step, float(loss.detach())))
    bar.close()
    seconds = time.time() - t0
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False)
    out_dir = Path(out_dir)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {"params": n_params, "steps": step, "batch": batch, "seq_len": seq_len, "lr": lr,
            "weight_decay": weight_decay, "seed": seed, "seconds": round(seconds, 1),
            "final_loss": losses[-1][1] if losses else None,
            "tokens_seen": step * batch * seq_len, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    log(f"target: {step} steps in {seconds:.0f} s, final loss {info['final_loss']:.3f}; "
        f"saved to {out_dir}")
    return info


@torch.no_grad()
def perplexity(model, stream: np.ndarray, seq_len=512, max_tokens=400_000, batch=16) -> float:
    """Perplexity over non-overlapping windows of ``stream`` (every token after the first)."""
    dev = model.get_input_embeddings().weight.device
    data = torch.from_numpy(stream[:max_tokens].astype(np.int64))
    n = (len(data) - 1) // seq_len
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        rows = [data[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + batch))]
        x = torch.stack(rows).to(dev)
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / max(1, count))


def unigram_perplexity(train: np.ndarray, held: np.ndarray, vocab: int, max_tokens=400_000) -> float:
    """Perplexity of an add-one unigram model fitted on ``train``, on ``held``."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    h = held[:max_tokens].astype(np.int64)[1:]
    return float(np.exp(-logp[h].mean()))


def evaluate_target(model_dir: Path, corpus_dir: Path, device="auto", log=print) -> dict:
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev).eval()
    train_docs = [d["text"] for d in read_docs(Path(corpus_dir) / "train.jsonl")]
    held_docs = read_docs(Path(corpus_dir) / "heldout.jsonl")
    train_stream = encode_docs(tok, train_docs)
    out = {}
    for name, docs in (("all", held_docs),
                       ("python", [d for d in held_docs if d["kind"] == "python"]),
                       ("generated", [d for d in held_docs if d["kind"] != "python"])):
        if not docs:
            continue
        held = encode_docs(tok, [d["text"] for d in docs])
        out[name] = {"tokens": int(min(len(held), 400_000)),
                     "perplexity": round(perplexity(model, held), 3),
                     "unigram_perplexity": round(unigram_perplexity(train_stream, held,
                                                                    model.config.vocab_size), 1)}
    out["bytes_per_token_train"] = round(sum(len(d) for d in train_docs) / max(1, len(train_stream)), 3)
    log("held-out perplexity: " + ", ".join(
        f"{k} {v['perplexity']} (unigram {v['unigram_perplexity']})"
        for k, v in out.items() if isinstance(v, dict)))
    return out


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dflash.training.train_target",
                                 description="Build a tiny Qwen3 target from scratch: corpus, "
                                             "tokenizer, training, evaluation.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("corpus", help="collect Python files + generated math/chat text")
    c.add_argument("--out", required=True, help="folder for train.jsonl / heldout.jsonl")
    c.add_argument("--python-mb", type=float, default=40.0, help="MB of Python source")
    c.add_argument("--n-math", type=int, default=20000, help="generated math documents")
    c.add_argument("--n-chat", type=int, default=15000, help="generated chat documents")
    c.add_argument("--heldout-frac", type=float, default=0.02)
    c.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--sample-mb", type=float, default=12.0)
    t.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("train", help="train the Qwen3 target (bf16 autocast on CUDA)")
    m.add_argument("--corpus", required=True)
    m.add_argument("--tokenizer", required=True, help="folder with the trained tokenizer")
    m.add_argument("--out", required=True)
    m.add_argument("--steps", type=int, default=2500)
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--lr", type=float, default=2e-3)
    m.add_argument("--weight-decay", type=float, default=0.1)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--intermediate", type=int, default=1024)
    m.add_argument("--time-budget", type=float, default=None,
                   help="seconds: shorten the schedule (measured after 20 steps) to fit")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="auto")

    e = sub.add_parser("eval", help="held-out perplexity vs a unigram baseline")
    e.add_argument("--corpus", required=True)
    e.add_argument("--model", required=True)
    e.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    if args.cmd == "corpus":
        build_corpus(Path(args.out), args.python_mb, args.n_math, args.n_chat,
                     args.heldout_frac, args.seed)
    elif args.cmd == "tokenizer":
        docs = [d["text"] for d in read_docs(Path(args.corpus) / "train.jsonl")]
        train_tokenizer(docs, Path(args.out), args.vocab_size, args.sample_mb, args.seed)
    elif args.cmd == "train":
        tok = load_tokenizer(args.tokenizer)
        docs = [d["text"] for d in read_docs(Path(args.corpus) / "train.jsonl")]
        stream = encode_docs(tok, docs)
        info = train_target(stream, tok, Path(args.out), steps=args.steps, batch=args.batch,
                            seq_len=args.seq_len, lr=args.lr, weight_decay=args.weight_decay,
                            seed=args.seed, device=args.device, time_budget=args.time_budget,
                            model_kwargs=dict(hidden=args.hidden, layers=args.layers,
                                              heads=args.heads, kv_heads=args.kv_heads,
                                              intermediate=args.intermediate))
        (Path(args.out) / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    elif args.cmd == "eval":
        print(json.dumps(evaluate_target(Path(args.model), Path(args.corpus), args.device), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
