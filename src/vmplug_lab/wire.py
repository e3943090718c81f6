"""Tiny synchronous JSON-line clients for the lab guest's QMP and guest-agent sockets.

The lab needs nothing asynchronous: one test thread drives one guest.  These
clients are deliberately small and dependency-free so the lab keeps working
even while the production QMP layer (``vmplug.vms.qmp``) changes.

* :class:`QmpClient` speaks QMP to the lab guest's *own* QEMU (hot-plug of
  emulated USB devices into the guest).
* :class:`QgaClient` speaks the QEMU guest-agent protocol to ``qemu-ga``
  running inside the guest, over a virtio-serial port whose host end is a
  unix socket.  The agent has no greeting; a ``guest-sync-delimited``
  exchange with a fresh id before every command discards any stale output
  (the documented way to resynchronise, see qemu-ga-ref).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any


class WireError(RuntimeError):
    """A QMP or guest-agent exchange failed (transport, timeout or error reply)."""


class CommandError(WireError):
    """QEMU or the guest agent answered with an ``error`` object."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class _LineSocket:
    """A unix stream socket read as lines with a deadline."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._buf = b""

    def close(self) -> None:
        self._sock.close()

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def readline(self, deadline: float) -> bytes | None:
        """Next line (without newline), or None when the deadline passes first."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise WireError(f"{self.path}: connection closed by peer")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


class QmpClient:
    """One long-lived QMP connection; events are kept in :attr:`events`."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._conn = _LineSocket(path, timeout)
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        greeting = self._next_message(deadline)
        if "QMP" not in greeting:
            raise WireError(f"{path}: not a QMP greeting: {greeting!r}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._conn.close()

    def _next_message(self, deadline: float) -> dict[str, Any]:
        line = self._conn.readline(deadline)
        if line is None:
            raise WireError(f"{self._conn.path}: timed out waiting for QMP")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise WireError(f"unexpected QMP message {msg!r}")
        return msg

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        tag = secrets.token_hex(4)
        req: dict[str, Any] = {"execute": command, "id": tag}
        if arguments:
            req["arguments"] = arguments
        self._conn.send(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next_message(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != tag:
                continue
            if "error" in msg:
                raise CommandError(command, msg["error"])
            return msg.get("return")

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event called ``name`` whose data contains ``data`` (seen or future)."""
        deadline = time.monotonic() + timeout

        def matches(ev: dict[str, Any]) -> bool:
            got = ev.get("data", {})
            return ev.get("event") == name and all(got.get(k) == v for k, v in data.items())

        for ev in self.events:
            if matches(ev):
                self.events.remove(ev)
                return ev
        while True:
            line = self._conn.readline(deadline)
            if line is None:
                raise WireError(f"timed out waiting for QMP event {name} {data}")
            msg = json.loads(line)
            if "event" in msg:
                if matches(msg):
                    return dict(msg)
                self.events.append(msg)


class QgaClient:
    """Synchronous client for ``qemu-ga`` over a virtio-serial unix socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._conn = _LineSocket(path, timeout)

    def close(self) -> None:
        self._conn.close()

    def sync(self, timeout: float) -> None:
        """Resynchronise: send guest-sync-delimited until its own id comes back."""
        deadline = time.monotonic() + timeout
        while True:
            tag = secrets.randbelow(2**31)
            req = {"execute": "guest-sync-delimited", "arguments": {"id": tag}}
            # 0xFF makes the agent's JSON parser drop any partial input.
            self._conn.send(b"\xff" + json.dumps(req).encode() + b"\n")
            attempt_deadline = min(deadline, time.monotonic() + 2.0)
            while True:
                line = self._conn.readline(attempt_deadline)
                if line is None:
                    break
                line = line.replace(b"\xff", b"").strip()
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("return") == tag:
                    return
            if time.monotonic() >= deadline:
                raise WireError(f"{self._conn.path}: guest agent did not answer guest-sync")

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        self.sync(timeout=min(timeout, 10.0))
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._conn.send(json.dumps(req).encode() + b"\n")
        line = self._conn.readline(time.monotonic() + timeout)
        if line is None:
            raise WireError(f"guest agent: timed out waiting for {command}")
        msg = json.loads(line.replace(b"\xff", b""))
        if "error" in msg:
            raise CommandError(command, msg["error"])
        return msg.get("return")
