"""Evaluating a trained draft: simulated acceptance, real decoding, continuation statistics."""
from __future__ import annotations

import torch

from ..model.draft import DFlashDraft
from .data import collate, encode_prompt, greedy_continue
from .features import target_features
from .recipe import build_block_batch, draft_hidden


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
