"""CPU-sized training data for the embedded DFlash 2 draft: the target's own greedy continuations.

The same kind of data as the DFlash 1 draft's (``make_embedded``: code prompts cut from Python
files at line ends + generated math/chat questions, chat template applied, continued greedily
by the target), only fewer prompts and shorter continuations so that it is made on a CPU in
minutes. The built-in evaluation prompt sets are not used.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import train_target as TT
from .data import generate_data
from .make_embedded import code_prompts, synth_prompts


def make_data(target, tok, work: Path, *, n_code: int = 384, n_chat: int = 128,
              gen_tokens: int = 96, max_prompt_len: int = 192, python_mb: float = 4.0,
              seed: int = 0, batch_size: int = 128, log=print) -> dict:
    """{'sequences', 'prompt_lens', ...} as ``generate_data`` returns (seeds as make_embedded:
    corpus ``seed``, code prompts ``seed + 10``, questions ``seed + 11``)."""
    t0 = time.time()
    corpus = Path(work) / "corpus"
    TT.build_corpus(corpus, python_mb, 200, 200, seed=seed, log=log)
    docs = [d["text"] for d in TT.read_docs(corpus / "train.jsonl") if d["kind"] == "python"]
    rows = code_prompts(docs, n_code, seed + 10) + synth_prompts(n_chat, seed + 11)
    data = generate_data(target, tok, rows, gen_tokens, batch_size=batch_size,
                         max_prompt_len=max_prompt_len, log=log)
    data["meta"]["seconds"] = round(time.time() - t0, 1)
    return data


if __name__ == "__main__":  # python -m dflash.training.dflash2_data OUT.pt
    import sys

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    folder = "models/tiny-target"
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = Path(sys.argv[1])
    d = make_data(target, TT.load_tokenizer(folder), out.parent / "work")
    torch.save(d, out)
    print(f"{len(d['sequences'])} sequences, "
          f"{sum(len(s) - p for s, p in zip(d['sequences'], d['prompt_lens']))} response tokens, "
          f"{d['meta']['seconds']} s -> {out}")
