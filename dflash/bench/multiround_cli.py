"""benchmark_multiround_spec.py: multi-round exact speculative sampling vs single-round vs target.

On the same samples (same per-sample seed) it runs target-only sampling (block size 1),
single-round speculative sampling (``SpeculativeDecoder`` at the temperature) and multi-round
sampling (``--mode tree``: one target pass per cycle over a tree of the rounds' branches;
``--mode faithful``: the spec's one-target-step-per-token sampler; ``--mode both``). It reports
TPOT, tokens/s, speedup vs target-only, tokens per target pass, the histogram of accepting
rounds and the per-round acceptance rate; one JSONL line per finished sample (after a header
record with the run configuration) and a summary JSON. See docs/MULTIROUND.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import common as bench
from . import runner, units
from .. import runlog
from ..decoding.loop import SpeculativeDecoder
from ..decoding.multiround import MultiRoundDecoder
from ..engine.device import pick_device
from ..errors import CliArgumentParser, UserError, parse_int_list
from ..model.draft import resolve_dtype
from .metrics import measure, speedup, summarize

SCRIPT = "benchmark_multiround_spec.py"


def build_parser() -> argparse.ArgumentParser:
    p = CliArgumentParser(
        prog=SCRIPT,
        description="Compare multi-round exact speculative sampling with single-round speculative "
                    "sampling and target-only sampling on the same samples.")
    bench.add_common_args(p)
    p.set_defaults(temperature=1.0)
    p.add_argument("--round-block-sizes", default="16,12",
                   help="comma-separated draft block size of each round, e.g. 16,12 (each >= 2)")
    p.add_argument("--mode", choices=["tree", "faithful", "both"], default="tree",
                   help="tree: the rounds' branches verified in one target pass per cycle; "
                        "faithful: one target step per token (the spec's sampler, to measure "
                        "per-round acceptance); both: run the two")
    p.add_argument("--single-block-size", type=int, default=None,
                   help="block size of the single-round speculative sampling run "
                        "(default: the first round's)")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed warm-up generations per method before measuring (default 1)")
    return p


def parse_block_sizes(text: str) -> list[int]:
    return parse_int_list(text, "--round-block-sizes", minimum=2, duplicates="keep",
                          example="16,12", why=" (a block of 1 proposes nothing)")


def check_args(args) -> list[int]:
    bench.check_common_args(args)
    sizes = parse_block_sizes(args.round_block_sizes)
    if args.single_block_size is not None and args.single_block_size < 2:
        raise UserError(f"--single-block-size must be >= 2, got {args.single_block_size}")
    if args.warmup_runs < 0:
        raise UserError(f"--warmup-runs must be >= 0, got {args.warmup_runs}")
    if args.engine == "hf" and args.mode in ("tree", "both"):
        raise UserError("--mode tree needs the static engine (tree attention)",
                        "use --engine static (or auto), or --mode faithful")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{SCRIPT} runs as a single process", "launch it without torchrun")
    return sizes


def method_names(args) -> list[str]:
    return ["target_only", "single_round"] + (["tree", "faithful"] if args.mode == "both"
                                              else [args.mode])


def run_config(args, model_name: str, draft_name: str, dtype, device, sizes, single_b,
               methods) -> dict:
    """What a unit's result depends on; --resume refuses a JSONL recorded with another one.
    Everything in it is known before the models load."""
    return {"script": SCRIPT, "dataset": args.dataset, "max_samples": args.max_samples,
            "model": model_name, "draft": draft_name, "round_block_sizes": sizes,
            "single_block_size": single_b, "mode": args.mode, "methods": methods,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed, "dtype": str(dtype).replace("torch.", ""),
            "engine": args.engine, "device": str(device), **bench.run_settings(args),
            "enable_thinking": args.enable_thinking, "chat_template": not args.no_chat_template}


def summary_path(args) -> str:
    return runner.summary_path(args, f"outputs/multiround_{args.dataset}.json")


def planned_config(args, sizes, device, model_name: str, draft_name: str) -> dict:
    dtype = resolve_dtype(args.dtype, "bfloat16" if device.type == "cuda" else "float32")
    return run_config(args, model_name, draft_name, dtype, device, sizes,
                      args.single_block_size or sizes[0], method_names(args))


def _methods(args, pair, sizes, single_b):
    """(name -> (generate(input_ids, stops, generator, max_new), largest tau), the engine line)."""
    engine, engine_text = runner.resolve_engine(args, pair)
    spec = SpeculativeDecoder(pair.target, pair.draft, engine=engine)
    temp, filters = args.temperature, bench.sampling_kwargs(args)
    out = {
        "target_only": (lambda ids, stops, g, n: spec.generate(
            ids, n, temperature=temp, stop_token_ids=stops, block_size=1, generator=g,
            **filters), 1),
        "single_round": (lambda ids, stops, g, n: spec.generate(
            ids, n, temperature=temp, stop_token_ids=stops, block_size=single_b, generator=g,
            **filters), single_b),
    }
    for mode in (["tree", "faithful"] if args.mode == "both" else [args.mode]):
        dec = MultiRoundDecoder(pair.target, pair.draft, sizes, mode=mode, engine=engine)
        out[mode] = ((lambda d: lambda ids, stops, g, n: d.generate(
            ids, n, temperature=temp, stop_token_ids=stops, generator=g, **filters))(dec),
            max(sizes) if mode == "tree" else 1)
    return out, engine_text


def _generate_turns(fn, pair, prompt, args, seed):
    """Every turn of a prompt (later turns see earlier replies) -> (results, texts)."""
    return runner.generate_turns(pair, prompt, args, seed, lambda ids, stops, gen: fn(
        ids, stops, gen, args.max_new_tokens), timed=False)


def measure_method(results, max_block: int) -> dict:
    """``metrics.measure`` plus target passes and, for multi-round results, round statistics."""
    rec = measure(results, max_block)
    passes = sum(getattr(r, "target_passes", 0) or (len(r.cycles) + (1 if r.num_tokens else 0))
                 for r in results)
    rec["target_passes"] = passes
    rec["tokens_per_target_pass"] = rec["tokens"] / passes if passes else 0.0
    if results and hasattr(results[0], "round_attempts"):
        k = len(results[0].round_attempts)
        rec["round_attempts"] = [sum(r.round_attempts[i] for r in results) for i in range(k)]
        rec["round_accepts"] = [sum(r.round_accepts[i] for r in results) for i in range(k)]
        rec["residual_draws"] = sum(r.residual_draws for r in results)
        rec["bonus_draws"] = sum(r.bonus_draws for r in results)
        rec["tree_nodes"] = sum(r.tree_nodes for r in results)
    return rec


def summarize_method(records: list[dict]) -> dict | None:
    out = summarize(records)
    records = [r for r in records if r]
    if out is None:
        return None
    passes = sum(r["target_passes"] for r in records)
    out["target_passes"] = passes
    out["tokens_per_target_pass"] = out["tokens"] / passes if passes else 0.0
    if "round_attempts" in records[0]:
        k = len(records[0]["round_attempts"])
        att = [sum(r["round_attempts"][i] for r in records) for i in range(k)]
        acc = [sum(r["round_accepts"][i] for r in records) for i in range(k)]
        res = sum(r["residual_draws"] for r in records)
        bonus = sum(r["bonus_draws"] for r in records)
        out["round_attempts"], out["round_accepts"] = att, acc
        out["round_acceptance_rate"] = [a / t if t else None for a, t in zip(acc, att)]
        out["round_histogram"] = {**{f"round{i + 1}": acc[i] for i in range(k)},
                                  "residual": res, "bonus": bonus}
        nodes = sum(r["tree_nodes"] for r in records)
        if nodes:
            out["tree_nodes_per_pass"] = nodes / max(1, out["cycles"])
    return out


def warm_up(methods, pair, prompts, args):
    if not prompts or args.warmup_runs == 0:
        return
    ids = runner.encode(pair, args, [{"role": "user", "content": prompts[0]["turns"][0]}])
    gen = torch.Generator(device=pair.device).manual_seed(args.seed)
    for _ in range(args.warmup_runs):
        for fn, _b in methods.values():
            fn(ids, [], gen, min(args.max_new_tokens, 32))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = check_args(args)
    device = pick_device(args.device, 0)
    model_name, draft_name = bench.default_model_names(args.model_name_or_path,
                                                       args.draft_name_or_path, device)
    # -- before any model loads: where the summary goes, and a --resume of another run
    config = planned_config(args, sizes, device, model_name, draft_name)
    out_jsonl, out_json = args.save_outputs_path, summary_path(args)
    bench.check_writable(out_json, "summary path")
    runlog.precheck(out_jsonl, config, args.resume)

    dist = bench.Dist()
    prompts, source, pair = runner.load_inputs(args, dist, device, model_name, draft_name)
    single_b = args.single_block_size or sizes[0]
    torch.manual_seed(args.seed)
    methods, engine = _methods(args, pair, sizes, single_b)
    config = run_config(args, pair.target_name, pair.draft_name, pair.dtype, pair.device, sizes,
                        single_b, list(methods))

    def verbose_line(shard, n, prompt, rec):
        if args.verbose and "error" not in rec:
            print(f"[{n}/{len(shard.todo)}] {prompt['id']}: " + ", ".join(
                f"{m} {rec[m]['tokens_per_target_pass']:.2f} tok/pass" for m in methods),
                file=sys.stderr)

    return runner.run_sharded(
        args, dist, prompts, config, out_json,
        run_one=lambda prompt: run_sample(methods, pair, prompt, args),
        warm_up=lambda todo: warm_up(methods, pair, todo, args), on_record=verbose_line,
        summarize=lambda records, status: {**build_summary(args, config, records, methods,
                                                           device, source, status),
                                            "engine": engine},
        report=print_summary, tag_rank=False)


def run_sample(methods, pair, prompt, args) -> dict:
    """Every method on one prompt, same per-sample seed for each."""
    seed = bench.sample_seed(args.seed, prompt["id"])
    rec = {"id": prompt["id"], "dataset": args.dataset, "category": prompt["category"],
           "seed": seed, "outputs": {}}
    for name, (fn, max_block) in methods.items():
        results, texts = _generate_turns(fn, pair, prompt, args, seed)
        rec[name] = measure_method(results, max_block)
        rec["outputs"][name] = texts
        rec["prompt_tokens"] = results[0].prompt_len
    return rec


def build_summary(args, config, records, methods, device, source, status: dict) -> dict:
    """``status``: :func:`dflash.units.run_status` of the run (complete, interrupted_by...)."""
    ok = [r for r in records if "error" not in r]
    per = {m: summarize_method([r.get(m) for r in ok]) for m in methods}
    base = per.get("target_only")
    return {
        "config": config,
        "dataset_source": source,
        **status,
        "sample_ids": [r["id"] for r in records],
        "methods": per,
        "speedup": {m: speedup(base, per[m]) for m in methods if m != "target_only"},
        "wall_speedup": {m: (base["total_wall_s"] / per[m]["total_wall_s"])
                         if base and per[m] and per[m]["total_wall_s"] > 0 else None
                         for m in methods if m != "target_only"},
        "environment": bench.environment_info(device),
        "argv": sys.argv[1:] if sys.argv else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "per_sample": [{k: v for k, v in r.items() if k != "outputs"} for r in records],
    }


def _label(cfg, m):
    sizes = ",".join(str(b) for b in cfg["round_block_sizes"])
    return {"target_only": "target-only", "single_round": f"single b{cfg['single_block_size']}",
            "tree": f"tree {sizes}", "faithful": f"faithful {sizes}"}[m]


def print_summary(s: dict, path: str) -> None:
    cfg, env = s["config"], s["environment"]
    methods = [m for m in cfg["methods"] if s["methods"].get(m)]
    lines = ["",
             *bench.title_lines(s, "Multi-round speculative sampling",
                                f"rounds {','.join(map(str, cfg['round_block_sizes']))}"),
             f"hardware: {env['gpu_name']} | torch {env['torch_version']} | transformers "
             f"{env['transformers_version']}"]
    rows = [[""] + [_label(cfg, m) for m in methods]]

    def row(label, fn):
        rows.append([label] + [fn(m, s["methods"][m]) for m in methods])

    row("TPOT (ms)", lambda m, x: f"{1000 * x['tpot']:.2f}")
    row("tokens/s", lambda m, x: f"{x['tokens_per_sec']:.1f}")
    row("speedup (TPOT)", lambda m, x: "1.00x" if m == "target_only"
        else (f"{s['speedup'][m]:.2f}x" if s["speedup"].get(m) else "-"))
    row("tokens / target pass", lambda m, x: f"{x['tokens_per_target_pass']:.2f}")
    row("tokens / cycle (tau)", lambda m, x: f"{x['tau']:.2f}")
    row("tokens", lambda m, x: str(x["tokens"]))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(width[0]) if i == 0 else c.rjust(width[i])
                                      for i, c in enumerate(r)))
    for m in methods:
        x = s["methods"][m]
        if "round_acceptance_rate" not in x:
            continue
        rates = " ".join(f"r{i + 1} {100 * r:.1f}% of {n}" if r is not None else f"r{i + 1} -"
                         for i, (r, n) in enumerate(zip(x["round_acceptance_rate"],
                                                         x["round_attempts"])))
        hist = x["round_histogram"]
        total = sum(hist.values()) or 1
        h = " ".join(f"{k}:{100 * v / total:.1f}%" for k, v in hist.items())
        lines.append(f"{_label(cfg, m)}: per-round acceptance {rates}")
        lines.append(f"{_label(cfg, m)}: accepting round of each drawn token {h}")
    lines += units.closing_lines(s, path)
    print("\n".join(lines))
