"""The wire layer's errors: structured, rooted at :class:`~vmplug.errors.VmplugError`.

Callers decide on the class and the fields (``qmp_class``, ``status``), never
on the message; the CLI maps them to exit codes.
"""

from __future__ import annotations

from vmplug.errors import VmplugError


class WireError(VmplugError):
    """A QMP or guest-agent exchange failed: transport, timeout or an error reply.

    ``address`` is the peer as given (a socket path or ``tcp:HOST:PORT``),
    ``command`` the command that failed (None while connecting), ``qmp_class``
    QEMU's error class when the peer answered with an error.
    """

    def __init__(
        self,
        message: str,
        *,
        address: str | None = None,
        command: str | None = None,
        qmp_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.address = address
        self.command = command
        self.qmp_class = qmp_class


class AddressError(WireError, ValueError):
    """A QMP or agent address that cannot be parsed (also a :class:`ValueError`)."""


class WireTimeout(WireError):
    """The peer did not answer in time (for QMP: often another client holds the socket)."""


class CommandError(WireError):
    """The peer answered a command with an ``error`` object (``qmp_class``, ``desc``)."""

    def __init__(
        self, command: str, qmp_class: str, desc: str, *, address: str | None = None
    ) -> None:
        super().__init__(
            f"{command}: {qmp_class}: {desc}", address=address, command=command, qmp_class=qmp_class
        )
        self.desc = desc

    @property
    def error_class(self) -> str:
        """QEMU's name for :attr:`qmp_class` (``GenericError``, ``CommandNotFound``...)."""
        return self.qmp_class or ""


class AgentError(WireError):
    """The guest agent is unreachable, did not answer, or did not finish in time."""


class AgentCommandError(AgentError, CommandError):
    """The guest agent answered a command with an ``error`` object."""


class EngineError(VmplugError, OSError):
    """A Docker/Podman Engine API call failed.

    ``address`` is the API endpoint (socket path or URL), ``path`` the request
    path, ``status`` the HTTP status when the engine answered (None when it
    could not be reached or did not answer in time).  It is also an
    :class:`OSError`: the engine is part of the environment, like a socket.
    """

    def __init__(
        self,
        message: str,
        *,
        address: str | None = None,
        path: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.address = address
        self.path = path
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


__all__ = [
    "AddressError",
    "AgentCommandError",
    "AgentError",
    "CommandError",
    "EngineError",
    "WireError",
    "WireTimeout",
]
