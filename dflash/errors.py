"""One user-facing error style for every CLI: a single line on stderr, a hint, an exit code.

Scripts wrap their ``main`` with :func:`run_cli`; library code raises :class:`UserError` for
anything the user can fix (bad flag, missing model, unknown dataset, port in use...).

Exit codes shared by every CLI:

    0    success
    1    the run failed (out of memory without --continue-on-error, a server that died, a bug)
    2    bad input: a flag, a path, a dataset name, a configuration mismatch on --resume
    130  interrupted by SIGINT (Ctrl-C): the summary of the finished units was written
    143  terminated by SIGTERM: the summary of the finished units was written
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import traceback
from typing import Callable, Iterator, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """An error the user can fix. Printed as one line, no traceback."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text


class CliArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UserError` (one line, exit 2) instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message, f"see {self.prog} --help")


def _verbose_requested(argv: Sequence[str]) -> bool:
    return "--verbose" in argv or os.environ.get("DFLASH_VERBOSE") == "1"


def fail(message: str, hint: str | None = None, exit_code: int = EXIT_USAGE) -> None:
    raise UserError(message, hint, exit_code)


@contextlib.contextmanager
def one_line_argparse_errors() -> Iterator[None]:
    """While active, a plain ``argparse.ArgumentParser`` raises UserError instead of printing
    its usage block and exiting, so every CLI's bad flags read the same (parsers that define
    their own ``error`` keep it)."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        raise UserError(message, f"see {self.prog} --help")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def exit_promptly_on_signal(code: int) -> None:
    """From here on the process only exits: a further Ctrl-C or SIGTERM (a second Ctrl-C while
    the summary is printed, or while the interpreter tears torch down, which takes a while)
    ends it at once, with ``code`` (or 128 + the signal when ``code`` is 0), instead of a
    KeyboardInterrupt traceback or a death by signal."""
    def handler(signum, _frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a write the signal interrupted
                pass
        os._exit(code if code else 128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            *, as_process: bool | None = None) -> None:
    """Run ``main(argv)`` and turn errors into one line on stderr and an exit code.

    UserError -> its exit code; KeyboardInterrupt -> 130; anything else -> 1 with a one-line
    summary (``--verbose`` or DFLASH_VERBOSE=1 shows the traceback).

    ``as_process`` (default: ``argv`` is None, i.e. a script's entry point) also makes a
    signal that arrives after ``main`` ended exit at once with the code already decided
    (:func:`exit_promptly_on_signal`); in-process callers (tests) keep their handlers.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if as_process is None:
        as_process = argv is None
    verbose = _verbose_requested(args)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dflash"
    try:
        with one_line_argparse_errors():
            code = int(main(args) or 0)
    except UserError as err:
        code = err.exit_code
        if as_process:
            exit_promptly_on_signal(code)
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {err.one_line()}", file=sys.stderr)
        if as_process and code not in (EXIT_SIGINT, EXIT_SIGTERM):  # a signal: torchrun's own
            end_torchrun_quietly()
    except BrokenPipeError:
        # The reader went away (``... | head``): what it wanted is printed; stop quietly.
        _silence_stdout()
        code = 0
    except KeyboardInterrupt:
        code = EXIT_SIGINT
        if as_process:
            exit_promptly_on_signal(code)
        if verbose:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - last-resort boundary of a CLI
        code = EXIT_FAILED
        if as_process:
            exit_promptly_on_signal(code)
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {type(err).__name__}: {_first_line(err)} "
              "(rerun with --verbose for the traceback)", file=sys.stderr)
    else:
        if as_process:
            exit_promptly_on_signal(code)
    if as_process and code in (EXIT_SIGINT, EXIT_SIGTERM):
        _exit_now(code)
    sys.exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _exit_now(code: int) -> None:
    """End a run that a signal stopped (its summary is written) without the interpreter's
    teardown: late in that teardown Python puts back the default signal handlers, so one
    more Ctrl-C there would kill the process by SIGINT instead of exiting with ``code``.
    atexit functions still run, and the standard streams are flushed."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def parse_int_list(text, name: str, *, minimum: int | None = None, duplicates: str = "drop",
                   example: str = "8,12,16", why: str = "",
                   wording: dict[str, str] | None = None) -> list[int]:
    """Comma- or whitespace-separated integers (``"8,12,16"``, ``"4 8"``) -> a list, in order.

    ``duplicates``: ``drop`` (keep the first), ``keep`` or ``refuse``; ``minimum``: the smallest
    value allowed (``why`` says why, in the error). Every failure is one UserError naming ``name``.
    ``wording`` overrides messages a CLI already documents (keys ``not_int``, ``below``,
    ``twice``, ``empty``, ``hint``; ``str.format`` fields name, item, value, minimum, why).
    """
    texts = {"not_int": "{name} must be integers, got '{item}'",
             "below": "{name} must be >= {minimum}{why}, got {value}",
             "twice": "{name} lists {value} twice", "empty": "{name} is empty",
             "hint": "use a comma-separated list of integers such as {example}"}
    texts.update(wording or {})

    def say(key: str, **fields) -> str:
        return texts[key].format(name=name, minimum=minimum, why=why, example=example, **fields)

    hint = say("hint")
    values: list[int] = []
    for item in re.split(r"[\s,]+", str(text).strip()):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise UserError(say("not_int", item=item), hint) from None
        if minimum is not None and value < minimum:
            raise UserError(say("below", value=value), hint)
        if value in values:
            if duplicates == "refuse":
                raise UserError(say("twice", value=value), hint)
            if duplicates == "drop":
                continue
        values.append(value)
    if not values:
        raise UserError(say("empty"), hint)
    return values


# -- a refusal under a direct ``torchrun`` launch -------------------------------------------
# torchrun (torch.distributed.run) ends in one of three ways: exit 0 when every worker exited 0;
# a ChildFailedError traceback and exit 1 when one did not (raised by launch_agent, re-raised by
# the @record wrapper of its main); or death by a signal it does not handle (it turns SIGTERM,
# SIGINT, SIGHUP and SIGQUIT into a SignalException traceback). A worker cannot set its exit
# status, so the only quiet non-zero end is the last: after a UserError's one line the worker
# SIGKILLs its agent (exit status 137 for the shell) and the sibling workers, which the agent
# would otherwise stop itself. A crash (any other exception) keeps torchrun's report.

QUIET_TORCHRUN_ENV = "DFLASH_QUIET_TORCHRUN"   # "0": leave torchrun's report (the wrappers filter it)
_TORCHRUN_ARGV = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers are session leaders)."""
    kids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return kids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def torchrun_agent() -> int | None:
    """The pid of the torchrun agent that started this process directly, on one node; None
    otherwise (not under torchrun, several nodes, no /proc, or the wrappers asked to keep the
    report: their filter keeps the worker's exit status)."""
    env = os.environ
    if env.get(QUIET_TORCHRUN_ENV, "1") == "0" or "TORCHELASTIC_RUN_ID" not in env:
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        return None  # other nodes' agents learn of a failure from this one's rendezvous
    parent = os.getppid()
    argv = _cmdline(parent)
    if parent <= 1 or not any(os.path.basename(a) in _TORCHRUN_ARGV or a in _TORCHRUN_ARGV
                              for a in argv[:3]):
        return None
    return parent


def end_torchrun_quietly() -> None:
    """Under a direct single-node torchrun launch: stop the agent before it reports this
    worker's failure (see above), then the other workers; a no-op anywhere else."""
    agent = torchrun_agent()
    if agent is None:
        return
    siblings = [p for p in _children(agent) if p != os.getpid()]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.kill(agent, signal.SIGKILL)  # first: it polls its workers every 0.1 s
    except OSError:
        return
    for pid in siblings:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
