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

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from ..errors import UserError, run_cli
# the plan and the report live in their own modules; their names stay reachable from here
from .plan import (BENCHMARK_VARS, FULL_TASKS, REPO, SWEEP_VARS, Plan, Run,  # noqa: F401
                   build_plan, offline_env)
from .report import (CSV_COLUMNS, REQUIRED_COLUMNS, _display, failed,  # noqa: F401
                     rows_to_csv, summary_rows, summary_table, write_summaries)



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
    child_env.setdefault("DFLASH_QUIET_TORCHRUN", "0")  # TorchrunFilter keeps the worker's status
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
        quiet_torchrun = TorchrunFilter()

        def show(data: bytes) -> None:
            if data:
                log.write(data)
                log.flush()
                if not plan.quiet:
                    out.write(data)
                    out.flush()

        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                show(quiet_torchrun.feed(chunk))
            show(quiet_torchrun.flush())
            run.returncode = proc.wait()
            if run.returncode == 1 and quiet_torchrun.worker_exit:
                run.returncode = quiet_torchrun.worker_exit  # torchrun says 1 for any failure
        except KeyboardInterrupt:
            # Ctrl-C reaches the child too (same process group), a `kill -INT` of the wrapper
            # does not: pass it on (a repeated SIGINT is only noted by the child's stop
            # handling); SIGTERM was passed on by _on_sigterm. Let it write its summary.
            if _CURRENT.get("signal") != signal.SIGTERM and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
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


class TorchrunFilter:
    """Drops torchrun's own report of a failed worker (an ``E... failed (exitcode: N)`` line and
    a ChildFailedError traceback framed by ``====`` lines) from a run's output: the worker
    already said what went wrong in one line, and torchrun's traceback only buries it. In
    its place one line gives the worker's exit status (also kept in ``worker_exit``: torchrun
    itself exits 1 whatever its worker's status). Any other output passes unchanged."""

    AGENT_LINE = re.compile(rb"^E\d{4} .*torch/distributed/elastic/.*failed \(exitcode: (-?\d+)\)"
                            rb" local_rank: (\d+)")
    TORCHRUN_FRAME = re.compile(rb'File ".*(torchrun|torch/distributed/run\.py)"')

    def __init__(self):
        self.pending = b""          # an incomplete last line
        self.held: bytes | None = None   # a "Traceback" line waiting for its first frame
        self.rules = 0              # "====" lines seen in the report being dropped
        self.dropping = False
        self.worker_exit: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        lines = data.split(b"\n")
        self.pending = lines.pop()
        out = b"".join(self._line(ln + b"\n") for ln in lines)
        if b"\r" in self.pending and not self.dropping and self.held is None:
            cut = self.pending.rindex(b"\r") + 1   # progress bars redraw without a newline
            out += self.pending[:cut]
            self.pending = self.pending[cut:]
        return out

    def flush(self) -> bytes:
        rest = self._line(self.pending) if self.pending else b""
        if self.held is not None:
            rest, self.held = self.held + rest, None
        self.pending = b""
        return rest

    def _line(self, line: bytes) -> bytes:
        text = line.strip()
        if self.dropping:
            if text and set(text) == {ord("=")}:
                self.rules += 1
                if self.rules == 2:
                    self.dropping = False
            return b""
        if self.held is not None:
            held, self.held = self.held, None
            if self.TORCHRUN_FRAME.search(text):
                self.dropping, self.rules = True, 0
                return b""
            return held + self._line(line)
        match = self.AGENT_LINE.match(text)
        if match:
            if self.worker_exit is None:
                self.worker_exit = int(match.group(1))
            return (f"torchrun: local rank {match.group(2).decode()} exited with status "
                    f"{match.group(1).decode()}\n").encode()
        if text == b"Traceback (most recent call last):":
            self.held = line
            return b""
        return line


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
