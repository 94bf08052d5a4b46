"""Training data: prompt files, the target's own greedy continuations, batching."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch



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
