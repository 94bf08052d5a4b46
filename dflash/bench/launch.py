"""The logic behind ``run_benchmark.sh`` and ``run_block_sweep.sh``.

Both wrappers call ``python -m dflash.launch benchmark|sweep``; every setting comes from
environment variables (see docs/WRAPPERS.md). The launcher turns them into one
``benchmark.py`` command per task and block size (``python benchmark.py ...`` for one process,
``torchrun --nproc_per_node=N --master_port=P benchmark.py ...`` for more), runs them one
after another with each one's output in its own log file, and builds the combined summary
(``summary.csv``, ``summary.md``, and for a sweep a plot) from the summary JSON files that
benchmark.py writes -- never from the logs.

``DRY_RUN=1`` prints the commands, one per line on stdout, and runs nothing.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]
HUB_TARGET = "Qwen/Qwen3-4B"            # same pair as dflash.bench (not imported: it pulls torch)
HUB_DRAFT = "z-lab/Qwen3-4B-DFlash-b16"

FAST_TASKS = "aime25:8 gsm8k:8 humaneval:8"
FULL_TASKS = ("gsm8k:128 math500:128 aime24:30 aime25:30 humaneval:164 mbpp:128 "
              "livecodebench:128 swe-bench:128 mt-bench:80 alpaca:128")
FAST_MAX_NEW_TOKENS = 256
FULL_MAX_NEW_TOKENS = 2048
SWEEP_DEFAULTS = {"DATASET": "aime25", "MAX_SAMPLES": "8", "MAX_NEW_TOKENS": "256",
                  "BLOCK_SIZES": "4 8 12 16"}
DEFAULT_PORT_BASE = 29600

# summary.csv columns: the documented ones first, in this order; more follow.
CSV_COLUMNS = [
    "dataset", "max_samples", "block_size", "speedup", "tau",
    "gpu_name", "cuda_version", "torch_version",
    "baseline_total_wall_s", "speculative_total_wall_s",
    "baseline_tokens_per_sec", "speculative_tokens_per_sec",
    "baseline_tpot", "speculative_tpot", "baseline_ttft", "speculative_ttft",
    "acceptance_histogram", "log_path", "output_jsonl_path",
    "status", "error", "category", "tau_per_block", "wall_speedup", "samples_done",
    "samples_failed", "greedy_match_rate", "max_new_tokens", "temperature", "world_size",
    "model", "draft", "baseline_source", "baseline_log_path", "json_path", "dataset_source",
    "returncode", "elapsed_s", "run_tag",
]
REQUIRED_COLUMNS = CSV_COLUMNS[:CSV_COLUMNS.index("output_jsonl_path") + 1]

# Variables each wrapper reads (for the "unknown variable" hint and the docs test).
BENCHMARK_VARS = ["FAST", "NPROC", "TASKS", "MAX_NEW_TOKENS", "MODEL", "DRAFT", "TEMPERATURE",
                  "BLOCK_SIZE", "BLOCK_SIZES", "SKIP_BASELINE", "LOG_DIR", "RUN_TAG",
                  "SAVE_OUTPUTS_DIR", "DRY_RUN", "CONTINUE_ON_ERROR", "MASTER_PORT_BASE", "RESUME",
                  "OFFLINE_FALLBACK", "EXTRA_ARGS", "QUIET"]
SWEEP_VARS = ["DATASET", "MAX_SAMPLES", "MAX_NEW_TOKENS", "BLOCK_SIZES", "NPROC", "MODEL", "DRAFT",
              "TEMPERATURE", "RUN_TAG", "LOG_DIR", "SKIP_BASELINE", "DRY_RUN", "RESUME",
              "CONTINUE_ON_ERROR", "SAVE_OUTPUTS_DIR", "MASTER_PORT_BASE", "OFFLINE_FALLBACK",
              "EXTRA_ARGS", "QUIET"]


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


def env_int(env: Mapping[str, str], name: str, default: int | None, minimum: int | None = None
            ) -> int | None:
    value = _get(env, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise UserError(f"{name}={value!r} must be >= {minimum}")
    return number


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _get(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a number") from None
    if not number >= 0 or math.isinf(number):
        raise UserError(f"{name}={value!r} must be a finite number >= 0")
    return number


def parse_block_sizes(text: str, name: str) -> list[int]:
    """Whitespace- or comma-separated integers, duplicates dropped (order kept).

    Values are not range-checked here: benchmark.py owns that, and a size it rejects becomes a
    failed run (and a failed summary row) like any other failure.
    """
    sizes: list[int] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            size = int(item)
        except ValueError:
            raise UserError(f"{name}={text!r}: '{item}' is not an integer block size") from None
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise UserError(f"{name} is empty")
    return sizes


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


def _display(path: Path, cwd: Path) -> str:
    """A path as the commands show it: relative to the working directory when inside it."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


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
                "model": model, "draft": draft, "nproc": nproc, "skip_baseline": skip_baseline,
                "offline_fallback": offline_fallback, "continue_on_error": continue_on_error,
                "resume": resume, "master_port_base": port_base, "extra_args": extra}
    return Plan(kind=kind, out_dir=out_dir, run_tag=tag, runs=runs, cwd=cwd, dry_run=dry_run,
                continue_on_error=continue_on_error, resume=resume, quiet=quiet, notes=notes,
                settings=settings)


# ----------------------------------------------------------------------------- running
def _check_fresh(plan: Plan) -> None:
    """Without RESUME, refuse to mix results into files an earlier run wrote."""
    if plan.resume:
        return
    taken = [r.jsonl_path for r in plan.runs if r.jsonl_path.exists()
             and r.jsonl_path.stat().st_size > 0]
    taken += [r.json_path for r in plan.runs if r.json_path.exists()]
    if taken:
        raise UserError(f"{_display(taken[0], plan.cwd)} already holds results of an earlier run",
                        "pass RESUME=1 (same RUN_TAG) to continue it, or choose another RUN_TAG")


def _check_embedded(plan: Plan) -> None:
    """The embedded pair is the CPU default: say at once when it is not there."""
    for key, folder in (("model", "tiny-target"), ("draft", "tiny-draft")):
        if plan.settings.get(key) == "embedded" and not (REPO / "models" / folder / "config.json").exists():
            raise UserError(f"the embedded tiny pair is missing (models/{folder})",
                            "restore it from git, or set MODEL= and DRAFT= to model folders")


def _error_line(log_path: Path, offset: int = 0) -> str | None:
    """benchmark.py's one-line error from a log, else its last non-empty line.

    Only what this attempt wrote (from ``offset``: with RESUME=1 the log is appended to) and
    never the ``$ command`` line the launcher writes first (its ``--continue-on-error`` would
    look like an error)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text)
             if ln.strip() and not ln.startswith("$ ")]
    for ln in reversed(lines):
        if re.search(r"benchmark\.py: error: ", ln):
            return ln[ln.index("benchmark.py: error: "):]
    for ln in reversed(lines):
        if re.search(r"(Error|error)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else None


def _read_summary(path: Path, not_before: float) -> dict | None:
    """The summary JSON a run just wrote (an older file from an earlier attempt is ignored)."""
    try:
        if path.stat().st_mtime < not_before - 1.0:
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def execute(run: Run, plan: Plan, env: Mapping[str, str] | None = None) -> None:
    """Run one command, its output into its log (and on stdout unless QUIET)."""
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    run.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(env if env is not None else os.environ)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.time()
    out = sys.stdout.buffer
    mode = "ab" if plan.resume else "wb"
    with open(run.log_path, mode) as log:
        run.log_offset = log.tell()
        log.write(f"$ {shlex.join(run.cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(run.cmd, cwd=plan.cwd, env=child_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except OSError as err:
            log.write(f"cannot start: {err}\n".encode())
            run.returncode, run.elapsed_s = 127, time.time() - start
            run.status, run.error = "failed", f"cannot start {run.cmd[0]}: {err.strerror}"
            return
        _CURRENT["proc"] = proc
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if not plan.quiet:
                    out.write(chunk)
                    out.flush()
            run.returncode = proc.wait()
        except KeyboardInterrupt:
            # the child got the same SIGINT (same process group); let it write its summary
            try:
                run.returncode = proc.wait(timeout=120)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                run.returncode = proc.wait()
            run.elapsed_s = time.time() - start
            _judge(run, start)
            raise
    _CURRENT["proc"] = None
    run.elapsed_s = time.time() - start
    _judge(run, start)


_CURRENT: dict = {"proc": None}


def _on_sigterm(signum, _frame):
    """Pass a SIGTERM on to the running benchmark (so it writes its summary), then stop."""
    proc = _CURRENT.get("proc")
    _CURRENT["signal"] = signal.SIGTERM  # exit 143, not Ctrl-C's 130
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def _judge(run: Run, start: float) -> None:
    run.summary = _read_summary(run.json_path, start)
    rc = run.returncode
    if rc == 0 and run.summary is not None:
        run.status = "ok" if run.summary.get("complete", True) else "incomplete"
        if run.status == "ok" and run.summary.get("samples_failed"):
            run.status = "partial"
        run.error = None
    elif rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        run.status, run.error = "interrupted", f"exit status {rc}"
    elif run.summary is not None and run.summary.get("interrupted_by"):
        # torchrun exits 1 when it is signalled, whatever its workers did; the summary
        # rank 0 wrote says the run was interrupted
        run.status = "interrupted"
        run.error = f"exit status {rc}, {run.summary['interrupted_by']}"
    else:
        run.status = "failed"
        run.error = _error_line(run.log_path, run.log_offset) or f"exit status {rc}"
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            run.error = f"killed by {name} (exit status {rc}" + \
                (": kill -9 or out of memory)" if -rc == signal.SIGKILL else ")")
        if rc == 0:
            run.error = "finished without writing its summary JSON " + _display(run.json_path, REPO)


def wrapper_hint(run: Run) -> str | None:
    """benchmark.py's hints name its flags; a failure to reach a hub model also gets the
    wrappers' way to say the same."""
    if run.status == "failed" and run.error and "cannot be reached on the Hugging Face hub" \
            in run.error:
        return ("hint: set MODEL=/local/target/folder DRAFT=/local/draft/folder, or "
                "MODEL=embedded DRAFT=embedded (the default without CUDA) for the embedded "
                "tiny pair")
    return None


def failed(run: Run) -> bool:
    return run.status in ("failed", "interrupted")


# ----------------------------------------------------------------------------- summaries
def _num(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _category(dataset: str) -> str | None:
    try:
        from ..datasets import category_of
        return category_of(dataset)
    except (UserError, ImportError):
        return None


def summary_row(run: Run, plan: Plan) -> dict:
    """One summary.csv row from benchmark.py's JSON (and the shared baseline's, if any)."""
    s = run.summary or {}
    cfg = s.get("config", {})
    env = s.get("environment", {})
    shared = run.baseline.summary if run.baseline is not None else None
    if run.role == "baseline" or cfg.get("block_size") == 1:
        base = s.get("baseline")
        spec = base       # block size 1 *is* autoregressive decoding: speedup 1 by definition
        speed = 1.0 if base else None
        wall = 1.0 if base else None
        base_source = "same run"
    elif run.baseline is not None:
        base = (shared or {}).get("baseline")
        spec = s.get("speculative")
        speed = (base["tpot"] / spec["tpot"]) if base and spec and spec.get("tpot") else None
        wall = (base["total_wall_s"] / spec["total_wall_s"]) if base and spec and \
            spec.get("total_wall_s") else None
        base_source = "shared baseline"
    else:
        base, spec = s.get("baseline"), s.get("speculative")
        speed, wall = s.get("speedup"), s.get("wall_speedup")
        base_source = "same run" if base else None
    block = cfg.get("block_size", 1 if run.role == "baseline" else run.block_size)
    tau = spec.get("tau") if spec else None
    if not env and shared:
        env = shared.get("environment", {})

    def pick(mode, key):
        return _num(mode.get(key)) if mode else None

    row = {
        "dataset": run.dataset, "max_samples": run.max_samples, "block_size": block,
        "speedup": _num(speed), "tau": _num(tau),
        "gpu_name": env.get("gpu_name"), "cuda_version": env.get("cuda_version"),
        "torch_version": env.get("torch_version"),
        "baseline_total_wall_s": pick(base, "total_wall_s"),
        "speculative_total_wall_s": pick(spec, "total_wall_s"),
        "baseline_tokens_per_sec": pick(base, "tokens_per_sec"),
        "speculative_tokens_per_sec": pick(spec, "tokens_per_sec"),
        "baseline_tpot": pick(base, "tpot"), "speculative_tpot": pick(spec, "tpot"),
        "baseline_ttft": pick(base, "ttft"), "speculative_ttft": pick(spec, "ttft"),
        "acceptance_histogram": json.dumps(spec["acceptance_histogram"]) if spec and
        spec.get("acceptance_histogram") is not None else None,
        "log_path": _display(run.log_path, plan.cwd),
        "output_jsonl_path": _display(run.jsonl_path, plan.cwd),
        "status": run.status, "error": run.error, "category": _category(run.dataset),
        "tau_per_block": (tau / block) if _num(tau) is not None and isinstance(block, int)
        and block > 0 else None,
        "wall_speedup": _num(wall), "samples_done": s.get("samples_done"),
        "samples_failed": s.get("samples_failed"),
        "greedy_match_rate": _num(s.get("greedy_match_rate")),
        "max_new_tokens": cfg.get("max_new_tokens", plan.settings.get("max_new_tokens")),
        "temperature": cfg.get("temperature", plan.settings.get("temperature")),
        "world_size": s.get("world_size"),
        "model": cfg.get("model", plan.settings.get("model")),
        "draft": cfg.get("draft", plan.settings.get("draft")),
        "baseline_source": base_source,
        "baseline_log_path": _display(run.baseline.log_path, plan.cwd) if run.baseline else
        (_display(run.log_path, plan.cwd) if base else None),
        "json_path": _display(run.json_path, plan.cwd),
        "dataset_source": s.get("dataset_source"),
        "returncode": run.returncode,
        "elapsed_s": round(run.elapsed_s, 3) if run.elapsed_s is not None else None,
        "run_tag": plan.run_tag,
    }
    return row


def summary_rows(plan: Plan) -> list[dict]:
    """Rows for every run that ran: each block size; a shared baseline only when it failed."""
    rows = []
    for run in plan.runs:
        if run.status == "not run":
            continue
        if run.role == "baseline" and not failed(run):
            continue
        rows.append(summary_row(run, plan))
    return rows


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if _num(value) is None else format(value * scale, spec)


def summary_table(rows: list[dict]) -> str:
    """The combined Markdown table printed at the end."""
    head = ["dataset", "block", "status", "samples", "base TPOT ms", "spec TPOT ms", "speedup",
            "tau", "tau/b", "spec tok/s", "log"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["dataset"]), str(r["block_size"] if r["block_size"] is not None else "draft"),
                 r["status"] + (f" ({r['error']})" if r.get("error") else ""),
                 str(r["samples_done"] if r.get("samples_done") is not None else "-"),
                 _fmt(r["baseline_tpot"], ".2f", 1000), _fmt(r["speculative_tpot"], ".2f", 1000),
                 _fmt(r["speedup"], ".2f") + ("x" if _num(r["speedup"]) is not None else ""),
                 _fmt(r["tau"], ".2f"), _fmt(r["tau_per_block"], ".3f"),
                 _fmt(r["speculative_tokens_per_sec"], ".1f"), str(r["log_path"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _pair_name(model, draft) -> str:
    """'embedded' + 'embedded' -> the folders it stands for."""
    if model == draft == "embedded":
        return "embedded pair: models/tiny-target + models/tiny-draft"
    return f"{model} + {draft}"


def sweep_plot(rows: list[dict], path: Path) -> bool:
    """speedup and tau against block size (one sweep). False when there is nothing to plot."""
    good = sorted((r for r in rows if r["status"] in ("ok", "partial") and
                   _num(r["speedup"]) is not None and isinstance(r["block_size"], int)),
                  key=lambda r: r["block_size"])
    if not good:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["block_size"] for r in good]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(xs, [r["speedup"] for r in good], "o-", color="tab:blue", label="speedup (TPOT)")
    ax.axhline(1.0, color="tab:blue", lw=0.8, ls=":")
    ax.set_xlabel("block size")
    ax.set_ylabel("speedup over autoregressive (x)", color="tab:blue")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["tau"] for r in good], "s--", color="tab:orange", label="tau")
    ax2.set_ylabel("mean acceptance length tau", color="tab:orange")
    ax2.set_ylim(0, 1.05 * max(max(xs), max(r["tau"] for r in good)))  # tau <= block size
    first = good[0]
    failed_sizes = [str(r["block_size"]) for r in rows if r["status"] in ("failed", "interrupted")
                    and r["block_size"] != 1]
    title = (f"{first['dataset']} ({first['samples_done']} samples, {first['max_new_tokens']} "
             f"tokens, T={first['temperature']}) on {first['gpu_name']}\n"
             f"{_pair_name(first['model'], first['draft'])}"
             + (" (shared baseline)" if first["baseline_source"] == "shared baseline" else ""))
    if failed_sizes:
        title += f"\nfailed: block size {', '.join(failed_sizes)}"
    ax.set_title(title, fontsize=9)
    lines = ax.get_lines()[:1] + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_summaries(plan: Plan) -> list[dict]:
    from ..runlog import atomic_write_json, atomic_write_text

    rows = summary_rows(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.out_dir / "summary.csv", rows_to_csv(rows))
    table = summary_table(rows)
    header = (f"# {plan.kind} {plan.run_tag}\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in plan.settings.items()) + "\n\n")
    atomic_write_text(plan.out_dir / "summary.md", header + table + "\n")
    atomic_write_json(plan.out_dir / "launch.json", {
        "settings": plan.settings,
        "runs": [{"name": r.name, "role": r.role, "command": shlex.join(r.cmd),
                  "status": r.status, "returncode": r.returncode, "elapsed_s": r.elapsed_s,
                  "log_path": _display(r.log_path, plan.cwd),
                  "json_path": _display(r.json_path, plan.cwd)} for r in plan.runs]})
    if plan.kind == "sweep":
        sweep_plot(rows, plan.out_dir / "sweep_plot.png")
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a != "--verbose"]
    if len(args) != 1 or args[0] not in ("benchmark", "sweep"):
        raise UserError("usage: python -m dflash.launch benchmark|sweep (settings come from "
                        "environment variables; see docs/WRAPPERS.md)")
    kind = args[0]
    plan = build_plan(kind, os.environ)
    for note in plan.notes:
        print(note, file=sys.stderr)
    if plan.dry_run:
        for run in plan.runs:
            print(shlex.join(run.cmd))
        return 0
    _check_fresh(plan)
    _check_embedded(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    from ..runlog import atomic_write_text
    atomic_write_text(plan.out_dir / "commands.sh", "".join(
        f"{shlex.join(r.cmd)} > {shlex.quote(_display(r.log_path, plan.cwd))} 2>&1\n"
        for r in plan.runs))
    child_env = offline_env(os.environ)
    if child_env is not None:
        print("The Hugging Face hub is not reachable: runs get HF_HUB_OFFLINE=1 "
              "(cached or built-in data only).", file=sys.stderr)
    _CURRENT["signal"] = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    first_failure: Run | None = None
    interrupted = False
    total = len(plan.runs)
    try:
        for i, run in enumerate(plan.runs, 1):
            what = "shared baseline (block size 1)" if run.role == "baseline" else \
                f"block size {run.block_size if run.block_size is not None else 'of the draft'}"
            print(f"[{i}/{total}] {run.dataset} {what}: {shlex.join(run.cmd)}", file=sys.stderr)
            print(f"[{i}/{total}] log: {_display(run.log_path, plan.cwd)}", file=sys.stderr)
            sys.stderr.flush()
            execute(run, plan, child_env)
            msg = f"[{i}/{total}] {run.name}: {run.status} in {run.elapsed_s:.1f}s"
            if run.error:
                msg += f" -- {run.error}"
            print(msg, file=sys.stderr)
            hint = wrapper_hint(run)
            if hint:
                print(f"[{i}/{total}] {hint}", file=sys.stderr)
            if failed(run):
                first_failure = first_failure or run
                if run.status == "interrupted":
                    interrupted = True
                    break
                if not plan.continue_on_error:
                    print(f"CONTINUE_ON_ERROR=0: stopping after the first failure "
                          f"({run.name}, exit status {run.returncode}).", file=sys.stderr)
                    break
    except KeyboardInterrupt:
        interrupted = True
    rows = write_summaries(plan)
    print()
    print(summary_table(rows))
    print(f"\nsummary: {_display(plan.out_dir / 'summary.csv', plan.cwd)}"
          + (f" | plot: {_display(plan.out_dir / 'sweep_plot.png', plan.cwd)}"
             if plan.kind == "sweep" and (plan.out_dir / "sweep_plot.png").exists() else ""))
    if interrupted:
        return 143 if _CURRENT.get("signal") == signal.SIGTERM else 130
    if first_failure is not None:
        failures = sum(failed(r) for r in plan.runs)
        print(f"{failures} of {total} run(s) failed; first: {first_failure.name} "
              f"(log {_display(first_failure.log_path, plan.cwd)})", file=sys.stderr)
        rc = first_failure.returncode
        if rc is not None and rc < 0:
            return 128 + (-rc)          # killed by a signal: the shell's convention
        return rc if rc and 0 < rc < 256 else 1
    return 0


if __name__ == "__main__":
    _kind = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.argv[0] = {"benchmark": "run_benchmark.sh", "sweep": "run_block_sweep.sh"}.get(
        _kind, "dflash.launch")
    run_cli(main)
