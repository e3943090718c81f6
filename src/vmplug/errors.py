"""Error types.  Every error a user can cause derives from :class:`VmplugError`.

The CLI turns a ``VmplugError`` into a message on stderr and ``exit_code``;
anything else is a bug and is reported as one.
"""

from __future__ import annotations


class VmplugError(Exception):
    """An error caused by input or environment, reported without a traceback."""

    exit_code: int = 1

    def render(self) -> str:
        return str(self)


class UsageError(VmplugError):
    """Bad input on the command line (exit status 2)."""

    exit_code = 2


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
