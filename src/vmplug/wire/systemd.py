"""systemd's two wire protocols, without libsystemd: ``sd_notify`` and journald's
native protocol.

``sd_notify(3)`` is one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX``
socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``).  The watchdog asks for ``WATCHDOG=1`` every ``$WATCHDOG_USEC``
microseconds, and only from the process ``$WATCHDOG_PID`` names when it is set.

journald's native protocol (``systemd.journal-fields(7)``, "Native Journal
Protocol"): one datagram to ``/run/systemd/journal/socket``, each field
``NAME=value\\n``, or, for a value with a newline in it, ``NAME\\n`` + its
length as 64-bit little endian + the bytes + ``\\n``.  A record too big for a
datagram goes in a sealed memfd passed with ``SCM_RIGHTS``.

:func:`journal_is_stderr` says whether fd 2 really is the journal's stream
(``$JOURNAL_STREAM`` is ``DEV:INO`` of it; a child whose stderr was redirected
inherits the variable but not the stream).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: logging level -> syslog priority (journald's PRIORITY=)
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

#: a record attribute with this prefix (``extra={"VMPLUG_VM": ...}``) is a journal field
FIELD_PREFIX = "VMPLUG_"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (between two levels: the lower one's)."""
    for level in sorted(PRIORITY, reverse=True):
        if levelno >= level:
            return PRIORITY[level]
    return 7


def _address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as a socket address: ``@x`` is the abstract name ``\\0x``."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """sd_notify to the service manager, or nothing when there is none.

    ``send`` never raises: a daemon that cannot tell systemd something keeps
    running (systemd then times it out, which says more than a traceback).
    """

    def __init__(
        self, socket_name: str | None, watchdog_usec: int | None = None, *, pid: int | None = None
    ) -> None:
        self.address = _address(socket_name) if socket_name else None
        self.watchdog_usec = watchdog_usec
        self.pid = os.getpid() if pid is None else pid
        self._sock: socket.socket | None = None
        #: the last error sending (for the log, once)
        self.error: OSError | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        The watchdog is ours only when ``WATCHDOG_PID`` is unset or names this
        process (``sd_watchdog_enabled(3)``); a value that is not a positive
        number means no watchdog.
        """
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        if raw.isdigit() and int(raw) > 0:
            usec = int(raw)
            wpid = env.get("WATCHDOG_PID", "")
            if wpid and (not wpid.isdigit() or int(wpid) != os.getpid()):
                usec = None
        return cls(name, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC``."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, **fields: str | int) -> bool:
        """One notification: ``send(READY=1, STATUS="...")``.  True when sent."""
        if self.address is None:
            return False
        text = "".join(f"{k}={_one_line(str(v))}\n" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            self.error = exc
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253+ wants it; older ignore it)."""
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    """A notification value is one line (a newline would start another field)."""
    return value.replace("\n", " ")


# ---------------------------------------------------------------------------
# journald


def journal_is_stderr(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEV:INO``) is the very file ``fd`` is."""
    env = os.environ if environ is None else environ
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _field_name(name: str) -> str | None:
    """A journal field name (upper case, digits, ``_``; not starting with ``_``), or None."""
    name = name.upper()
    if not name or name[0] == "_" or name[0].isdigit() or len(name) > 64:
        return None
    if not all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in name):
        return None
    return name


def encode_fields(fields: Mapping[str, str | int]) -> bytes:
    """Fields in the native protocol's form (names checked, values binary-safe)."""
    out = bytearray()
    for raw_name, raw_value in fields.items():
        name = _field_name(raw_name)
        if name is None:
            continue
        value = str(raw_value).encode("utf-8", "replace")
        if b"\n" in value:
            out += name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += name.encode() + b"=" + value + b"\n"
    return bytes(out)


class JournalSender:
    """Datagrams to journald's native socket (a memfd for one too big)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, str | int]) -> None:
        data = encode_fields(fields)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("vmplug-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            import fcntl  # noqa: PLC0415

            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournalHandler(logging.Handler):
    """A logging handler writing structured records to journald.

    ``MESSAGE`` is what the handler's formatter makes of the record (set one
    that makes it one safe line); ``PRIORITY`` comes from the level,
    ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC`` from the call site, and every
    record attribute named ``VMPLUG_*`` (``extra={"VMPLUG_VM": "windows"}``)
    becomes a field of that name, so ``journalctl VMPLUG_VM=windows`` finds it.
    A record journald does not take falls back to ``fallback`` (stderr's
    handler) rather than being lost.
    """

    def __init__(
        self,
        sender: JournalSender | None = None,
        *,
        identifier: str = "vmplug",
        fallback: Callable[[logging.LogRecord], object] | None = None,
    ) -> None:
        super().__init__()
        self.sender = sender or JournalSender()
        self.identifier = identifier
        self.fallback = fallback

    def fields(self, record: logging.LogRecord) -> dict[str, str | int]:
        fields: dict[str, str | int] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
            "LOGGER": record.name,
        }
        for key, value in record.__dict__.items():
            if key.startswith(FIELD_PREFIX) and value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.send(self.fields(record))
        except OSError:
            if self.fallback is not None:
                self.fallback(record)
            else:
                self.handleError(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sender.close()
        super().close()
