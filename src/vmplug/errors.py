"""Error types.  Every error a user can cause derives from :class:`VmplugError`.

Errors say what went wrong (their message and structured fields), never how
a process should exit: the CLI turns a ``VmplugError`` into a message on stderr
and an exit status (:mod:`vmplug.cli.errors`: a :class:`UsageError` is bad
input, 2; any other, 1); anything else is a bug and is reported as one.
"""

from __future__ import annotations


class VmplugError(Exception):
    """An error caused by input or environment, reported without a traceback."""

    def render(self) -> str:
        return str(self)


class UsageError(VmplugError):
    """Bad input: the command line, a rule, a selector, a config file (exit status 2)."""


class SelectorError(UsageError):
    """A device selector matched nothing, or more than one device."""

    def __init__(self, message: str, candidates: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.candidates = candidates

    def render(self) -> str:
        if not self.candidates:
            return str(self)
        lines = [str(self), "candidates:"]
        lines.extend(f"  {c}" for c in self.candidates)
        return "\n".join(lines)
