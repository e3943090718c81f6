"""Exit statuses: the one place an error becomes a number.

Errors carry what went wrong (their message and structured fields); only the
command line decides what that means for its exit status:

* 0 success;
* 1 failure or nothing found: any :class:`~vmplug.errors.VmplugError`, an
  :class:`OSError`, and what the daemon's API refused for its own reasons;
* 2 bad input: a :class:`~vmplug.errors.UsageError` (a bad rule, selector,
  config file, value a generator cannot express, ...), what click rejects
  on the command line, and a request the daemon's API called bad (HTTP 400,
  404, 422);
* 70 an internal error (a bug: the message says so); 130 interrupted;
  141 a closed pipe (``vmplug list | head``).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, NoReturn

import click

from vmplug.errors import UsageError, VmplugError
from vmplug.textsafe import printable_lines

OK = 0
FAILURE = 1
BAD_INPUT = 2
INTERNAL = 70
INTERRUPTED = 130
BROKEN_PIPE = 141

#: HTTP statuses of the daemon's API that mean the request itself was wrong.
BAD_REQUEST_STATUSES = frozenset({400, 404, 422})


def exit_status(error: BaseException) -> int:
    """The exit status of the ``vmplug`` command that ends with ``error``."""
    if isinstance(error, click.exceptions.Exit):
        return error.exit_code
    if isinstance(error, VmplugFailure):
        return exit_status(error.error)
    if isinstance(error, click.ClickException):
        return error.exit_code  # click's own: 2 for a usage error
    if isinstance(error, click.exceptions.Abort | KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, UsageError):
        return BAD_INPUT
    if isinstance(error, VmplugError):
        from vmplug.api.client import ApiError  # noqa: PLC0415 - only on the way out

        if isinstance(error, ApiError) and error.status in BAD_REQUEST_STATUSES:
            return BAD_INPUT  # the daemon called the request bad
        return FAILURE
    if isinstance(error, BrokenPipeError):
        return BROKEN_PIPE
    if isinstance(error, OSError):
        return FAILURE
    return INTERNAL


class VmplugFailure(click.ClickException):
    """A :class:`VmplugError` on its way out of click: its text, its exit status."""

    def __init__(self, error: VmplugError) -> None:
        super().__init__(error.render())
        self.error = error
        self.exit_code = exit_status(error)  # type: ignore[misc]  # click's class default

    def show(self, file: Any = None) -> None:
        click.echo(printable_lines(self.message), err=True)


def print_traceback() -> None:
    """The traceback of the error being handled (``--debug``), on stderr."""
    traceback.print_exc()


def _fail(message: str, code: int) -> NoReturn:
    # the last safeguard: no control character of a device or a peer reaches the terminal
    click.echo(printable_lines(message), err=True)
    raise SystemExit(code)


def exit_on(exc: BaseException, *, debug: bool) -> NoReturn:
    """End the process for ``exc``, which ended the command: a message, no
    traceback (unless ``debug``), and the exit status :func:`exit_status` gives."""
    if isinstance(exc, SystemExit):
        raise exc
    if not isinstance(exc, Exception | KeyboardInterrupt):
        raise exc  # GeneratorExit and the like are not ours to turn into a status
    code = exit_status(exc)
    if isinstance(exc, click.exceptions.Abort):
        _fail("aborted", code)
    if isinstance(exc, click.ClickException):
        exc.show()
        raise SystemExit(code) from None
    if isinstance(exc, click.exceptions.Exit):
        raise SystemExit(code) from None
    if isinstance(exc, KeyboardInterrupt):
        _fail("interrupted", code)
    if isinstance(exc, BrokenPipeError) and not isinstance(exc, VmplugError):
        sys.stderr.close()
        raise SystemExit(code) from None
    if debug:
        print_traceback()
    if isinstance(exc, VmplugError):
        _fail(exc.render(), code)
    if isinstance(exc, OSError):
        _fail(f"vmplug: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), code)
    _fail(
        f"vmplug: internal error: {type(exc).__name__}: {exc}\n"
        "This is a bug; run again with --debug for the traceback and report it.",
        code,
    )


__all__ = [
    "BAD_INPUT",
    "BROKEN_PIPE",
    "FAILURE",
    "INTERNAL",
    "INTERRUPTED",
    "OK",
    "VmplugFailure",
    "exit_on",
    "exit_status",
    "print_traceback",
]
