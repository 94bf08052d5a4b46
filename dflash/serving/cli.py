"""Flags of benchmark_sglang.py: the parser, validation before anything starts, output paths,
and the run identity that --resume compares. No torch, no network."""
from __future__ import annotations

import argparse
import math
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CliArgumentParser, UserError, parse_int_list

LAUNCH_ENV_VAR = "DFLASH_SGLANG_LAUNCH_CMD"
ENGINES = ("sglang", "vllm", "openai")
DEFAULT_BACKENDS = "flashinfer,fa3,fa4"
KNOWN_BACKENDS = ("flashinfer", "fa3", "fa4", "triton", "trtllm_mha", "torch_native",
                  "flex_attention", "flashmla", "cutlass_mla", "aiter", "wave", "ascend")
MIN_SGLANG = (0, 5, 11)
# Environment every launched server gets unless the user already set it (see the reference).
LAUNCH_ENV_DEFAULTS = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
MODES = ("baseline", "dflash")
MODE_LABEL = {"baseline": "baseline", "dflash": "DFLASH"}
# Run settings that must match for --resume to add results to an existing log.
IDENTITY_KEYS = ("dataset_name", "target_model", "draft_model", "tokenizer", "chat_template",
                 "enable_thinking", "max_new_tokens", "temperature",
                 "questions_per_concurrency_base", "max_questions_per_config", "block_size",
                 "dtype", "mem_fraction_static", "max_running_requests", "tp_size",
                 "disable_radix_cache", "batch_requests", "stream", "seed", "ignore_eos",
                 "server_args", "top_p", "top_k")
# What a log written before a key existed meant by it (--resume compares against these).
IDENTITY_DEFAULTS = {"top_p": 1.0, "top_k": 0}
LOG_VERSION = 1


# The messages this flag has always printed (tests and docs quote them).
CONCURRENCY_WORDING = {"not_int": "{name}: '{item}' is not an integer",
                       "below": "{name}: {value} is not a positive integer",
                       "twice": "{name}: {value} is listed twice",
                       "hint": "use comma-separated positive integers, e.g. {example}"}


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = CliArgumentParser(
        prog="benchmark_sglang.py",
        description="Throughput of SGLang with and without DFLASH speculative decoding, over a "
                    "sweep of concurrencies and attention backends.")
    g = p.add_argument_group("what to run")
    g.add_argument("--engine", choices=ENGINES, default="sglang",
                   help="sglang: native /generate (default); vllm: `vllm serve` launched here "
                        "or --base-url, OpenAI /v1/completions, acceptance from /metrics; "
                        "openai: any OpenAI-compatible server at --base-url (llama.cpp...)")
    g.add_argument("--dataset-name", default="aime25",
                   help="prompt set (dflash.datasets names, e.g. aime25, gsm8k, builtin-math)")
    g.add_argument("--target-model", help="target model (hub id or path); required unless "
                                          "--base-url")
    g.add_argument("--draft-model", help="DFlash draft model (hub id or path); required unless "
                                         "--base-url")
    g.add_argument("--concurrencies", default="1,2,4,8,16,32",
                   help="comma-separated requests in flight (default %(default)s)")
    g.add_argument("--questions-per-concurrency-base", type=int, default=8,
                   help="n = min(base * concurrency, max per config) prompts per concurrency")
    g.add_argument("--max-questions-per-config", type=int, default=64)
    g.add_argument("--max-new-tokens", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass sent with each request (0 < p <= 1; default 1 = "
                        "off; ignored at temperature 0)")
    g.add_argument("--top-k", type=int, default=0,
                   help="top-k sent with each request (default 0 = off; ignored at "
                        "temperature 0)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens")
    g.add_argument("--seed", type=int, default=0, help="server --random-seed (default 0)")
    g.add_argument("--skip-baseline", action="store_true", help="only run DFLASH servers")
    g.add_argument("--batch-requests", action="store_true",
                   help="send each group of `concurrency` prompts as one batched /generate "
                        "request instead of `concurrency` parallel requests")
    g.add_argument("--stream", action="store_true", help="stream responses (adds TTFT/TPOT)")
    g = p.add_argument_group("prompt formatting")
    g.add_argument("--tokenizer", help="tokenizer for the chat template (default: the target)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="send the raw prompt text (no tokenizer needed)")
    g.add_argument("--enable-thinking", action="store_true",
                   help="pass enable_thinking=True to the chat template (Qwen3); default off")
    g = p.add_argument_group("server")
    g.add_argument("--attention-backends", default=DEFAULT_BACKENDS,
                   help="comma-separated; those the GPU cannot run are dropped (fa3 needs SM 90, "
                        "fa4 needs SM >= 100) (default %(default)s)")
    g.add_argument("--block-size", type=int, default=None,
                   help="DFLASH block size (--speculative-num-draft-tokens); default: the "
                        "draft's config")
    g.add_argument("--mem-fraction-static", type=float, default=0.75)
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--max-running-requests", type=int, default=64)
    g.add_argument("--tp-size", type=int, default=1)
    g.add_argument("--server-args", default="",
                   help="extra flags appended to every launch_server command (one string)")
    g.add_argument("--host", default="127.0.0.1", help="where launched servers listen")
    g.add_argument("--port", type=int, default=30000,
                   help="port of launched servers (0: pick a free one)")
    g.add_argument("--base-url", help="benchmark this already running server instead of "
                                      "launching one (needs neither sglang nor a GPU here)")
    g.add_argument("--timeout-s", type=float, default=3600.0,
                   help="limit for a server to become ready, and for one request")
    g.add_argument("--connect-wait-s", type=float, default=10.0,
                   help="with --base-url: how long to retry a server that cannot be connected "
                        "to (refused, unknown host) before giving up; raise it when the server "
                        "is still starting (default %(default)s; a server that answers but is "
                        "not ready yet is waited for up to --timeout-s)")
    g.add_argument("--server-log-dir", help="server logs (default: <output-md stem>_logs/)")
    g = p.add_argument_group("output")
    g.add_argument("--output-md", default="sglang_benchmark.md")
    g.add_argument("--output-json", help="default: <output-md stem>.json")
    g.add_argument("--results-jsonl", help="per-configuration log (default: <output-md "
                                           "stem>.jsonl); --resume continues it")
    g.add_argument("--resume", action="store_true",
                   help="skip configurations already in the results log")
    g.add_argument("--dry-run", action="store_true",
                   help="print the exact launch commands and exit")
    g.add_argument("--verbose", action="store_true")
    # hidden: tests and unusual setups
    p.add_argument("--server-cmd", help=argparse.SUPPRESS)
    p.add_argument("--stop-grace-s", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--poll-interval-s", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def parse_backends(text: str) -> list[str]:
    names = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if not part.replace("_", "").isalnum():
            raise UserError(f"--attention-backends: '{part}' is not a backend name",
                            "e.g. flashinfer,fa3,fa4")
        if part not in names:
            names.append(part)
    if not names:
        raise UserError("--attention-backends is empty", "e.g. flashinfer,fa3,fa4")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(None if argv is None else list(argv))
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Check every flag before anything starts; normalises lists and paths in place."""
    from ..datasets import check_dataset_name  # torch-free

    args.concurrency_list = parse_int_list(
        args.concurrencies, "--concurrencies", minimum=1, duplicates="refuse", example="1,2,4",
        wording=CONCURRENCY_WORDING)
    args.backend_list = parse_backends(args.attention_backends)
    check_dataset_name(args.dataset_name)
    positive_ints = [("--questions-per-concurrency-base", args.questions_per_concurrency_base),
                     ("--max-questions-per-config", args.max_questions_per_config),
                     ("--max-new-tokens", args.max_new_tokens),
                     ("--max-running-requests", args.max_running_requests),
                     ("--tp-size", args.tp_size)]
    if args.block_size is not None:
        positive_ints.append(("--block-size", args.block_size))
    for flag, value in positive_ints:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in [("--timeout-s", args.timeout_s), ("--stop-grace-s", args.stop_grace_s),
                        ("--poll-interval-s", args.poll_interval_s)]:
        if not (value > 0) or math.isinf(value):
            raise UserError(f"{flag} must be a positive number of seconds, got {value}")
    if not (args.connect_wait_s >= 0) or math.isinf(args.connect_wait_s):
        raise UserError(f"--connect-wait-s must be a number of seconds >= 0, got "
                        f"{args.connect_wait_s}")
    if not (0.0 < args.mem_fraction_static <= 1.0):
        raise UserError(f"--mem-fraction-static must be in (0, 1], got {args.mem_fraction_static}")
    if not (args.temperature >= 0.0) or math.isinf(args.temperature):
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    # the wording of dflash.decoding.sampling.check_sampling (which imports torch)
    if not (0.0 < args.top_p <= 1.0):  # also refuses NaN
        raise UserError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be an integer >= 0 (0 = off), got {args.top_k}")
    if args.engine != "sglang" and args.batch_requests:
        raise UserError(f"--batch-requests has no equivalent with --engine {args.engine}",
                        "it sends SGLang's batched /generate; drop it")
    if args.engine == "openai" and not args.base_url:
        raise UserError("--engine openai benchmarks a running server: pass --base-url",
                        "this script launches servers only for --engine sglang or vllm")
    if args.stream and args.batch_requests:
        raise UserError("--stream cannot be combined with --batch-requests",
                        "batched /generate requests are not streamed; drop one of them")
    if not (0 <= args.port <= 65535):
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.dtype not in ("auto", "bfloat16", "float16", "half", "float32", "float"):
        raise UserError(f"--dtype '{args.dtype}' is not one of auto, bfloat16, float16, float32")
    try:
        args.server_arg_list = shlex.split(args.server_args or "")
    except ValueError as err:
        raise UserError(f"--server-args cannot be parsed ({err})") from None
    if args.base_url:
        parsed = urllib.parse.urlparse(args.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"--base-url '{args.base_url}' is not an http(s) URL",
                            "e.g. http://127.0.0.1:30000")
        args.base_url = args.base_url.rstrip("/")
    else:
        for flag, value in [("--target-model", args.target_model),
                            ("--draft-model", args.draft_model)]:
            if not value:
                raise UserError(f"{flag} is required to launch servers",
                                "or pass --base-url to benchmark a running server")
    if not args.output_md.strip():
        raise UserError("--output-md must not be empty")
    check_output_locations(args)
    args.tokenizer_path = args.tokenizer or args.target_model
    if args.no_chat_template:
        args.tokenizer_path = None
    elif not args.tokenizer_path:
        raise UserError("no tokenizer for the chat template: pass --tokenizer PATH (or "
                        "--target-model), or --no-chat-template")
    unknown = [b for b in args.backend_list if b not in KNOWN_BACKENDS]
    args.startup_warnings = [f"attention backend '{b}' is not one this script knows; passing it "
                             f"to sglang as is" for b in unknown]
    big = [c for c in args.concurrency_list if c > args.max_running_requests]
    if big and not args.base_url:
        args.startup_warnings.append(
            f"concurrency {big} exceeds --max-running-requests {args.max_running_requests}: the "
            f"server queues the extra requests")


@dataclass
class Paths:
    md: Path
    json: Path
    jsonl: Path
    png: Path
    logs: Path


def output_paths(args: argparse.Namespace) -> Paths:
    md = Path(args.output_md)
    stem = md.with_suffix("") if md.suffix.lower() == ".md" else md
    return Paths(md=md,
                 json=Path(args.output_json) if args.output_json else stem.with_suffix(".json"),
                 jsonl=Path(args.results_jsonl) if args.results_jsonl
                 else stem.with_suffix(".jsonl"),
                 png=stem.with_suffix(".png"),
                 logs=Path(args.server_log_dir) if args.server_log_dir
                 else stem.parent / (stem.name + "_logs"))


def check_output_locations(args: argparse.Namespace) -> None:
    """Every file the run writes can be written, and no two of them are the same file,
    before anything starts (a parent that is a regular file, a report path that is a
    folder...). Creates nothing."""
    from ..runlog import check_writable, check_writable_dir

    paths = output_paths(args)
    derived = "(from --output-md)"
    files = [("--output-md", paths.md),
             ("--output-json" if args.output_json else f"report JSON {derived}", paths.json),
             ("--results-jsonl" if args.results_jsonl else f"results log {derived}", paths.jsonl),
             (f"plot {derived}", paths.png)]
    seen: dict[Path, str] = {}
    for flag, path in files:
        check_writable(path, flag)
        key = path.expanduser().resolve()
        if key in seen:
            raise UserError(f"{flag} and {seen[key]} are the same file ({path})",
                            "give each output its own path")
        seen[key] = flag
    if not args.base_url:
        check_writable_dir(paths.logs, "--server-log-dir" if args.server_log_dir
                           else f"server log folder {derived}")


def identity_of(args: argparse.Namespace) -> dict:
    values = {
        "dataset_name": args.dataset_name, "target_model": args.target_model,
        "draft_model": args.draft_model, "tokenizer": args.tokenizer_path,
        "chat_template": not args.no_chat_template, "enable_thinking": args.enable_thinking,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "questions_per_concurrency_base": args.questions_per_concurrency_base,
        "max_questions_per_config": args.max_questions_per_config,
        "block_size": args.block_size, "dtype": args.dtype,
        "mem_fraction_static": args.mem_fraction_static,
        "max_running_requests": args.max_running_requests, "tp_size": args.tp_size,
        "disable_radix_cache": args.disable_radix_cache, "batch_requests": args.batch_requests,
        "stream": args.stream, "seed": args.seed, "ignore_eos": args.ignore_eos,
        "server_args": args.server_arg_list, "top_p": args.top_p, "top_k": args.top_k}
    return {k: values[k] for k in IDENTITY_KEYS}


def n_prompts(args: argparse.Namespace, concurrency: int) -> int:
    return min(args.questions_per_concurrency_base * concurrency, args.max_questions_per_config)


