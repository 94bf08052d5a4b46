"""Crash-safe result files: JSONL appended per finished unit, atomic summary writes, resume.

A run's JSONL starts with a header record ``{"type": "header", "config": {...}}``; each finished
unit is one ``{"type": "sample", ...}`` line, flushed and fsynced as soon as it exists. A rerun
with ``resume=True`` keeps the recorded units when the configuration matches and refuses to
mix results when it does not. A partial last line (a crash mid-write) is ignored and reported.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError

# Keys of a run configuration that may differ between a run and its resumption.
VOLATILE_KEYS = {"resume", "verbose", "save_outputs_path", "output_json", "continue_on_error",
                 "world_size", "rank"}


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """Records of a JSONL file and the number of unreadable (partial) lines skipped."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


class RunLog:
    """Append-only JSONL of one run's finished units (safe across ranks via flock)."""

    def __init__(self, path: str | Path, config: dict, resume: bool = False, write_header: bool = True):
        self.path = Path(path)
        self.config = config
        self.done: dict[str, dict] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            records, bad = read_jsonl(self.path)
            if bad:
                print(f"note: ignored {bad} partial line(s) in {self.path}", file=sys.stderr)
            if not resume:
                if write_header:
                    raise UserError(f"{self.path} already holds results",
                                    "pass --resume to continue that run, or choose another path")
            else:
                header = next((r for r in records if r.get("type") == "header"), None)
                if header is not None and comparable(header.get("config", {})) != comparable(config):
                    diff = sorted(k for k in set(comparable(config)) | set(comparable(header["config"]))
                                  if comparable(config).get(k) != comparable(header["config"]).get(k))
                    raise UserError(f"{self.path} was written by a different configuration "
                                    f"(differs in: {', '.join(diff)})",
                                    "resume with the same flags, or write to another path")
                for r in records:
                    if r.get("type") == "sample" and "id" in r:
                        self.done[r["id"]] = r
                write_header = header is None and write_header
        if write_header:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "header", "config": config})

    def _append(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def add(self, record: dict) -> None:
        record = {"type": "sample", **record}
        self._append(record)
        self.done[record["id"]] = record
