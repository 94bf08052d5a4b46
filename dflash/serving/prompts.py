"""Prompts for the serving benchmark: first turns of a dflash.datasets set, with the target's
chat template applied client-side (transformers' tokenizer only: no torch, no model)."""
from __future__ import annotations

import argparse
import os

from ..errors import UserError
from .cli import n_prompts

def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def load_chat_tokenizer(path: str):
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"tokenizer path '{path}' does not exist",
                        "pass --tokenizer PATH, or --no-chat-template to send the raw prompt text")
    try:
        from transformers import AutoTokenizer
    except Exception as err:  # noqa: BLE001
        raise UserError(f"applying the chat template needs transformers ({type(err).__name__})",
                        "pip install transformers, or pass --no-chat-template") from None
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=True)
    except Exception as err:  # noqa: BLE001 - network, missing files, bad config...
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"could not load the tokenizer '{path}' ({type(err).__name__}: {first})",
                        "pass --tokenizer PATH, or --no-chat-template to send the raw prompt "
                        "text") from None
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer '{path}' has no chat template",
                        "pass --tokenizer with one that has, or --no-chat-template")
    return tok


def apply_chat_template(tok, text: str, enable_thinking: bool) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=enable_thinking)


def build_prompts(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    """(prompt texts ready to send, dataset source, a note or None). First turns only."""
    from ..datasets import load_prompts

    tok = None if args.no_chat_template else load_chat_tokenizer(args.tokenizer_path)
    rows, source = load_prompts(args.dataset_name, None)
    texts = [row["turns"][0] for row in rows if row.get("turns")]
    if not texts:
        raise UserError(f"dataset '{args.dataset_name}' has no prompts")
    if tok is not None:
        texts = [apply_chat_template(tok, t, args.enable_thinking) for t in texts]
    need = max(n_prompts(args, c) for c in args.concurrency_list)
    note = None
    if need > len(texts):
        note = (f"{args.dataset_name} has {len(texts)} prompts; configurations needing more "
                f"reuse them in order")
    return texts, source, note


def prompts_for(texts: list[str], n: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(n)]


