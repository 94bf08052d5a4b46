"""Server processes for the serving benchmark: launch commands, the GPU and package checks,
ports, readiness, log tails, and a shutdown that reaches every process of a server on every
exit path (normal end, error, Ctrl-C, SIGTERM, interpreter exit, kill -9 of this process)."""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .cli import LAUNCH_ENV_DEFAULTS, LAUNCH_ENV_VAR, MIN_SGLANG
from .client import check_ready_once
from .store import now as _now

# ----------------------------------------------------------------------------- launch commands

def launch_override(args: argparse.Namespace, env_var: str) -> list[str] | None:
    """The launch command given by --server-cmd or ``env_var`` (split like a shell), or None."""
    override = args.server_cmd or os.environ.get(env_var)
    if not override:
        return None
    try:
        prefix = shlex.split(override)
    except ValueError as err:
        raise UserError(f"the launch command override cannot be parsed ({err})") from None
    if not prefix:
        raise UserError("the launch command override is empty")
    return prefix


def launch_prefix(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The command that replaces ``python -m sglang.launch_server``, and whether overridden."""
    prefix = launch_override(args, LAUNCH_ENV_VAR)
    if prefix:
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


def package_version(package: str) -> str | None:
    """The installed version of ``package``; None when absent, "unknown" without metadata."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001 - installed from source without metadata
        return "unknown"


def sglang_version() -> str | None:
    return package_version("sglang")


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


def require_package_and_gpu(engine: str, package: str, version: str | None, gpu: GpuInfo,
                            hint: str) -> None:
    """One line naming everything missing for launching ``engine`` servers here."""
    problems = []
    if version is None:
        problems.append(f"{package} is not installed in this Python ({sys.executable})")
    if not gpu.available:
        problems.append(gpu.reason)
    if problems:
        raise UserError(f"{engine} needs a CUDA GPU and the {package} package: "
                        + "; ".join(problems), hint)


def check_server_environment(args: argparse.Namespace, overridden: bool, *, engine: str,
                             package: str, version: str | None, hint: str,
                             minimum: tuple[int, ...], too_old: tuple[str, str]) -> GpuInfo | None:
    """What launching ``engine`` servers needs here (the package at ``minimum`` or newer, a
    GPU, enough GPUs for --tp-size); return the GPU (None when unknown). A custom launcher
    (``overridden``: tests, containers...) is trusted."""
    gpu = detect_gpu()
    if overridden:
        return gpu if gpu.available else None
    require_package_and_gpu(engine, package, version, gpu, hint)
    found = _version_tuple(version) if version != "unknown" else None
    if found and found[:len(minimum)] < minimum:
        raise UserError(*too_old)
    if args.tp_size > gpu.count:
        raise UserError(f"--tp-size {args.tp_size} needs {args.tp_size} GPUs; {gpu.count} visible")
    return gpu


def check_launch_environment(args: argparse.Namespace, overridden: bool) -> GpuInfo | None:
    """Make sure SGLang servers can be launched here; return the GPU (None when unknown)."""
    version = None if overridden else sglang_version()
    return check_server_environment(
        args, overridden, engine="SGLang", package="sglang", version=version,
        hint="run this on a GPU machine in the SGLang environment (docs/SGLANG.md: "
             "pip install -r requirements-sglang.txt), or pass --base-url to benchmark a "
             "running server",
        minimum=MIN_SGLANG,
        too_old=(f"sglang {version} has no DFLASH speculative algorithm",
                 "install sglang>=0.5.11 (pip install -r requirements-sglang.txt)"))


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
                 port: int, label: str, grace_s: float, ready=None):
        self.cmd, self.env_add, self.log_path, self.label = cmd, env_add, log_path, label
        self.ready = ready or check_ready_once  # (url, timeout) -> (ready, what was seen)
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
            ok, seen = self.ready(self.url, max(0.5, min(30.0, remaining)))
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


