"""tau of drafts on the built-in prompt sets, greedy and sampled, in the real decoding loop.

    python -m dflash.training.dflash2_eval --drafts models/tiny-draft models/tiny-draft-dflash2 \
        [--sets builtin-code humaneval builtin-math builtin-chat] [--temperatures 0 1]

The greedy rows are what ``python -m dflash.train eval --decode ...`` measures (static engine,
chat template, first ``--n-prompts`` prompts of each set, ``--max-new-tokens`` new tokens,
stop at eos) and check the output against plain greedy decoding; sampled rows draw with a
generator seeded per prompt (``--seed`` + prompt index), the same for every draft.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def measure(target, tok, draft, sets, temperatures, *, n_prompts=8, max_new_tokens=128,
            seed=0, plain_cache=None, log=print) -> dict:
    from ..datasets import load_prompts
    from ..decoding.loop import SpeculativeDecoder
    from .data import encode_prompt

    spec = SpeculativeDecoder(target, draft, engine="static")
    plain = SpeculativeDecoder(target, None, engine="static")
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    plain_cache = {} if plain_cache is None else plain_cache
    out: dict = {}
    for name in sets:
        rows, _ = load_prompts(name, n_prompts)
        for temp in temperatures:
            taus, per_prompt, lossless, t0 = [], [], True, time.time()
            for i, row in enumerate(rows):
                ids = torch.tensor(encode_prompt(tok, {"turns": row["turns"][:1]}))
                gen = torch.Generator().manual_seed(seed + i)
                r = spec.generate(ids, max_new_tokens=max_new_tokens, temperature=temp,
                                  stop_token_ids=stops, block_size=draft.block_size,
                                  generator=gen)
                if temp == 0:
                    key = (name, i)
                    if key not in plain_cache:
                        plain_cache[key] = plain.generate(ids, max_new_tokens=max_new_tokens,
                                                          block_size=1, stop_token_ids=stops).output_ids
                    lossless &= r.output_ids == plain_cache[key]
                taus += [c.tau for c in r.cycles]
                per_prompt.append(r.mean_tau)
            row_out = {"cycles": len(taus), "mean_tau": round(sum(taus) / max(1, len(taus)), 3),
                       "mean_tau_per_prompt": round(sum(per_prompt) / max(1, len(per_prompt)), 3),
                       "tau_by_prompt": [round(t, 3) for t in per_prompt],
                       "seconds": round(time.time() - t0, 1)}
            if temp == 0:
                row_out["lossless"] = bool(lossless)
            out[f"{name} T={temp:g}"] = row_out
            log(f"{name} T={temp:g}: {json.dumps(row_out)}")
    return out


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from ..model.draft import DFlashDraft
    from . import train_target as TT

    ap = argparse.ArgumentParser(prog="python -m dflash.training.dflash2_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/tiny-target")
    ap.add_argument("--drafts", nargs="+", default=["models/tiny-draft", "models/tiny-draft-dflash2"])
    ap.add_argument("--sets", nargs="+",
                    default=["builtin-code", "humaneval", "builtin-math", "builtin-chat"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    tok = TT.load_tokenizer(args.target)
    res, cache = {}, {}
    for path in args.drafts:
        draft = DFlashDraft.from_pretrained(path, dtype=torch.float32)
        print(f"== {path}", flush=True)
        res[path] = measure(target, tok, draft, args.sets, args.temperatures,
                            n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, plain_cache=cache, log=lambda m: print(m, flush=True))
    text = json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "results": res}, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
