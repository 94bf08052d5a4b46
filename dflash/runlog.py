"""Crash-safe result files: JSONL appended per finished unit, atomic summary writes, resume.

A run's JSONL starts with a header record ``{"type": "header", "config": {...}}``; each finished
unit is one ``{"type": "sample", ...}`` line, flushed and fsynced as soon as it exists (a failed
unit carries an ``"error"`` key). A rerun with ``resume=True`` keeps the recorded units when the
configuration matches and refuses to mix results when it does not; failed units are retried.
A partial line (a crash mid-write) is ignored and reported, never fatal.

:class:`GracefulStop` turns SIGINT / SIGTERM into "drop the unit in progress, keep what
finished": the caller writes the summary of the finished units and exits 130 / 143.
No torch here: the serving client and the wrappers import this module too.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

# Keys of a run configuration that may differ between a run and its resumption: they change
# where results go or how many units are selected, never what one unit's result is.
VOLATILE_KEYS = {"resume", "verbose", "save_outputs_path", "output_json", "continue_on_error",
                 "world_size", "rank", "max_samples"}


# ----------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, default=_json_default) + "\n")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
    """NaN / inf -> None, so every summary is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- locations
def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable(path: str | Path, flag: str) -> None:
    """``path`` can be created or replaced: its nearest existing ancestor is a writable
    folder, no ancestor is a file, and it is not a folder itself. Creates nothing."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty", "give a file path")
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory", "give a file path")
    probe = _nearest_existing(target.resolve().parent)
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder",
                        "choose a writable location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {probe}", "choose a writable location")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path} is not writable", "choose a writable location")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """``path`` is a folder that exists or can be created (nothing on the way is a file)."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty", "give a folder path")
    target = Path(path).expanduser().resolve()
    probe = _nearest_existing(target)
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder",
                        "choose a writable location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {probe}", "choose a writable location")


# ----------------------------------------------------------------------------- reading
def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """Records of a JSONL file and the number of unreadable (partial) lines skipped."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


def config_diff(recorded: dict, current: dict, skip: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ (volatile keys and ``skip`` ignored), with both values."""
    a, b = comparable(recorded), comparable(current)
    skip = set(skip)
    diff = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        if _canon(a.get(key)) != _canon(b.get(key)):
            diff.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return diff


def _canon(value):
    """JSON round trip, so a tuple and the list it was recorded as compare equal."""
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def _has_results(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def precheck(path: str | Path | None, config: dict | None, resume: bool, *,
             unknown: Iterable[str] = ()) -> None:
    """Before any model loads: refuse a results file that :class:`RunLog` would refuse later.

    ``config`` holds what is known of the run's configuration so far (None: do not compare
    yet); keys in ``unknown`` (known only once the models are loaded) are not compared.
    """
    if not path:
        if resume:
            raise UserError("--resume needs the per-sample JSONL of the run to continue",
                            "pass the run's --save-outputs-path")
        return
    path = Path(path)
    if not _has_results(path):
        return
    if not resume:
        raise UserError(f"{path} already holds results",
                        "pass --resume to continue that run, or choose another path")
    if config is not None:
        records, _ = read_jsonl(path)
        _check_header(path, records, config, skip=unknown)


def _check_header(path: Path, records: list[dict], config: dict, skip: Iterable[str] = ()) -> dict | None:
    header = next((r for r in records if r.get("type") == "header"), None)
    if header is None:
        if any(r.get("type") == "sample" for r in records):
            raise UserError(f"{path} has results but no header record, so its configuration "
                            "is unknown", "write to another path, or drop --resume")
        return None
    diff = config_diff(header.get("config") or {}, config, skip)
    if diff:
        raise UserError(f"{path} was written by a different configuration (differs in: "
                        f"{'; '.join(diff)})",
                        "resume with the run's own flags, or write to another path")
    return header


# ----------------------------------------------------------------------------- the log
class RunLog:
    """Append-only JSONL of one run's finished units (safe across ranks via flock).

    ``done``: id -> record of units that finished without error (their latest record);
    ``failed``: id -> record of units whose latest record is an error (retried on resume);
    ``ignored_lines``: unreadable lines skipped (a crash mid-write leaves one).
    """

    def __init__(self, path: str | Path, config: dict, resume: bool = False,
                 write_header: bool = True):
        self.path = Path(path)
        self.config = config
        self.done: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self.ignored_lines = 0
        writer = write_header
        if _has_results(self.path) and (resume or writer):
            # (a rank other than the writer may see the header the writer just wrote)
            if not resume:
                raise UserError(f"{self.path} already holds results",
                                "pass --resume to continue that run, or choose another path")
            records, self.ignored_lines = read_jsonl(self.path)
            if self.ignored_lines and writer:
                print(f"note: ignored {self.ignored_lines} partial line(s) in {self.path}",
                      file=sys.stderr)
            header = _check_header(self.path, records, config)
            for r in records:
                if r.get("type") != "sample" or "id" not in r:
                    continue
                self._note({k: v for k, v in r.items() if k != "type"})
            if writer:
                self._terminate_partial_line()
            write_header = header is None and writer
        if write_header:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "header", "config": config})

    def _terminate_partial_line(self) -> None:
        """A crash mid-write leaves a last line without newline: end it, so the next record
        starts on its own line (the partial one stays ignored)."""
        with open(self.path, "rb+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    return
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _append(self, record: dict) -> None:
        line = json.dumps(_finite(record), default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def add(self, record: dict) -> None:
        """Append one finished (or failed) unit; it is on disk when this returns."""
        self._append({"type": "sample", **record})
        self._note(record)

    def _note(self, record: dict) -> None:
        """A unit's latest record wins: it is done, or failed (and may be retried)."""
        if "error" in record:
            self.failed[record["id"]] = record
            self.done.pop(record["id"], None)
        else:
            self.done[record["id"]] = record
            self.failed.pop(record["id"], None)


# ----------------------------------------------------------------------------- signals
class GracefulStop:
    """SIGINT / SIGTERM while units run: the first signal aborts the unit in progress (a
    KeyboardInterrupt raised where the run is) unless a finished unit is being committed, in
    which case the commit completes and the loop stops before the next unit. After
    :meth:`disarm` (summary phase) signals are only noted, so a second Ctrl-C, or torchrun
    relaying the signal to its workers, cannot cut the summary short.

        with GracefulStop() as stop:
            try:
                for unit in todo:
                    if stop.requested: break
                    rec = run(unit)               # KeyboardInterrupt: unit dropped
                    with stop.committing():
                        log.add(rec)
            except KeyboardInterrupt:
                pass
            stop.disarm()
            write_summary(...)
        return stop.exit_code()                   # 0, 130 or 143
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._armed = False
        self._committing = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        self._armed = True
        return self

    def __exit__(self, *exc) -> None:
        self._armed = False
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._armed and not self._committing:
            self._armed = False  # one KeyboardInterrupt at most
            raise KeyboardInterrupt

    def note(self, signum: int) -> None:
        """Record a stop that happened elsewhere (another rank was interrupted)."""
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        self._committing = True
        try:
            yield
        finally:
            self._committing = False

    def disarm(self) -> None:
        self._armed = False

    def exit_code(self) -> int:
        if self.signum is None:
            return 0
        return 143 if self.signum == signal.SIGTERM else 130

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None
