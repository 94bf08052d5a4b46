"""One user-facing error style for every CLI: a single line on stderr, a hint, an exit code.

Scripts wrap their ``main`` with :func:`run_cli`; library code raises :class:`UserError` for
anything the user can fix (bad flag, missing model, unknown dataset, port in use...).
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence


class UserError(Exception):
    """An error the user can fix. Printed as one line, no traceback."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def one_line(self) -> str:
        text = self.message.strip().replace("\n", " ")
        if self.hint:
            text += f" ({self.hint.strip()})"
        return text


def _verbose_requested(argv: Sequence[str]) -> bool:
    return "--verbose" in argv or os.environ.get("DFLASH_VERBOSE") == "1"


def fail(message: str, hint: str | None = None, exit_code: int = 2) -> None:
    raise UserError(message, hint, exit_code)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and turn errors into one line on stderr and an exit code.

    UserError -> its exit code; KeyboardInterrupt -> 130; anything else -> 1 with a one-line
    summary (``--verbose`` or DFLASH_VERBOSE=1 shows the traceback).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    prog = os.path.basename(sys.argv[0]) or "dflash"
    try:
        code = main(args)
    except UserError as err:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {err.one_line()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - last-resort boundary of a CLI
        if verbose:
            traceback.print_exc()
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{prog}: error: {type(err).__name__}: {msg} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(int(code or 0))
