"""The wrappers' plan: environment variables -> the list of benchmark.py commands.

Every setting ``run_benchmark.sh`` and ``run_block_sweep.sh`` read (docs/WRAPPERS.md) is
parsed and checked here, before anything runs; :func:`build_plan` turns them into one command
per task and block size (``python benchmark.py ...`` for one process, ``torchrun
--nproc_per_node=N --master_port=P benchmark.py ...`` for more).
"""
from __future__ import annotations

import glob
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import UserError, parse_int_list
from .report import _display

REPO = Path(__file__).resolve().parents[2]
HUB_TARGET = "Qwen/Qwen3-4B"            # the default pair with CUDA (bench.common uses these)
HUB_DRAFT = "z-lab/Qwen3-4B-DFlash-b16"

FAST_TASKS = "aime25:8 gsm8k:8 humaneval:8"
FULL_TASKS = ("gsm8k:128 math500:128 aime24:30 aime25:30 humaneval:164 mbpp:128 "
              "livecodebench:128 swe-bench:128 mt-bench:80 alpaca:128")
FAST_MAX_NEW_TOKENS = 256
FULL_MAX_NEW_TOKENS = 2048
SWEEP_DEFAULTS = {"DATASET": "aime25", "MAX_SAMPLES": "8", "MAX_NEW_TOKENS": "256",
                  "BLOCK_SIZES": "4 8 12 16"}
DEFAULT_PORT_BASE = 29600

# Variables each wrapper reads (for the "unknown variable" hint and the docs test).
BENCHMARK_VARS = ["FAST", "NPROC", "TASKS", "MAX_NEW_TOKENS", "MODEL", "DRAFT", "TEMPERATURE",
                  "TOP_P", "TOP_K",
                  "BLOCK_SIZE", "BLOCK_SIZES", "SKIP_BASELINE", "LOG_DIR", "RUN_TAG",
                  "SAVE_OUTPUTS_DIR", "DRY_RUN", "CONTINUE_ON_ERROR", "MASTER_PORT_BASE", "RESUME",
                  "OFFLINE_FALLBACK", "EXTRA_ARGS", "QUIET"]
SWEEP_VARS = ["DATASET", "MAX_SAMPLES", "MAX_NEW_TOKENS", "BLOCK_SIZES", "NPROC", "MODEL", "DRAFT",
              "TEMPERATURE", "TOP_P", "TOP_K", "RUN_TAG", "LOG_DIR", "SKIP_BASELINE", "DRY_RUN",
              "RESUME", "CONTINUE_ON_ERROR", "SAVE_OUTPUTS_DIR", "MASTER_PORT_BASE",
              "OFFLINE_FALLBACK", "EXTRA_ARGS", "QUIET"]


# ----------------------------------------------------------------------------- env parsing
def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _get(env, name)
    if value is None:
        return default
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name}={value!r} is not a yes/no value", "use 1 or 0")


def _env_number(env: Mapping[str, str], name: str, kind, what: str):
    value = _get(env, name)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not {what}") from None


def env_int(env: Mapping[str, str], name: str, default: int | None, minimum: int | None = None
            ) -> int | None:
    number = _env_number(env, name, int, "an integer")
    if number is None:
        return default
    if minimum is not None and number < minimum:
        raise UserError(f"{name}={_get(env, name)!r} must be >= {minimum}")
    return number


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    number = _env_number(env, name, float, "a number")
    if number is None:
        return default
    if not number >= 0 or math.isinf(number):
        raise UserError(f"{name}={_get(env, name)!r} must be a finite number >= 0")
    return number


def sampling_filters(env: Mapping[str, str]) -> tuple[float | None, int | None]:
    """TOP_P in (0, 1] and TOP_K >= 0 (None where unset), checked before anything runs."""
    top_p = _env_number(env, "TOP_P", float, "a number")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses NaN
        raise UserError(f"TOP_P={_get(env, 'TOP_P')!r} must be in (0, 1] (1 = off)")
    return top_p, env_int(env, "TOP_K", None, 0)


def parse_block_sizes(text: str, name: str) -> list[int]:
    """Whitespace- or comma-separated integers, duplicates dropped (order kept).

    Values are not range-checked here: benchmark.py owns that, and a size it rejects becomes a
    failed run (and a failed summary row) like any other failure.
    """
    return parse_int_list(text, name, example="\"4 8 12 16\"")


def parse_tasks(text: str, name: str = "TASKS") -> list[tuple[str, int | None]]:
    """``"aime25:8 gsm8k:8"`` -> [("aime25", 8), ("gsm8k", 8)]; ``dataset`` or ``dataset:all``
    means every sample of that dataset."""
    from ..datasets import check_dataset_name

    tasks: list[tuple[str, int | None]] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        dataset, _, count = item.partition(":")
        try:
            check_dataset_name(dataset)
        except UserError as err:
            raise UserError(f"{name}: {err.message}", err.hint) from None
        samples: int | None = None
        if count and count.lower() != "all":
            try:
                samples = int(count)
            except ValueError:
                raise UserError(f"{name}: '{item}' must look like dataset:max_samples") from None
            if samples < 1:
                raise UserError(f"{name}: '{item}' needs max_samples >= 1")
        if any(d == dataset for d, _ in tasks):
            raise UserError(f"{name}: dataset '{dataset}' is listed twice")
        tasks.append((dataset, samples))
    if not tasks:
        raise UserError(f"{name} is empty", "give a list like \"aime25:8 humaneval:8\"")
    return tasks


# ----------------------------------------------------------------------------- hardware
def detect_cuda() -> tuple[bool, int]:
    """(CUDA usable, number of visible GPUs) as benchmark.py will see them."""
    if sys.platform.startswith("linux") and not (glob.glob("/dev/nvidia[0-9]*") or
                                                 os.path.exists("/dev/kfd")):
        return False, 0     # no GPU device nodes: skip the torch start-up (seconds)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a requirement
        return False, 0
    if not torch.cuda.is_available():
        return False, 0
    return True, torch.cuda.device_count()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hugging Face hub (or HF_ENDPOINT)?"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_env(env: Mapping[str, str]) -> dict | None:
    """Child env with the hub switched off when it is out of reach, so hub datasets fall back at
    once instead of after the client's retries; None when nothing needs to change."""
    if env.get("HF_HUB_OFFLINE") or env.get("HF_DATASETS_OFFLINE") or hub_reachable():
        return None
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ----------------------------------------------------------------------------- the plan
@dataclass
class Run:
    name: str
    dataset: str
    max_samples: int | None
    block_size: int | None      # None: the draft's own block size
    role: str                   # "run" or "baseline" (a shared --block-size 1 pass)
    cmd: list[str]
    log_path: Path
    json_path: Path
    jsonl_path: Path
    baseline: "Run | None" = None   # the shared baseline this run's speedup comes from
    # filled in after it ran
    returncode: int | None = None
    elapsed_s: float | None = None
    summary: dict | None = None
    status: str = "not run"
    error: str | None = None
    log_offset: int = 0         # where this attempt's output starts in the log (RESUME appends)


@dataclass
class Plan:
    kind: str                   # "benchmark" or "sweep"
    out_dir: Path
    run_tag: str
    runs: list[Run]
    cwd: Path
    dry_run: bool
    continue_on_error: bool
    resume: bool
    quiet: bool
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def _interpreters(cwd: Path) -> tuple[list[str], list[str]]:
    """(python, torchrun) command prefixes: the repo's .venv when it exists, else python3."""
    venv = REPO / ".venv" / "bin"
    if (venv / "python").exists():
        python = [_display(venv / "python", cwd)]
        if (venv / "torchrun").exists():
            return python, [_display(venv / "torchrun", cwd)]
        return python, python + ["-m", "torch.distributed.run"]
    if shutil.which("torchrun"):
        return ["python3"], ["torchrun"]
    return ["python3"], ["python3", "-m", "torch.distributed.run"]


def _user_path(value: str, cwd: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else cwd / path


def build_plan(kind: str, env: Mapping[str, str], cwd: str | Path | None = None,
               cuda: tuple[bool, int] | None = None) -> Plan:
    """Turn the environment into the list of runs. ``cuda`` overrides detection (tests)."""
    if kind not in ("benchmark", "sweep"):
        raise ValueError(kind)
    cwd = Path(os.path.abspath(cwd or os.getcwd()))
    notes: list[str] = []
    hw: dict = {}

    def hardware() -> tuple[bool, int]:
        if "v" not in hw:
            hw["v"] = cuda if cuda is not None else detect_cuda()
        return hw["v"]

    # what to run
    if kind == "benchmark":
        fast = env_flag(env, "FAST", False)
        tasks = parse_tasks(_get(env, "TASKS") or (FAST_TASKS if fast else FULL_TASKS))
        max_new = env_int(env, "MAX_NEW_TOKENS",
                          FAST_MAX_NEW_TOKENS if fast else FULL_MAX_NEW_TOKENS, 1)
        one, many = _get(env, "BLOCK_SIZE"), _get(env, "BLOCK_SIZES")
        if one and many:
            raise UserError("set BLOCK_SIZE or BLOCK_SIZES, not both")
        blocks: list[int | None] = (parse_block_sizes(one, "BLOCK_SIZE") if one else
                                    parse_block_sizes(many, "BLOCK_SIZES") if many else [None])
        if one and len(blocks) > 1:
            raise UserError(f"BLOCK_SIZE={one!r} holds several sizes", "use BLOCK_SIZES for a list")
        folder_prefix = "bench_"
    else:
        if _get(env, "BLOCK_SIZE"):
            raise UserError("run_block_sweep.sh reads BLOCK_SIZES (a list), not BLOCK_SIZE")
        if _get(env, "TASKS"):
            raise UserError("run_block_sweep.sh reads DATASET and MAX_SAMPLES, not TASKS",
                            "use run_benchmark.sh for several datasets")
        dataset = _get(env, "DATASET") or SWEEP_DEFAULTS["DATASET"]
        samples = _get(env, "MAX_SAMPLES") or SWEEP_DEFAULTS["MAX_SAMPLES"]
        tasks = parse_tasks(f"{dataset}:{samples}", "DATASET/MAX_SAMPLES")
        if len(tasks) != 1:
            raise UserError(f"DATASET={dataset!r} must name one dataset",
                            "run one sweep per dataset")
        max_new = env_int(env, "MAX_NEW_TOKENS", int(SWEEP_DEFAULTS["MAX_NEW_TOKENS"]), 1)
        blocks = parse_block_sizes(_get(env, "BLOCK_SIZES") or SWEEP_DEFAULTS["BLOCK_SIZES"],
                                   "BLOCK_SIZES")
        folder_prefix = "sweep_"
    temperature = env_float(env, "TEMPERATURE", 0.0)
    top_p, top_k = sampling_filters(env)
    skip_baseline = env_flag(env, "SKIP_BASELINE", False)
    if skip_baseline and 1 in blocks:
        blocks = [b for b in blocks if b != 1]
        notes.append("SKIP_BASELINE=1: block size 1 is the shared baseline pass; "
                     "not listed again as a block size.")
        if not blocks:
            raise UserError("SKIP_BASELINE=1 with block size 1 only leaves nothing to compare")

    # how to run it
    nproc = env_int(env, "NPROC", None, 1)
    if nproc is None:
        has_cuda, gpus = hardware()
        nproc = max(1, gpus) if has_cuda else 1
    elif hardware()[0] and nproc > hardware()[1]:
        raise UserError(f"NPROC={nproc} but only {hardware()[1]} GPU(s) are visible",
                        "lower NPROC or set CUDA_VISIBLE_DEVICES")
    model, draft = _get(env, "MODEL"), _get(env, "DRAFT")
    if not (model and draft):
        if hardware()[0]:
            model, draft = model or HUB_TARGET, draft or HUB_DRAFT
        else:
            notes.append(f"No CUDA device: using the embedded tiny pair (models/tiny-target + "
                         f"models/tiny-draft){' for the unset MODEL/DRAFT' if model or draft else ''}"
                         " and --offline-fallback for hub datasets out of reach.")
            model, draft = model or "embedded", draft or "embedded"
    if _get(env, "OFFLINE_FALLBACK") is None:
        offline_fallback = not hardware()[0]
    else:
        offline_fallback = env_flag(env, "OFFLINE_FALLBACK", False)
    port_base = env_int(env, "MASTER_PORT_BASE", DEFAULT_PORT_BASE, 1)
    if port_base > 65535:
        raise UserError(f"MASTER_PORT_BASE={port_base} is not a port number")
    continue_on_error = env_flag(env, "CONTINUE_ON_ERROR", True)
    resume = env_flag(env, "RESUME", False)
    dry_run = env_flag(env, "DRY_RUN", False)
    quiet = env_flag(env, "QUIET", False)
    try:
        extra = shlex.split(_get(env, "EXTRA_ARGS") or "")
    except ValueError as err:
        raise UserError(f"EXTRA_ARGS cannot be split like a shell line: {err}") from None

    # where it goes
    tag = _get(env, "RUN_TAG")
    if tag is None:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        tag = f"{tasks[0][0]}_{stamp}" if kind == "sweep" else (f"fast_{stamp}" if
                                                              env_flag(env, "FAST", False) else stamp)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", tag):
        raise UserError(f"RUN_TAG={tag!r} may hold only letters, digits and . _ + -")
    log_dir = _user_path(_get(env, "LOG_DIR") or str(REPO / "logs"), cwd)
    out_dir = log_dir / f"{folder_prefix}{tag}"
    outputs_dir = _user_path(_get(env, "SAVE_OUTPUTS_DIR"), cwd) if _get(env, "SAVE_OUTPUTS_DIR") \
        else out_dir
    if temperature != 0 and skip_baseline:
        notes.append("note: at temperature > 0 the shared baseline samples other tokens than the "
                     "speculative runs; speedups compare per-token times only.")

    python, torchrun = _interpreters(cwd)
    script = _display(REPO / "benchmark.py", cwd)
    runs: list[Run] = []

    def make(dataset: str, samples: int | None, block: int | None, role: str) -> Run:
        name = dataset + ("_baseline" if role == "baseline" else
                          f"_b{block}" if block is not None else "")
        index = len(runs)
        if nproc == 1:
            cmd = python + [script]
        else:
            cmd = torchrun + [f"--nproc_per_node={nproc}", f"--master_port={port_base + index}",
                              script]
        jsonl = outputs_dir / f"{name}.jsonl"
        summary = out_dir / f"{name}.json"
        cmd += ["--dataset", dataset]
        if samples is not None:
            cmd += ["--max-samples", str(samples)]
        cmd += ["--model-name-or-path", model, "--draft-name-or-path", draft,
                "--max-new-tokens", str(max_new), "--temperature", repr(temperature)]
        if top_p is not None:  # unset: benchmark.py's defaults, and the commands as before
            cmd += ["--top-p", repr(top_p)]
        if top_k is not None:
            cmd += ["--top-k", str(top_k)]
        if role == "baseline":
            cmd += ["--block-size", "1"]
        elif block is not None:
            cmd += ["--block-size", str(block)]
        if skip_baseline and role == "run":
            cmd += ["--skip-baseline"]
        cmd += ["--save-outputs-path", _display(jsonl, cwd), "--output-json", _display(summary, cwd)]
        if offline_fallback:
            cmd += ["--offline-fallback"]
        if resume:
            cmd += ["--resume"]
        if continue_on_error:
            cmd += ["--continue-on-error"]
        cmd += extra
        return Run(name=name, dataset=dataset, max_samples=samples, block_size=block, role=role,
                   cmd=cmd, log_path=out_dir / f"{name}.log", json_path=summary, jsonl_path=jsonl)

    for dataset, samples in tasks:
        shared = make(dataset, samples, 1, "baseline") if skip_baseline else None
        if shared:
            runs.append(shared)
        for block in blocks:
            run = make(dataset, samples, block, "run")
            run.baseline = shared
            runs.append(run)

    settings = {"kind": kind, "run_tag": tag, "tasks": [f"{d}:{s if s else 'all'}" for d, s in tasks],
                "block_sizes": blocks, "max_new_tokens": max_new, "temperature": temperature,
                "top_p": 1.0 if top_p is None else top_p, "top_k": top_k or 0,
                "model": model, "draft": draft, "nproc": nproc, "skip_baseline": skip_baseline,
                "offline_fallback": offline_fallback, "continue_on_error": continue_on_error,
                "resume": resume, "master_port_base": port_base, "extra_args": extra}
    return Plan(kind=kind, out_dir=out_dir, run_tag=tag, runs=runs, cwd=cwd, dry_run=dry_run,
                continue_on_error=continue_on_error, resume=resume, quiet=quiet, notes=notes,
                settings=settings)
