"""The results log of benchmark_sglang.py: a JSONL whose first record is a header (the run
identity), then one record per finished configuration, each flushed and fsynced as it ends.

An existing log is never moved aside or overwritten behind the user's back: one that holds
finished configurations is refused before anything starts unless --resume continues it (and
then only when the identity matches); one without any (a run that failed before its first
configuration) is started anew, and the run says so.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..errors import UserError
from ..runlog import read_jsonl

LOG_VERSION = 1
RESULT_KEYS = {"backend", "mode", "concurrency"}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_log(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header or None, result records, unreadable lines skipped: a torn last line)."""
    records, bad = read_jsonl(path)
    header = next((r for r in records if r.get("record") == "header"), None)
    results = [r for r in records if r.get("record") == "result" and RESULT_KEYS <= r.keys()]
    return header, results, bad


def precheck(path: Path, resume: bool, flag: str) -> None:
    """Before anything starts: a log with finished configurations needs --resume."""
    if resume or not path.is_file():
        return
    _, results, _ = read_log(path)
    if results:
        raise UserError(f"{flag} {path} already holds {len(results)} finished "
                        f"configuration(s)", "pass --resume to continue that run, or choose "
                        "another --output-md / --results-jsonl; nothing was run or written")


def config_key(rec: dict) -> tuple[str, str, int, str]:
    """(backend, mode, concurrency, engine): one log may hold several engines' runs (records
    written before --engine existed are SGLang's)."""
    return (rec["backend"], rec["mode"], int(rec["concurrency"]), rec.get("engine", "sglang"))


class ResultStore:
    """Append-only JSONL: a header record (the run configuration), then one record per
    finished configuration, each flushed and fsynced."""

    def __init__(self, path: Path, identity: dict, resume: bool, argv: list[str],
                 identity_keys: tuple[str, ...] = (), identity_defaults: dict | None = None):
        self.path = path
        self.identity = identity
        self.results: dict[tuple, dict] = {}
        self.notes: list[str] = []
        existing = read_log(path) if path.is_file() else None
        if resume and existing is not None and (existing[0] or existing[1]):
            header, results, bad = existing
            if header is None:
                raise UserError(f"--resume: {path} has no header record",
                                "use another --output-md / --results-jsonl, or drop --resume")
            theirs = {**(identity_defaults or {}), **header.get("identity", {})}
            keys = identity_keys or tuple(identity)
            diff = [f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now"
                    for k in keys if theirs.get(k) != identity.get(k)]
            if diff:
                raise UserError(f"--resume: {path} was recorded with another configuration ("
                                + "; ".join(diff) + ")",
                                "rerun with the same flags, use another --output-md, or drop "
                                "--resume to start over")
            for rec in results:
                self.results[config_key(rec)] = rec
            if bad:
                self.notes.append(f"ignored {bad} unreadable line(s) in {path} (a run cut "
                                  f"off mid-write)")
                self._end_partial_line()
            self.notes.append(f"resuming {path}: {len(self.results)} configuration(s) already "
                              f"recorded")
            return
        if existing is not None:
            if existing[1]:  # precheck refuses this before anything starts; never lose results
                raise UserError(f"{path} already holds finished configurations",
                                "pass --resume to continue that run")
            self.notes.append(f"{path} held no finished configuration; started it anew")
            path.unlink()
        elif resume:
            self.notes.append(f"--resume: {path} does not exist yet; starting a new run")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"record": "header", "version": LOG_VERSION, "created": now(),
                      "identity": identity, "argv": argv})

    def _end_partial_line(self) -> None:
        """A crash mid-write leaves a last line without newline: end it, so the next record
        starts on a line of its own."""
        with open(self.path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def has(self, backend: str, mode: str, concurrency: int, engine: str = "sglang") -> bool:
        return (backend, mode, concurrency, engine) in self.results

    def add(self, rec: dict) -> None:
        rec = dict(rec, record="result")
        self._append(rec)
        self.results[config_key(rec)] = rec
