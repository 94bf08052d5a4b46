"""The per-sample loop the Transformers benchmark CLIs share.

``benchmark.py``, ``benchmark_dynamic_schedule.py`` and ``benchmark_multiround_spec.py`` all
run one prompt (a *unit*) at a time and keep what finished: units already in the JSONL are
skipped on ``--resume``, each finished unit is appended to the JSONL before the next starts, a
unit that raises (out of memory...) is recorded with its error and its memory freed, the run
stops at the first failure unless ``--continue-on-error``, and SIGINT / SIGTERM drop the unit
in progress (:class:`~dflash.runlog.GracefulStop`). What each CLI measures stays in the CLI:
it hands :func:`run_units` a ``run_one(prompt) -> record`` function.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

from . import common as bench
from ..errors import EXIT_FAILED, UserError
from ..runlog import GracefulStop, RunLog

Failure = tuple[str, BaseException]  # (sample id, the error that stopped the run)


def split_resumed(prompts: Sequence[dict], log: RunLog | None) -> tuple[list[dict], list[dict]]:
    """(prompts still to run, records kept from ``log``), both in ``prompts`` order. Units whose
    latest record is an error are not kept: they run again."""
    if log is None:
        return list(prompts), []
    todo = [p for p in prompts if p["id"] not in log.done]
    kept = [log.done[p["id"]] for p in prompts if p["id"] in log.done]
    return todo, kept


def announce_resumed(kept: Sequence[dict], log: RunLog | None) -> None:
    if kept and log is not None:
        print(f"resuming: {len(kept)} finished sample(s) kept from {log.path}"
              + (f", {len(log.failed)} failed one(s) retried" if log.failed else ""),
              file=sys.stderr)


def failed_record(prompt: dict, dataset: str, err: BaseException) -> dict:
    """The record of a unit that raised: enough to report it and to retry it on --resume."""
    return {"id": prompt["id"], "dataset": dataset, "category": prompt["category"],
            "error": bench.error_text(err)}


def run_units(todo: Sequence[dict], run_one: Callable[[dict], dict], *, stop: GracefulStop,
              records: list[dict], dataset: str, log: RunLog | None = None,
              continue_on_error: bool = False, rank: int | None = None,
              warm_up: Callable[[], None] | None = None,
              on_record: Callable[[int, dict, dict], None] | None = None) -> Failure | None:
    """Run ``run_one`` on each prompt of ``todo`` inside ``stop`` (an entered GracefulStop).

    Each record (``rank`` added when given) is appended to ``log`` and ``records`` while the
    stop is committing, so a signal cannot cut a record in half; ``on_record(i, prompt, rec)``
    (progress, verbose lines; ``i`` counts from 1 over ``todo``) runs there too. A unit that
    raises is recorded by :func:`failed_record` after :func:`bench.free_memory`; the loop then
    stops unless ``continue_on_error``. SIGINT / SIGTERM drop the unit in progress. On return
    the stop is disarmed: a further signal is only noted while the caller writes its summary.

    Returns the failure that stopped the run, or None (finished, or stopped by a signal:
    ``stop.requested``). ``warm_up`` runs first, inside the same signal handling.
    """
    failure: Failure | None = None
    try:
        if warm_up is not None:
            warm_up()
        for i, prompt in enumerate(todo, start=1):
            if stop.requested:
                break
            try:
                rec = run_one(prompt)
            except Exception as err:  # noqa: BLE001 - a failed unit is recorded, not lost
                bench.free_memory()
                rec = failed_record(prompt, dataset, err)
                if not continue_on_error:
                    failure = (prompt["id"], err)
            if rank is not None:
                rec["rank"] = rank
            with stop.committing():
                if log is not None:
                    log.add(rec)
                records.append(rec)
                if on_record is not None:
                    on_record(i, prompt, rec)
            if failure:
                break
    except KeyboardInterrupt:  # the unit in progress is dropped
        stop.note(signal.SIGINT)
    finally:
        stop.disarm()
    return failure


def sort_like(records: list[dict], prompts: Sequence[dict]) -> list[dict]:
    """``records`` in dataset order (resumed and new units, every rank's, interleave)."""
    order = {p["id"]: i for i, p in enumerate(prompts)}
    return sorted(records, key=lambda r: order.get(r["id"], 0))


def run_status(records: Sequence[dict], expected: int, *, interrupted_by: str | None,
               stopped_on_error: bool, resumed: int, ignored_lines: int) -> dict:
    """How the run ended, in the keys every summary carries (docs/ROBUSTNESS.md)."""
    failed = sum(1 for r in records if "error" in r)
    return {
        "complete": interrupted_by is None and not stopped_on_error and len(records) == expected,
        "interrupted_by": interrupted_by,
        "stopped_on_error": stopped_on_error,
        "samples_expected": expected,
        "samples_done": len(records),
        "samples_failed": failed,
        "samples_resumed": resumed,
        "jsonl_ignored_lines": ignored_lines,
    }


def raise_failure(failure: Failure | None) -> None:
    """The failure that stopped the run, as the CLI's error: out of memory is one line (exit
    1) naming the sample and what to do; anything else is re-raised as it was."""
    if failure is None:
        return
    sample_id, err = failure
    if bench.is_out_of_memory(err):
        raise UserError(f"out of memory on sample {sample_id}; the summary covers the "
                        "samples before it",
                        "lower --max-new-tokens, or pass --continue-on-error",
                        exit_code=EXIT_FAILED) from err
    raise err


def incomplete_line(s: dict) -> str | None:
    """The summary's closing remark on an unfinished run (None when complete)."""
    if s.get("interrupted_by"):
        return (f"run interrupted ({s['interrupted_by']}): summary covers the "
                f"{s['samples_done']} finished samples of {s['samples_expected']} "
                "(rerun with --resume)")
    if not s.get("complete", True):
        if "samples_expected" in s:
            return (f"run incomplete: {s['samples_done']} of {s['samples_expected']} samples "
                    "(rerun with --resume)")
        return "run incomplete: the summary covers the finished samples only (rerun with --resume)"
    return None


def closing_lines(s: dict, path) -> list[str]:
    """The last lines of every CLI's printed summary: failures, completeness, where it is."""
    lines = [f"failed samples: {s['samples_failed']}"] if s.get("samples_failed") else []
    if incomplete_line(s):
        lines.append(incomplete_line(s))
    return lines + [f"results: {path}"]
