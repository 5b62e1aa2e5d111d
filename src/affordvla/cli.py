"""How every affordvla command ends when it fails: one line naming what is wrong, and a non-zero exit status.

A user who typed a command wants to know which file, entry or option to fix, not where in the library the
check sits; the traceback is shown only when asked for, with `HYDRA_FULL_ERROR=1` (Hydra's own switch, so one
variable serves every command) or `--debug` on the argparse commands.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

DEBUG_ENV = "HYDRA_FULL_ERROR"
DEBUG_FLAG = "--debug"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

log = logging.getLogger("affordvla")
F = TypeVar("F", bound=Callable[..., Any])


def traceback_wanted() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(exc: BaseException) -> str:
    """The exception as the user should read it: its own message, after the type name where the message alone
    does not say what kind of failure it is (a library's TypeError or KeyError)."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and (not message or isinstance(exc, InstantiationException)):
        return describe(cause)  # Hydra's wrapper adds the target's call over the error that says what is wrong
    if isinstance(exc, (ValueError, OSError)) and message:  # the project's checks raise these, as sentences
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def report_failure(command: str, exc: BaseException) -> int:
    """Print the one-line error (and the hint for the traceback) to stderr; returns the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{command}: error: {describe(exc)}", file=sys.stderr)
    print(f"{command}: set {DEBUG_ENV}=1 (or pass {DEBUG_FLAG}) to see the traceback", file=sys.stderr)
    return EXIT_FAILURE


def console_command(command: str) -> Callable[[F], F]:
    """Decorate an argparse `main(argv) -> int`: failures become one line and exit status 1, unless `--debug`
    is in argv or the debug variable is set, where the exception propagates with its traceback."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv or traceback_wanted()
            argv = [a for a in argv if a != DEBUG_FLAG]
            try:
                return main(argv)
            except SystemExit:
                raise
            except (Exception, KeyboardInterrupt) as exc:
                if debug:
                    raise
                return report_failure(command, exc)

        return wrapper  # type: ignore[return-value]

    return decorate


@contextmanager
def failures_reported(command: str) -> Iterator[None]:
    """For Hydra task functions: Hydra prints a long traceback for an exception raised inside the task, so a
    failure is reported here as one line and the process exits with status 1. Under a multirun sweep the
    exception goes on to Hydra, whose launcher records the failed job."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if traceback_wanted() or _in_multirun():
            if not traceback_wanted():
                log.error("%s: %s", command, describe(exc))
            raise
        sys.exit(report_failure(command, exc))


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
