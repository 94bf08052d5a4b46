"""benchmark.py: baseline (block size 1) vs DFlash speculative decoding on one prompt set.

Runs as ``python benchmark.py ...`` or under ``torchrun --nproc_per_node=N benchmark.py ...``
(samples sharded over ranks, gathered on rank 0). Writes a per-sample JSONL as samples finish
and one summary JSON that the sweep and analysis tools read.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import common as bench
from . import runner, units
from .. import runlog
from ..decoding.loop import SpeculativeDecoder
from ..engine.device import pick_device
from ..errors import CliArgumentParser, UserError
from ..model.draft import resolve_dtype
from .metrics import format_histogram, measure, speedup, summarize


def build_parser() -> argparse.ArgumentParser:
    p = CliArgumentParser(
        prog="benchmark.py",
        description="Benchmark DFlash speculative decoding against autoregressive decoding "
                    "(same engine, after warm-up) on a prompt set.")
    bench.add_common_args(p)
    p.add_argument("--block-size", type=int, default=None,
                   help="draft block size (default: the draft's own, 16 for z-lab b16 drafts); "
                        "1 runs the autoregressive baseline only")
    bench.add_switches(p, [
        ("--skip-baseline", "do not run the autoregressive baseline (speedup then comes from "
                            "elsewhere)"),
        ("--collect-profile", "time draft and verify per cycle with device events")])
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed warm-up generations per mode before measuring (default 1)")
    return p


MAX_BLOCK_SIZE = 1024
MAX_WARMUP_RUNS = 100


def check_args(args) -> None:
    """Every flag, before anything is loaded or written (see bench.check_common_args)."""
    bench.check_common_args(args)
    if args.block_size is not None and not 1 <= args.block_size <= MAX_BLOCK_SIZE:
        raise UserError(f"--block-size must be in 1..{MAX_BLOCK_SIZE}, got {args.block_size}"
                        if args.block_size > 0 else
                        f"--block-size must be >= 1, got {args.block_size}")
    if not 0 <= args.warmup_runs <= MAX_WARMUP_RUNS:
        raise UserError(f"--warmup-runs must be in 0..{MAX_WARMUP_RUNS}, got {args.warmup_runs}")
    if args.block_size == 1 and args.skip_baseline:
        raise UserError("--block-size 1 is the baseline; it cannot be combined with --skip-baseline")


def run_config(args, model_name: str, draft_name: str | None, dtype, block_size: int | None) -> dict:
    """What a unit's result depends on; --resume refuses a JSONL recorded with another one."""
    return {"script": "benchmark.py", "dataset": args.dataset, "max_samples": args.max_samples,
            "model": model_name, "draft": draft_name, "block_size": block_size,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed, "dtype": str(dtype).replace("torch.", ""),
            "engine": args.engine, "skip_baseline": args.skip_baseline, **bench.run_settings(args),
            "enable_thinking": args.enable_thinking, "chat_template": not args.no_chat_template}


def resolve_models(args, device) -> tuple[str, str]:
    """Target and draft names after defaults, checked to exist where they are local."""
    model, draft = bench.default_model_names(args.model_name_or_path, args.draft_name_or_path,
                                             device, announce=False)
    for name, given, flag, what in ((model, args.model_name_or_path, "--model-name-or-path",
                                     "target model"),
                                    (draft, args.draft_name_or_path, "--draft-name-or-path", "draft")):
        if given is None and what == "draft" and args.block_size == 1:
            continue  # the baseline loads no draft
        if given is None:
            try:
                bench.check_model_arg(name, flag, what)
            except UserError as err:
                raise UserError(f"no CUDA device, so the default {what} is the embedded tiny one, "
                                f"which is missing", f"pass {flag}, or build it with "
                                "scripts/train_embedded.sh") from err
    return model, draft


def default_summary_path(args, block_size) -> str:
    return runner.summary_path(args, f"outputs/benchmark_{args.dataset}_b{block_size}.json")


def _generate_turns(decoder, pair, prompt, args, block_size, seed, profile):
    """Run every turn of a prompt; later turns see the earlier replies. Returns results, text."""
    return runner.generate_turns(pair, prompt, args, seed, lambda ids, stops, gen: decoder.generate(
        ids, args.max_new_tokens, temperature=args.temperature, stop_token_ids=stops,
        block_size=block_size, generator=gen, collect_profile=profile,
        **bench.sampling_kwargs(args)))


def warm_up(decoder, pair, prompts, args, block_size):
    if prompts:
        bench.reserve_for_prompts(decoder, pair, prompts, args)
    if not prompts or args.warmup_runs == 0:
        return
    input_ids = runner.encode(pair, args, [{"role": "user", "content": prompts[0]["turns"][0]}])
    for _ in range(args.warmup_runs):
        for b in ([1] if not args.skip_baseline else []) + ([block_size] if block_size > 1 else []):
            decoder.generate(input_ids, min(args.max_new_tokens, 64), temperature=args.temperature,
                             block_size=b, collect_profile=args.collect_profile,
                             **bench.sampling_kwargs(args))


def run_sample(decoder, pair, prompt, args, block_size) -> dict:
    """One unit: the prompt's baseline and speculative generations, measured."""
    baseline_only = block_size == 1
    seed = bench.sample_seed(args.seed, prompt["id"])
    rec = {"id": prompt["id"], "dataset": args.dataset, "category": prompt["category"]}
    base = base_texts = spec = None
    if not args.skip_baseline:
        base, base_texts = _generate_turns(decoder, pair, prompt, args, 1, seed, False)
        rec["baseline"] = measure(base)
    if not baseline_only:
        spec, texts = _generate_turns(decoder, pair, prompt, args, block_size, seed,
                                      args.collect_profile)
        rec["speculative"] = measure(spec, block_size)
        rec["output_text"] = texts
        if base is not None and args.temperature == 0:
            rec["greedy_match"] = [r.output_ids for r in base] == [r.output_ids for r in spec]
            rec["first_divergence"] = _first_divergence(base, spec)
    else:
        rec["output_text"] = base_texts
    rec["prompt_tokens"] = (spec if spec is not None else base)[0].prompt_len
    return rec


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    # -- everything below up to init_distributed only reads: a refusal leaves no file behind
    here = bench.dist_from_env()
    device = pick_device(args.device, here.local_rank)
    model_name, draft_name = resolve_models(args, device)
    baseline_only = args.block_size == 1
    draft_used = None if baseline_only else draft_name
    planned_block = 1 if baseline_only else args.block_size
    if planned_block is None:
        cfg = bench.local_config(draft_name, "draft")
        planned_block = int(cfg.get("block_size", 16)) if cfg is not None else None
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    planned = run_config(args, model_name, draft_used, resolve_dtype(args.dtype, default_dtype),
                         planned_block)
    out_jsonl = args.save_outputs_path
    if planned_block is not None or args.output_json or out_jsonl:
        bench.check_writable(default_summary_path(args, planned_block), "summary path")
    else:
        bench.check_writable("outputs/benchmark.json", "summary path")
    runlog.precheck(out_jsonl, planned, args.resume,
                    unknown=() if planned_block is not None else ("block_size",))

    dist = bench.init_distributed(args.device)
    if dist.main and device.type != "cuda" and (args.model_name_or_path is None
                                                or args.draft_name_or_path is None):
        bench.default_model_names(args.model_name_or_path, args.draft_name_or_path, device)
    prompts, source, pair = runner.load_inputs(args, dist, device, model_name, draft_used)
    block_size = 1 if baseline_only else (args.block_size or pair.draft.block_size)
    torch.manual_seed(args.seed)
    config = run_config(args, pair.target_name, pair.draft_name, pair.dtype, block_size)
    engine, engine_text = runner.resolve_engine(args, pair)
    decoder = SpeculativeDecoder(pair.target, pair.draft, engine=engine)
    return runner.run_sharded(
        args, dist, prompts, config, default_summary_path(args, block_size),
        run_one=lambda prompt: run_sample(decoder, pair, prompt, args, block_size),
        warm_up=lambda todo: warm_up(decoder, pair, todo, args, block_size),
        summarize=lambda records, status: {**build_summary(args, config, records, device, source,
                                                           dist.world, status),
                                            "engine": engine_text},
        report=print_summary, progress=True)


def _first_divergence(base, spec):
    for rb, rs in zip(base, spec):
        for i, (a, b) in enumerate(zip(rb.output_ids, rs.output_ids)):
            if a != b:
                return i
        if len(rb.output_ids) != len(rs.output_ids):
            return min(len(rb.output_ids), len(rs.output_ids))
    return None


def build_summary(args, config, records, device, source, world, status: dict) -> dict:
    """``status``: :func:`dflash.bench.units.run_status` of the run (complete, ...)."""
    ok = [r for r in records if "error" not in r]
    base = summarize([r.get("baseline") for r in ok])
    spec = summarize([r.get("speculative") for r in ok])
    matches = [r["greedy_match"] for r in ok if "greedy_match" in r]
    summary = {
        "config": config,
        "dataset_source": source,
        "world_size": world,
        **status,
        "sample_ids": [r["id"] for r in records],
        "baseline": base,
        "speculative": spec,
        "speedup": speedup(base, spec),
        "wall_speedup": (base["total_wall_s"] / spec["total_wall_s"])
        if base and spec and spec["total_wall_s"] > 0 else None,
        "greedy_match_rate": sum(matches) / len(matches) if matches else None,
        "environment": bench.environment_info(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "per_sample": [{k: v for k, v in r.items() if k != "output_text"} for r in records],
    }
    return summary


def print_summary(s: dict, path: str) -> None:
    env, cfg = s["environment"], s["config"]
    lines = [
        "",
        *bench.title_lines(s, "DFlash benchmark", f"block size {cfg['block_size']}"),
        f"hardware: {env['gpu_name']} | CUDA {env['cuda_version']} | torch {env['torch_version']}"
        f" | transformers {env['transformers_version']}",
    ]
    rows = [("", "baseline", "speculative")]

    def cell(mode, key, fmt):
        m = s.get(mode)
        return fmt.format(m[key]) if m and m.get(key) is not None else "-"

    for label, key, fmt in [("TPOT (ms)", "tpot", "{:.2f}"), ("TTFT (ms)", "ttft", "{:.2f}"),
                            ("total_wall_s", "total_wall_s", "{:.2f}"),
                            ("tokens_per_sec", "tokens_per_sec", "{:.1f}"),
                            ("tokens", "tokens", "{}"), ("tau", "tau", "{:.2f}")]:
        if key in ("tpot", "ttft"):
            rows.append((label, *(("{:.2f}".format(1000 * s[m][key]) if s.get(m) else "-")
                                  for m in ("baseline", "speculative"))))
        else:
            rows.append((label, cell("baseline", key, fmt), cell("speculative", key, fmt)))
    width = max(len(r[0]) for r in rows)
    for r in rows:
        lines.append(f"  {r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}")
    if s["speedup"] is not None:
        lines.append(f"decoding speedup (TPOT): {s['speedup']:.2f}x | wall-clock speedup: "
                     f"{s['wall_speedup']:.2f}x")
    if s.get("speculative"):
        spec = s["speculative"]
        lines.append(f"average acceptance length tau: {spec['tau']:.2f}")
        lines.append(f"acceptance histogram: {format_histogram(spec['acceptance_histogram'])}")
        if "draft_ms_per_cycle" in spec:
            lines.append(f"per cycle: draft {spec['draft_ms_per_cycle']:.2f} ms, verify "
                         f"{spec['verify_ms_per_cycle']:.2f} ms")
    if s["greedy_match_rate"] is not None:
        lines.append(f"greedy outputs identical to baseline: {100 * s['greedy_match_rate']:.0f}% of samples")
    lines += units.closing_lines(s, path)
    print("\n".join(lines))
