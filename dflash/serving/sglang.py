"""SGLang DFlash throughput benchmark: launch servers, sweep concurrency, report.

For every attention backend the GPU can run, this launches ``python -m sglang.launch_server``
twice (baseline, then ``--speculative-algorithm DFLASH``), waits until the server is ready,
warms it up, and for every concurrency ``c`` sends ``n = min(base * c, max_per_config)``
prompts with exactly ``c`` requests in flight. It measures output tokens/s, requests/s,
latency percentiles (TTFT/TPOT with ``--stream``) and the acceptance length that SGLang reports
per request (``meta_info.spec_accept_length``), and writes a Markdown report, a JSON report,
a PNG plot and a JSONL log of every finished configuration (``--resume`` continues from it).

``--base-url`` benchmarks a server that is already running (no sglang, no GPU needed here).
Only the standard library is needed for the client (urllib + threads); ``transformers`` is used
for the chat template, ``matplotlib`` for the plot, ``torch`` only to look at the GPU.

The launch command prefix (``python -m sglang.launch_server``) can be replaced with
``DFLASH_SGLANG_LAUNCH_CMD`` or the hidden ``--server-cmd`` flag (the tests point it at
``tests/fake_sglang_server.py``).
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import http.client
import importlib.util
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_cli

LAUNCH_ENV_VAR = "DFLASH_SGLANG_LAUNCH_CMD"
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
                 "server_args")
LOG_VERSION = 1


# ----------------------------------------------------------------------------- flags

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the shared error style), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message, "see --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="benchmark_sglang.py",
        description="Throughput of SGLang with and without DFLASH speculative decoding, over a "
                    "sweep of concurrencies and attention backends.")
    g = p.add_argument_group("what to run")
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


def parse_int_list(text: str, flag: str) -> list[int]:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{flag}: '{part}' is not an integer",
                            "use comma-separated positive integers, e.g. 1,2,4") from None
        if value < 1:
            raise UserError(f"{flag}: {value} is not a positive integer",
                            "use comma-separated positive integers, e.g. 1,2,4")
        if value in values:
            raise UserError(f"{flag}: {value} is listed twice")
        values.append(value)
    if not values:
        raise UserError(f"{flag} is empty", "e.g. 1,2,4")
    return values


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
    from ..datasets import check_dataset_name

    args.concurrency_list = parse_int_list(args.concurrencies, "--concurrencies")
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
        "server_args": args.server_arg_list}
    return {k: values[k] for k in IDENTITY_KEYS}


def n_prompts(args: argparse.Namespace, concurrency: int) -> int:
    return min(args.questions_per_concurrency_base * concurrency, args.max_questions_per_config)


# ----------------------------------------------------------------------------- launch commands

def launch_prefix(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The command that replaces ``python -m sglang.launch_server``, and whether overridden."""
    override = args.server_cmd or os.environ.get(LAUNCH_ENV_VAR)
    if override:
        try:
            prefix = shlex.split(override)
        except ValueError as err:
            raise UserError(f"the launch command override cannot be parsed ({err})") from None
        if not prefix:
            raise UserError("the launch command override is empty")
        return prefix, True
    return [sys.executable, "-m", "sglang.launch_server"], False


def launch_command(args: argparse.Namespace, mode: str, backend: str, port: int,
                   prefix: list[str]) -> list[str]:
    cmd = list(prefix) + ["--model-path", args.target_model]
    if mode == "dflash":
        cmd += ["--speculative-algorithm", "DFLASH",
                "--speculative-draft-model-path", args.draft_model]
        if args.block_size is not None:
            cmd += ["--speculative-num-draft-tokens", str(args.block_size)]
    cmd += ["--attention-backend", backend, "--tp-size", str(args.tp_size),
            "--dtype", args.dtype, "--mem-fraction-static", f"{args.mem_fraction_static:g}",
            "--max-running-requests", str(args.max_running_requests),
            "--random-seed", str(args.seed), "--trust-remote-code",
            "--host", args.host, "--port", str(port)]
    if args.disable_radix_cache:
        cmd.append("--disable-radix-cache")
    return cmd + list(args.server_arg_list)


def launch_env_additions() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in LAUNCH_ENV_DEFAULTS.items()}


def shell_line(cmd: list[str], env: dict[str, str] | None = None) -> str:
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + shlex.join(cmd)


# ----------------------------------------------------------------------------- GPU / sglang

@dataclass
class GpuInfo:
    available: bool
    reason: str = ""
    name: str | None = None
    sm: int | None = None
    count: int = 0


def detect_gpu() -> GpuInfo:
    if importlib.util.find_spec("torch") is None:
        return GpuInfo(False, "torch is not installed, so no CUDA GPU can be used")
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - a broken torch is "no GPU" for us
        return GpuInfo(False, f"torch cannot be imported ({type(err).__name__})")
    try:
        if not torch.cuda.is_available():
            return GpuInfo(False, "no CUDA GPU is visible (torch.cuda.is_available() is False)")
        major, minor = torch.cuda.get_device_capability(0)
        return GpuInfo(True, "", torch.cuda.get_device_name(0), major * 10 + minor,
                       torch.cuda.device_count())
    except Exception as err:  # noqa: BLE001
        return GpuInfo(False, f"the CUDA GPU cannot be queried ({type(err).__name__}: {err})")


def sglang_version() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return None
    try:
        from importlib.metadata import version
        return version("sglang")
    except Exception:  # noqa: BLE001 - installed from source without metadata
        return "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def backend_requirement(backend: str, sm: int) -> str | None:
    """Why ``backend`` cannot run on a GPU of compute capability ``sm`` (None: it can)."""
    if backend == "fa3" and sm != 90:
        return f"fa3 needs SM 90 (Hopper); this GPU is SM {sm}"
    if backend == "fa4" and sm < 100:
        return f"fa4 needs SM >= 100 (Blackwell); this GPU is SM {sm}"
    return None


def filter_backends(backends: list[str], gpu: GpuInfo | None) -> tuple[list[str], list[str]]:
    """(kept, notes about dropped ones). Unknown GPU: keep all."""
    if gpu is None or not gpu.available or gpu.sm is None:
        return list(backends), []
    kept, notes = [], []
    for b in backends:
        why = backend_requirement(b, gpu.sm)
        if why:
            notes.append(f"dropping attention backend {b}: {why}")
        else:
            kept.append(b)
    return kept, notes


def check_launch_environment(args: argparse.Namespace, overridden: bool) -> GpuInfo | None:
    """Make sure servers can be launched here; return the GPU (None when unknown)."""
    if overridden:  # a custom launcher (tests, containers...): trust it, filter if we can
        gpu = detect_gpu()
        return gpu if gpu.available else None
    version = sglang_version()
    gpu = detect_gpu()
    problems = []
    if version is None:
        problems.append(f"sglang is not installed in this Python ({sys.executable})")
    if not gpu.available:
        problems.append(gpu.reason)
    if problems:
        raise UserError("SGLang needs a CUDA GPU and the sglang package: " + "; ".join(problems),
                        "run this on a GPU machine in the SGLang environment (docs/SGLANG.md: pip "
                        "install -r requirements-sglang.txt), or pass --base-url to benchmark a "
                        "running server")
    if version != "unknown" and _version_tuple(version) and \
            _version_tuple(version) < MIN_SGLANG:
        raise UserError(f"sglang {version} has no DFLASH speculative algorithm",
                        "install sglang>=0.5.11 (pip install -r requirements-sglang.txt)")
    if args.tp_size > gpu.count:
        raise UserError(f"--tp-size {args.tp_size} needs {args.tp_size} GPUs; {gpu.count} visible")
    return gpu


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"port {port} on {host} is already in use ({err.strerror})",
                            "pass --port with a free port (--port 0 picks one), or --base-url to "
                            "benchmark the server that holds it") from None


def pick_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_port_free(host, port)
            return
        except UserError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ----------------------------------------------------------------------------- HTTP

class RequestFailed(Exception):
    """One request failed; the message is one line. ``unreachable``: no connection was made
    (refused, unknown host, no route, connect timeout, TLS failure), as opposed to a server
    that answered badly, dropped the connection or was slow."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _is_unreachable(err: BaseException) -> bool:
    """urllib wraps errors of opening the connection (and sending the request) in URLError;
    a slow or dropped answer is raised as is."""
    if not isinstance(err, urllib.error.URLError) or isinstance(err, urllib.error.HTTPError):
        return False
    return not isinstance(err.reason, (ConnectionResetError, BrokenPipeError,
                                       http.client.RemoteDisconnected))


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _describe_error(err: BaseException, timeout: float) -> str:
    if isinstance(err, urllib.error.HTTPError):
        try:
            body = err.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            body = ""
        body = " ".join(body.split())[:200]
        return f"HTTP {err.code}" + (f": {body}" if body else "")
    if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                        BrokenPipeError, http.client.IncompleteRead)):
        return f"connection dropped by the server ({type(err).__name__})"
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected)):
            return f"connection dropped by the server ({type(reason).__name__})"
        return f"cannot connect ({reason})"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def http_call(method: str, url: str, payload=None, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send one request; returns (status, body) for any HTTP status; raises RequestFailed on
    transport errors (refused, dropped, timeout)."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with _opener_for(url).open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        try:
            body = err.read()
        except Exception:  # noqa: BLE001
            body = b""
        return err.code, body
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise RequestFailed(_describe_error(err, timeout), _is_unreachable(err)) from None


def check_reachable(base_url: str, wait_s: float, poll_s: float) -> None:
    """Something answers HTTP at ``base_url``: connections that cannot be made are retried
    for ``wait_s`` seconds, then refused in one line (exit 2). Any HTTP answer, or a slow
    one, counts as reachable: whether the server is ready is decided later, within
    --timeout-s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            http_call("GET", base_url + "/health", timeout=10.0)
            return
        except RequestFailed as err:
            if not err.unreachable:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" for {wait_s:g} s" if wait_s > 0 else ""
                raise UserError(f"--base-url {base_url}: no server could be reached{waited} "
                                f"({err})",
                                "start the server first or fix the URL; --connect-wait-s N "
                                "waits longer for one that is still starting. Nothing was "
                                "run or written") from None
            time.sleep(min(poll_s, left))


def check_ready_once(base_url: str, timeout: float) -> tuple[bool, str]:
    """(ready, what was seen). /health_generate first; /health when that route is missing."""
    last = ""
    for route in ("/health_generate", "/health"):
        try:
            status, _ = http_call("GET", base_url + route, timeout=timeout)
        except RequestFailed as err:
            return False, str(err)
        if status == 200:
            return True, f"{route} 200"
        last = f"{route} HTTP {status}"
        if status != 404:
            return False, last
    return False, last


def flush_cache(base_url: str, timeout: float = 60.0) -> str | None:
    """GET /flush_cache, retried while the server still has requests; a warning or None."""
    last = ""
    for _ in range(10):
        try:
            status, body = http_call("GET", base_url + "/flush_cache", timeout=timeout)
        except RequestFailed as err:
            return f"/flush_cache failed: {err}"
        if status == 200:
            return None
        last = f"HTTP {status}: {' '.join(body.decode('utf-8', 'replace').split())[:120]}"
        time.sleep(0.5)
    return f"/flush_cache did not succeed ({last}); the prefix cache may carry over"


def get_server_info(base_url: str, timeout: float = 30.0) -> dict | None:
    for route in ("/server_info", "/get_server_info"):
        try:
            status, body = http_call("GET", base_url + route, timeout=timeout)
        except RequestFailed:
            return None
        if status == 200:
            try:
                info = json.loads(body)
            except ValueError:
                return None
            return info if isinstance(info, dict) else None
    return None


def server_avg_accept_length(info: dict | None) -> float | None:
    try:
        value = (info or {}).get("internal_states", [{}])[0].get("avg_spec_accept_length")
    except (AttributeError, IndexError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------------- server processes

_LIVE: set["ServerProcess"] = set()
_LIVE_LOCK = threading.Lock()


def stop_all_servers() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


atexit.register(stop_all_servers)


def _die_with_parent_fn():
    """Linux: a preexec_fn asking the kernel to SIGKILL the server if this process dies
    without cleaning up (kill -9); sglang's own workers watch their parent. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def fn():
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return fn


class ServerProcess:
    """A launched server in its own process group; ``stop`` kills the whole group."""

    def __init__(self, cmd: list[str], env_add: dict[str, str], log_path: Path, host: str,
                 port: int, label: str, grace_s: float):
        self.cmd, self.env_add, self.log_path, self.label = cmd, env_add, log_path, label
        self.host, self.port, self.grace_s = host, port, grace_s
        self.url = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"# {_now()} launching: {shell_line(self.cmd, self.env_add)}\n"
                        .encode())
        self._log.flush()
        env = dict(os.environ, **self.env_add)
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent_fn())
        except OSError as err:
            self._log.close()
            raise UserError(f"cannot launch the {self.label} server: {self.cmd[0]}: "
                            f"{err.strerror or err}", "check the launch command (--dry-run)",
                            exit_code=1) from None
        with _LIVE_LOCK:
            _LIVE.add(self)

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float, poll: float) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        seen = ""
        while True:
            code = self.exit_code()
            if code is not None:
                print_log_tail(self.log_path)
                raise UserError(f"the {self.label} server exited with code {code} before it was "
                                f"ready (log: {self.log_path})", exit_code=1)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                print_log_tail(self.log_path)
                raise UserError(f"the {self.label} server was not ready after {timeout:g} s at "
                                f"{self.url} (last check: {seen or 'no answer'}; log: "
                                f"{self.log_path})", "raise --timeout-s if loading is slow",
                                exit_code=1)
            ok, seen = check_ready_once(self.url, timeout=max(0.5, min(30.0, remaining)))
            if ok:
                return time.monotonic() - t0
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _group_members(self) -> list[int]:
        try:
            import psutil
        except ImportError:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - already gone
            return []

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after the grace period."""
        if self.proc is None:
            return
        proc = self.proc
        descendants = self._group_members()  # also those that left the group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        for sig_target in ("group", *descendants):
            try:
                if sig_target == "group":
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    os.kill(sig_target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self.proc = None


def print_log_tail(path: Path, lines: int = 25) -> None:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            tail = fh.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return
    print(f"---- last {len(tail)} lines of {path} ----", file=sys.stderr)
    for line in tail:
        print("  " + line, file=sys.stderr)
    print("----", file=sys.stderr)


# ----------------------------------------------------------------------------- prompts

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


# ----------------------------------------------------------------------------- requests

@dataclass
class RequestResult:
    latency: float
    completion_tokens: int
    prompt_tokens: int
    ttft: float | None = None
    accept_length: float | None = None
    accept_source: str | None = None
    verify_ct: int | None = None
    accepted_drafts: int | None = None
    proposed_drafts: int | None = None
    server_e2e: float | None = None


def _first_number(meta: dict, names: Sequence[str]):
    for name in names:
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def read_meta(meta: dict, latency: float, ttft: float | None) -> RequestResult:
    """Turn one response's meta_info into a RequestResult, reading fields defensively (names
    changed between sglang releases; the spec fields are absent when spec_verify_ct is 0)."""
    if not isinstance(meta, dict):
        raise RequestFailed("response has no meta_info")
    completion = _first_number(meta, ["completion_tokens"])
    if completion is None:
        raise RequestFailed("response meta_info has no completion_tokens")
    verify = _first_number(meta, ["spec_verify_ct"])
    accept = _first_number(meta, ["spec_accept_length", "accept_length"])
    source = "spec_accept_length" if accept is not None and accept > 0 else None
    if source is None:
        accept = None
        if verify:
            accept, source = completion / verify, "completion_tokens/spec_verify_ct"
    return RequestResult(
        latency=latency, completion_tokens=int(completion),
        prompt_tokens=int(_first_number(meta, ["prompt_tokens"]) or 0), ttft=ttft,
        accept_length=float(accept) if accept is not None else None, accept_source=source,
        verify_ct=int(verify) if verify is not None else None,
        accepted_drafts=_first_number(meta, ["spec_accepted_drafts", "spec_num_correct_drafts"]),
        proposed_drafts=_first_number(meta, ["spec_proposed_drafts", "spec_num_proposed_drafts"]),
        server_e2e=_first_number(meta, ["e2e_latency"]))


def sampling_params(args: argparse.Namespace) -> dict:
    params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    if args.temperature == 0:
        params.update(top_p=1.0, top_k=1)
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def send_generate(base_url: str, text, params: dict, timeout: float,
                  stream: bool = False) -> list[RequestResult]:
    """POST /generate with one prompt (or a batched list); one RequestResult per prompt."""
    payload = {"text": text, "sampling_params": params}
    if stream and isinstance(text, str):
        return [_send_streaming(base_url, payload, timeout)]
    t0 = time.perf_counter()
    status, body = http_call("POST", base_url + "/generate", payload, timeout=timeout)
    latency = time.perf_counter() - t0
    if status != 200:
        snippet = " ".join(body.decode("utf-8", "replace").split())[:200]
        raise RequestFailed(f"HTTP {status}" + (f": {snippet}" if snippet else ""))
    try:
        data = json.loads(body)
    except ValueError:
        raise RequestFailed("the response is not JSON") from None
    items = data if isinstance(data, list) else [data]
    if isinstance(text, list) and len(items) != len(text):
        raise RequestFailed(f"{len(text)} prompts sent, {len(items)} answers received")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise RequestFailed("an answer is not a JSON object")
        if "error" in item and "meta_info" not in item:
            raise RequestFailed(f"server error: {str(item['error'])[:200]}")
        out.append(read_meta(item.get("meta_info"), latency, None))
    return out


def _send_streaming(base_url: str, payload: dict, timeout: float) -> RequestResult:
    payload = dict(payload, stream=True)
    req = urllib.request.Request(base_url + "/generate", data=json.dumps(payload).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    last = None
    try:
        with _opener_for(base_url).open(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise RequestFailed("a streamed chunk is not JSON") from None
                if isinstance(obj, dict) and "error" in obj and "meta_info" not in obj:
                    raise RequestFailed(f"server error: {str(obj['error'])[:200]}")
                if first is None:
                    first = time.perf_counter() - t0
                last = obj
    except urllib.error.HTTPError as err:
        raise RequestFailed(_describe_error(err, timeout)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise RequestFailed(_describe_error(err, timeout)) from None
    latency = time.perf_counter() - t0
    if last is None:
        raise RequestFailed("the stream ended without any data")
    return read_meta(last.get("meta_info") if isinstance(last, dict) else None, latency, first)


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration: float
    max_inflight: int


def run_load(base_url: str, prompts: list[str], concurrency: int, args: argparse.Namespace,
             label: str) -> LoadRun:
    """Send every prompt with exactly ``concurrency`` in flight (or in one batch at a time with
    --batch-requests); the first failure stops the run and raises RequestFailed."""
    params = sampling_params(args)
    n = len(prompts)
    if args.batch_requests:
        units = [list(range(i, min(i + concurrency, n))) for i in range(0, n, concurrency)]
        workers = 1
    else:
        units = [[i] for i in range(n)]
        workers = min(concurrency, n)
    results: list[RequestResult | None] = [None] * n
    lock = threading.Lock()
    state = {"next": 0, "inflight": 0, "max": 0}
    failures: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if state["next"] >= len(units):
                    return
                unit = units[state["next"]]
                state["next"] += 1
                state["inflight"] += len(unit)
                state["max"] = max(state["max"], state["inflight"])
            try:
                text = [prompts[i] for i in unit] if args.batch_requests else prompts[unit[0]]
                got = send_generate(base_url, text, params, args.timeout_s, args.stream)
            except RequestFailed as err:
                with lock:
                    what = (f"batch of requests {unit[0] + 1}-{unit[-1] + 1}"
                            if args.batch_requests else f"request {unit[0] + 1}")
                    kind = "warm-up " if label == "warmup" else ""
                    failures.append(f"{kind}{what} of {n} failed: {err}")
                stop.set()
                return
            except Exception as err:  # noqa: BLE001 - report, do not hang the run
                with lock:
                    failures.append(f"request {unit[0] + 1} of {n} failed: "
                                    f"{type(err).__name__}: {err}")
                stop.set()
                return
            finally:
                with lock:
                    state["inflight"] -= len(unit)
            for i, res in zip(unit, got):
                results[i] = res

    threads = [threading.Thread(target=worker, name=f"bench-{label}-{k}", daemon=True)
               for k in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short joins so Ctrl-C / SIGTERM reach the main thread
    duration = time.perf_counter() - t0
    if failures:
        raise RequestFailed(failures[0])
    return LoadRun([r for r in results if r is not None], duration, state["max"])


# ----------------------------------------------------------------------------- metrics

def percentile(values: Sequence[float], q: float) -> float | None:
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def summarize(run: LoadRun, mode: str) -> tuple[dict, list[str]]:
    """Metrics of one configuration (sglang.bench_serving field names), and warnings."""
    res = run.results
    n = len(res)
    out_tokens = sum(r.completion_tokens for r in res)
    lat = [r.latency for r in res]
    m = {"completed": n, "duration": run.duration, "max_inflight": run.max_inflight,
         "total_input_tokens": sum(r.prompt_tokens for r in res),
         "total_output_tokens": out_tokens,
         "output_throughput": out_tokens / run.duration if run.duration > 0 else None,
         "request_throughput": n / run.duration if run.duration > 0 else None,
         "mean_e2e_latency_ms": _ms(sum(lat) / n) if n else None,
         "median_e2e_latency_ms": _ms(percentile(lat, 0.5)),
         "p99_e2e_latency_ms": _ms(percentile(lat, 0.99))}
    ttft = [r.ttft for r in res if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in res
            if r.ttft is not None and r.completion_tokens > 1]
    for name, vals in (("ttft", ttft), ("tpot", tpot)):
        m[f"mean_{name}_ms"] = _ms(sum(vals) / len(vals)) if vals else None
        m[f"median_{name}_ms"] = _ms(percentile(vals, 0.5))
        m[f"p99_{name}_ms"] = _ms(percentile(vals, 0.99))
    acc = [r.accept_length for r in res if r.accept_length is not None]
    m["accept_length"] = sum(acc) / len(acc) if acc else None
    m["accept_length_n"] = len(acc)
    sources = sorted({r.accept_source for r in res if r.accept_source})
    m["accept_length_source"] = ",".join(sources) or None
    verified = [r for r in res if r.verify_ct]
    m["accept_length_token_weighted"] = (
        sum(r.completion_tokens for r in verified) / sum(r.verify_ct for r in verified)
        if verified else None)
    acc_d = [r for r in res if r.accepted_drafts is not None and r.proposed_drafts]
    m["draft_accept_rate"] = (sum(r.accepted_drafts for r in acc_d)
                              / sum(r.proposed_drafts for r in acc_d)) if acc_d else None
    warnings = []
    if mode == "dflash" and n and not acc:
        warnings.append("the server sent no spec_accept_length (nor spec_verify_ct) in "
                        "meta_info; acceptance length reported as n/a")
    return m, warnings


# ----------------------------------------------------------------------------- results log

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """Append-only JSONL: a header record (the run configuration), then one record per
    finished configuration, each flushed and fsynced."""

    def __init__(self, path: Path, identity: dict, resume: bool, argv: list[str]):
        self.path = path
        self.identity = identity
        self.results: dict[tuple[str, str, int], dict] = {}
        self.notes: list[str] = []
        existing = self._read() if path.exists() else None
        if resume and existing is not None:
            header, results = existing
            if header is None:
                raise UserError(f"--resume: {path} has no header record",
                                "use another --output-md / --results-jsonl, or drop --resume")
            theirs = header.get("identity", {})
            diff = [f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now"
                    for k in IDENTITY_KEYS if theirs.get(k) != identity.get(k)]
            if diff:
                raise UserError(f"--resume: {path} was recorded with another configuration ("
                                + "; ".join(diff) + ")",
                                "rerun with the same flags, use another --output-md, or drop "
                                "--resume to start over")
            for rec in results:
                self.results[(rec["backend"], rec["mode"], int(rec["concurrency"]))] = rec
            self.notes.append(f"resuming {path}: {len(self.results)} configuration(s) already "
                              f"recorded")
            return
        if existing is not None:
            backup = path.with_name(path.name + ".bak")
            os.replace(path, backup)
            self.notes.append(f"moved the previous results log to {backup} (pass --resume to "
                              f"continue a run instead)")
        elif resume:
            self.notes.append(f"--resume: {path} does not exist yet; starting a new run")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"record": "header", "version": LOG_VERSION, "created": _now(),
                      "identity": identity, "argv": argv})

    def _read(self) -> tuple[dict | None, list[dict]]:
        header, results = None, []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash
                if not isinstance(rec, dict):
                    continue
                if rec.get("record") == "header" and header is None:
                    header = rec
                elif rec.get("record") == "result" and {"backend", "mode", "concurrency"} <= \
                        rec.keys():
                    results.append(rec)
        return header, results

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def has(self, backend: str, mode: str, concurrency: int) -> bool:
        return (backend, mode, concurrency) in self.results

    def add(self, rec: dict) -> None:
        rec = dict(rec, record="result")
        self._append(rec)
        self.results[(rec["backend"], rec["mode"], int(rec["concurrency"]))] = rec


# ----------------------------------------------------------------------------- reports

def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fmt(value, spec: str = ".1f", missing: str = "n/a") -> str:
    if value is None:
        return missing
    return format(value, spec)


class Reporter:
    def __init__(self, args: argparse.Namespace, paths: Paths, store: ResultStore,
                 settings: dict):
        self.args, self.paths, self.store, self.settings = args, paths, store, settings
        self.warnings: list[str] = []

    def backends(self) -> list[str]:
        names = [b for b in self.settings.get("attention_backends_run", [])]
        for (b, _, _) in self.store.results:
            if b not in names:
                names.append(b)
        return [b for b in names if any(k[0] == b for k in self.store.results)] or names

    def concurrencies(self, backend: str) -> list[int]:
        cs = set(self.args.concurrency_list)
        cs |= {c for (b, _, c) in self.store.results if b == backend}
        return sorted(cs)

    def summary(self) -> dict:
        out = {}
        for b in self.backends():
            per = {}
            for c in self.concurrencies(b):
                base = self.store.results.get((b, "baseline", c))
                spec = self.store.results.get((b, "dflash", c))
                bt = base.get("output_throughput") if base else None
                dt = spec.get("output_throughput") if spec else None
                per[str(c)] = {"baseline_output_throughput": bt, "dflash_output_throughput": dt,
                               "speedup": dt / bt if bt and dt else None,
                               "accept_length": spec.get("accept_length") if spec else None,
                               "baseline_measured": base is not None,
                               "dflash_measured": spec is not None}
            out[b] = per
        return out

    def to_json(self, status: str, error: str | None) -> dict:
        return {"status": status, "error": error, "settings": self.settings,
                "identity": self.store.identity,
                "results": [self.store.results[k] for k in sorted(
                    self.store.results, key=lambda k: (k[0], MODES.index(k[1])
                                                       if k[1] in MODES else 9, k[2]))],
                "summary": self.summary(), "warnings": self.warnings,
                "files": {"markdown": str(self.paths.md), "json": str(self.paths.json),
                          "results_jsonl": str(self.paths.jsonl), "plot": str(self.paths.png)}}

    def to_markdown(self, status: str, error: str | None, plot_ok: bool) -> str:
        s = self.settings
        lines = ["# SGLang DFlash throughput benchmark", ""]
        if status != "complete":
            lines += [f"**Status: {status}.** {error or ''} Configurations measured so far are "
                      f"below; rerun with `--resume` to continue.", ""]
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        for key, value in s.items():
            if key == "launch_commands":
                continue
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append(f"| {key} | {str(value).replace('|', '/')} |")
        lines.append("")
        summary = self.summary()
        for b, per in summary.items():
            cs = list(per)
            lines += [f"## Attention backend: {b}", "",
                      "| metric | " + " | ".join(f"c={c}" for c in cs) + " |",
                      "|---|" + "---:|" * len(cs)]
            def row(name, key, spec, suffix=""):
                cells = []
                for c in cs:
                    cell = per[c]
                    measured = cell["baseline_measured"] if key.startswith("baseline") else \
                        cell["dflash_measured"]
                    if key == "speedup":
                        measured = cell["baseline_measured"] and cell["dflash_measured"]
                    value = cell[key]
                    cells.append("not run" if not measured else
                                 (_fmt(value, spec) + suffix if value is not None else "n/a"))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            row("baseline tok/s", "baseline_output_throughput", ".1f")
            row("DFLASH tok/s", "dflash_output_throughput", ".1f")
            row("speedup", "speedup", ".2f", "x")
            row("acceptance length", "accept_length", ".2f")
            lines.append("")
            lines += ["Details (latencies in ms; acceptance length = per-request mean of "
                      "`meta_info.spec_accept_length`):", "",
                      "| mode | c | requests | output tokens | duration s | tok/s | req/s | "
                      "mean lat | p50 lat | p99 lat | mean TTFT | p99 TTFT | mean TPOT | "
                      "acceptance |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                      "---:|---:|---:|"]
            for mode in MODES:
                for c in self.concurrencies(b):
                    r = self.store.results.get((b, mode, c))
                    if not r:
                        continue
                    lines.append(
                        f"| {MODE_LABEL[mode]} | {c} | {r['completed']} | "
                        f"{r['total_output_tokens']} | {_fmt(r['duration'], '.2f')} | "
                        f"{_fmt(r['output_throughput'])} | {_fmt(r['request_throughput'], '.2f')}"
                        f" | {_fmt(r['mean_e2e_latency_ms'], '.0f')} | "
                        f"{_fmt(r['median_e2e_latency_ms'], '.0f')} | "
                        f"{_fmt(r['p99_e2e_latency_ms'], '.0f')} | "
                        f"{_fmt(r.get('mean_ttft_ms'), '.0f')} | "
                        f"{_fmt(r.get('p99_ttft_ms'), '.0f')} | "
                        f"{_fmt(r.get('mean_tpot_ms'), '.1f')} | "
                        f"{_fmt(r.get('accept_length'), '.2f', '-' if mode == 'baseline' else 'n/a')} |")
            lines.append("")
        if plot_ok:
            lines += ["## Throughput vs concurrency", "",
                      f"![output throughput vs concurrency]({self.paths.png.name})", ""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        lines += [f"Raw records: `{self.paths.jsonl}`; JSON report: `{self.paths.json}`.", ""]
        return "\n".join(lines)

    def write_plot(self) -> bool:
        if not self.store.results:
            return False
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as err:  # noqa: BLE001
            self.warn(f"no plot: matplotlib is not available ({type(err).__name__})")
            return False
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs: set[int] = set()
        for k, b in enumerate(self.backends()):
            for mode, style in (("baseline", "--"), ("dflash", "-")):
                pts = sorted((c, r["output_throughput"]) for (bb, mm, c), r in
                             self.store.results.items()
                             if bb == b and mm == mode and r.get("output_throughput"))
                if pts:
                    xs.update(p[0] for p in pts)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            color=f"C{k}", label=f"{b} {MODE_LABEL[mode]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{self.args.target_model or 'server'} on {self.args.dataset_name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write(self.paths.png, buf.getvalue())
        return True

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def write(self, status: str, error: str | None = None, plot: bool = False) -> None:
        plot_ok = self.write_plot() if plot else self.paths.png.exists()
        atomic_write(self.paths.json,
                     (json.dumps(self.to_json(status, error), indent=2) + "\n").encode())
        atomic_write(self.paths.md, self.to_markdown(status, error, plot_ok).encode())


# ----------------------------------------------------------------------------- the run

class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP: unwinds like Ctrl-C so every server is stopped."""


class _SignalGuard:
    def __enter__(self):
        self.old = {}
        self.fired = False
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum, _frame):
            if self.fired:
                return  # already unwinding; let the cleanup finish
            self.fired = True
            raise Terminated(signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self.old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False


class Benchmark:
    def __init__(self, args, paths: Paths, store: ResultStore, reporter: Reporter,
                 texts: list[str]):
        self.args, self.paths, self.store, self.reporter = args, paths, store, reporter
        self.texts = texts

    def log(self, message: str) -> None:
        print(message, flush=True)

    def _flush(self, url: str, tag: str) -> None:
        warning = flush_cache(url)
        if warning:
            self.reporter.warn(f"{tag}: {warning}")

    def run_server_configs(self, url: str, backend: str, mode: str,
                           server: ServerProcess | None, extra: dict) -> None:
        args = self.args
        for c in args.concurrency_list:
            if self.store.has(backend, mode, c):
                self.log(f"[{backend}] {MODE_LABEL[mode]} c={c}: already recorded, skipped")
                continue
            tag = f"{MODE_LABEL[mode]} {backend} c={c}"
            n = n_prompts(args, c)
            prompts = prompts_for(self.texts, n)
            try:
                self._flush(url, tag)
                run_load(url, prompts_for(self.texts, c), c, args, "warmup")  # untimed
                self._flush(url, tag)
                load = run_load(url, prompts, c, args, "timed")
            except RequestFailed as err:
                code = server.exit_code() if server else None
                if server and code is not None:
                    print_log_tail(server.log_path)
                    raise UserError(f"{tag}: {err}; the server exited with code {code} (log: "
                                    f"{server.log_path})", exit_code=1) from None
                raise UserError(f"{tag}: {err}", exit_code=1) from None
            metrics, warnings = summarize(load, mode)
            for w in warnings:
                self.reporter.warn(f"{tag}: {w}")
            rec = {"backend": backend, "mode": mode, "concurrency": c, "num_prompts": n,
                   **metrics, "warnings": warnings, "finished": _now(), **extra}
            if mode == "dflash":
                rec["server_avg_spec_accept_length"] = server_avg_accept_length(
                    get_server_info(url))
            self.store.add(rec)
            self.reporter.write("running")
            acc = "" if mode == "baseline" else \
                f", acceptance {_fmt(metrics['accept_length'], '.2f')}"
            self.log(f"[{backend}] {MODE_LABEL[mode]} c={c}: {n} requests, "
                     f"{_fmt(metrics['output_throughput'])} tok/s, "
                     f"{_fmt(metrics['request_throughput'], '.2f')} req/s, p50 latency "
                     f"{_fmt(metrics['median_e2e_latency_ms'], '.0f')} ms{acc}")

    def run_launched(self, backends: list[str], prefix: list[str], port: int,
                     gpu_name: str | None) -> None:
        args = self.args
        modes = [m for m in MODES if not (m == "baseline" and args.skip_baseline)]
        env_add = launch_env_additions()
        for backend in backends:
            for mode in modes:
                if all(self.store.has(backend, mode, c) for c in args.concurrency_list):
                    self.log(f"[{backend}] {MODE_LABEL[mode]}: every concurrency already "
                             f"recorded, server not launched")
                    continue
                wait_port_free(args.host, port, timeout=10.0)
                cmd = launch_command(args, mode, backend, port, prefix)
                log_path = self.paths.logs / f"server_{backend}_{mode}.log"
                label = f"{MODE_LABEL[mode]} ({backend})"
                server = ServerProcess(cmd, env_add, log_path, args.host, port, label,
                                       args.stop_grace_s)
                self.log(f"[{backend}] launching the {MODE_LABEL[mode]} server (log: "
                         f"{log_path})")
                if args.verbose:
                    self.log("  " + shell_line(cmd, env_add))
                server.start()
                try:
                    took = server.wait_ready(args.timeout_s, args.poll_interval_s)
                    self.log(f"[{backend}] {MODE_LABEL[mode]} server ready after {took:.1f} s")
                    self.run_server_configs(server.url, backend, mode, server,
                                            {"gpu": gpu_name, "server_cmd": shell_line(cmd)})
                finally:
                    server.stop()

    def run_external(self, external: "ExternalServer") -> None:
        self.log(f"[{external.backend}] server at {external.url}: {MODE_LABEL[external.mode]} "
                 f"(from {external.detected_from})")
        self.reporter.settings["attention_backends_run"] = [external.backend]
        self.run_server_configs(external.url, external.backend, external.mode, None,
                                {"gpu": None, "server_cmd": None, "base_url": external.url,
                                 "server_version": external.info.get("version")})


@dataclass
class ExternalServer:
    url: str
    backend: str
    mode: str
    info: dict
    detected_from: str


def probe_external(args, texts: list[str]) -> ExternalServer:
    """The --base-url server (found reachable by :func:`check_reachable`), before anything is
    written: ready (else exit 1 after --timeout-s), and which mode it serves (/server_info,
    else one short probe request)."""
    url = args.base_url
    t0 = time.monotonic()
    while True:
        ok, seen = check_ready_once(url, timeout=min(30.0, args.timeout_s))
        if ok:
            break
        if time.monotonic() - t0 > args.timeout_s:
            raise UserError(f"the server at {url} was not ready after {args.timeout_s:g} s "
                            f"(last check: {seen})",
                            "check --base-url, or raise --timeout-s", exit_code=1)
        time.sleep(args.poll_interval_s)
    info = get_server_info(url) or {}
    backend = str(info.get("attention_backend") or "external")
    if "speculative_algorithm" in info:
        return ExternalServer(url, backend, "dflash" if info.get("speculative_algorithm")
                              else "baseline", info, "server_info")
    try:
        probe = send_generate(url, texts[0], dict(sampling_params(args), max_new_tokens=8),
                              args.timeout_s)
    except RequestFailed as err:
        raise UserError(f"the server at {url}: first request failed: {err}",
                        exit_code=1) from None
    return ExternalServer(url, backend, "dflash" if probe[0].verify_ct else "baseline", info,
                          "a probe request")


def dry_run(args, paths: Paths, prefix: list[str], overridden: bool) -> int:
    out = ["# benchmark_sglang.py --dry-run: nothing is started"]
    if args.base_url:
        out.append(f"# no server is launched: benchmarking the running server at "
                   f"{args.base_url}")
    else:
        gpu = detect_gpu()
        backends, notes = filter_backends(args.backend_list, gpu)
        if gpu.available:
            out.append(f"# GPU: {gpu.name} (SM {gpu.sm}), {gpu.count} visible")
        else:
            out.append(f"# GPU: none here ({gpu.reason}); on the GPU machine, attention "
                       f"backends it cannot run are dropped (fa3 needs SM 90, fa4 needs "
                       f"SM >= 100)")
        out += [f"# {n}" for n in notes]
        if overridden:
            out.append(f"# launch command overridden ({LAUNCH_ENV_VAR} / --server-cmd)")
        port = args.port if args.port else "<free port>"
        env_add = launch_env_additions()
        for backend in backends:
            for mode in MODES:
                if mode == "baseline" and args.skip_baseline:
                    continue
                out.append(f"# [{backend}] {MODE_LABEL[mode]} server")
                out.append(shell_line(launch_command(args, mode, backend, port, prefix),
                                      env_add))
    sizes = ", ".join(f"c={c}: {n_prompts(args, c)}" for c in args.concurrency_list)
    out.append(f"# per server: for each concurrency, an untimed warm-up of c requests, then "
               f"n = min({args.questions_per_concurrency_base} * c, "
               f"{args.max_questions_per_config}) prompts of {args.dataset_name} with c in "
               f"flight ({sizes}); GET /flush_cache between configurations")
    out.append(f"# results: {paths.jsonl}; reports: {paths.md}, {paths.json}, {paths.png}")
    print("\n".join(out), flush=True)
    return 0


def _before_output(fn, doing: str):
    """``fn()`` while nothing is written yet: SIGTERM / SIGHUP end the run in one line (143),
    Ctrl-C as everywhere (130)."""
    with _SignalGuard():
        try:
            return fn()
        except Terminated as err:
            raise UserError(f"terminated by {err} while {doing}; nothing was written",
                            exit_code=143) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_list)
    paths = output_paths(args)
    prefix, overridden = launch_prefix(args)
    if args.dry_run:
        return dry_run(args, paths, prefix, overridden)
    for w in args.startup_warnings:
        print(f"warning: {w}", file=sys.stderr)

    gpu = None
    backends: list[str] = []
    port = args.port
    if not args.base_url:
        gpu = check_launch_environment(args, overridden)
        backends, notes = filter_backends(args.backend_list, gpu)
        for note in notes:
            print(f"note: {note}", flush=True)
        if not backends:
            raise UserError(f"none of the attention backends {args.backend_list} runs on this "
                            f"GPU ({gpu.name}, SM {gpu.sm})",
                            "add flashinfer or triton to --attention-backends")
        if port == 0:
            port = pick_free_port(args.host)
        check_port_free(args.host, port)

    if args.base_url:  # a URL that leads nowhere fails here, in one line, before any output
        _before_output(lambda: check_reachable(args.base_url, args.connect_wait_s,
                                               args.poll_interval_s),
                       f"connecting to {args.base_url}")
    texts, source, note = build_prompts(args)
    if note:
        print(f"note: {note}", flush=True)
    external = None
    if args.base_url:  # nothing is written until the server is known to be there and ready
        external = _before_output(lambda: probe_external(args, texts),
                                  f"waiting for the server at {args.base_url}")
    identity = identity_of(args)
    store = ResultStore(paths.jsonl, identity, args.resume, argv_list)
    for n in store.notes:
        print(f"note: {n}", flush=True)
    settings = {
        "dataset": f"{args.dataset_name} ({source}, {len(texts)} prompts, first turns)",
        "target_model": args.target_model, "draft_model": args.draft_model,
        "chat_template": (f"{args.tokenizer_path} (enable_thinking={args.enable_thinking})"
                          if not args.no_chat_template else "none (raw prompt text)"),
        "concurrencies": args.concurrency_list,
        "prompts_per_concurrency": [n_prompts(args, c) for c in args.concurrency_list],
        "questions_per_concurrency_base": args.questions_per_concurrency_base,
        "max_questions_per_config": args.max_questions_per_config,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "stream": args.stream,
        "batch_requests": args.batch_requests,
        "server": args.base_url or "launched by this script",
        "attention_backends_requested": args.backend_list,
        "attention_backends_run": backends,
        "block_size": args.block_size if args.block_size is not None else "draft config",
        "dtype": args.dtype, "tp_size": args.tp_size,
        "mem_fraction_static": args.mem_fraction_static,
        "max_running_requests": args.max_running_requests,
        "radix_cache": "disabled" if args.disable_radix_cache else "enabled",
        "seed": args.seed, "gpu": gpu.name if gpu else "n/a",
        "sglang": sglang_version() or "n/a (not installed in this Python)",
        "started": _now(),
    }
    reporter = Reporter(args, paths, store, settings)
    bench = Benchmark(args, paths, store, reporter, texts)
    status, error, failure = "failed", None, None
    with _SignalGuard():
        try:
            if external is not None:
                bench.run_external(external)
            else:
                bench.run_launched(backends, prefix, port, gpu.name if gpu else None)
            status = "complete"
        except KeyboardInterrupt as err:
            status = "interrupted"
            error = (f"terminated by {err}" if isinstance(err, Terminated)
                     else "interrupted (Ctrl-C)")
        except UserError as err:
            error, failure = err.one_line(), err
        finally:
            stop_all_servers()
            try:
                reporter.write(status, error, plot=True)
            except Exception as werr:  # noqa: BLE001 - never mask the real error
                print(f"warning: could not write the reports ({type(werr).__name__}: {werr})",
                      file=sys.stderr)
    kept = f"{len(store.results)} configuration(s) kept in {paths.jsonl}"
    if failure is not None:
        hint = "; ".join(h for h in (failure.hint, "rerun with --resume to continue"
                                     if store.results else None) if h) or None
        message = f"{failure.message}; {kept}" if store.results else failure.message
        raise UserError(message, hint, failure.exit_code)
    if status == "interrupted":
        raise UserError(f"{error}; servers stopped, {kept}", "rerun with --resume to continue",
                        exit_code=130 if "Ctrl-C" in (error or "") else 143)
    print(f"done: {paths.md}, {paths.json}" + (f", {paths.png}" if paths.png.exists() else "")
          + f" ({kept})", flush=True)
    return 0


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, argv)
