"""Bounds on what clients of the API can hold: connections, event streams, time, memory.

Anything on loopback can open the API's TCP port, and every member of the
``[api] group`` its unix socket; neither may starve the daemon, whose one
event loop also routes the devices.  Each listening site gets a :class:`Gate`:

* at most ``max_connections`` open connections, and ``per_client`` of them
  from one client (an IP address on TCP, a uid on the unix socket, read with
  ``SO_PEERCRED``); one more is answered ``503`` with ``Retry-After`` and
  closed at once, before the HTTP server allocates anything for it;
* a connection must finish its first request's headers within
  ``header_timeout`` seconds (half-open requests, slowloris); the HTTP server's own
  keep-alive timer (``idle_timeout``) closes one idle between requests;
* at most ``max_streams`` ``/v1/events`` subscribers, ``streams_per_client``
  from one client (:meth:`Gate.stream`);
* when a flood is over (the open connections fall back from a high-water
  mark), freed memory is handed back to the system (``malloc_trim``).

Bad requests (a request line or header over 8 KiB, a broken request) are
logged as one WARNING line (:class:`BadRequests` for the unix socket's server,
:func:`http_logger` for aiohttp's on TCP), not as ``Error handling request``
with a traceback at ERROR.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vmplug.config import ApiConfig

log = logging.getLogger("vmplug.api")

REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 33\r\n\r\n"
    b'{"error": "too many connections"}'
)
#: open connections at which a flood is said to have happened (memory is trimmed after it)
FLOOD_MARK = 64
#: how often one refusal or time-out is logged at most (a flood must not flood the log)
LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of one site (``[api]`` in the config; see :mod:`vmplug.config`)."""

    max_connections: int = 256
    per_client: int = 64
    max_streams: int = 64
    streams_per_client: int = 16
    header_timeout: float = 10.0
    idle_timeout: float = 30.0

    @classmethod
    def from_config(cls, api: ApiConfig) -> Limits:
        return cls(
            max_connections=api.max_connections,
            per_client=api.max_connections_per_client,
            max_streams=api.max_streams,
            streams_per_client=api.max_streams_per_client,
            header_timeout=api.header_timeout,
            idle_timeout=api.idle_timeout,
        )

    def runner_kwargs(self) -> dict[str, Any]:
        """What aiohttp's ``AppRunner`` takes of these (its request handler's settings)."""
        return {"keepalive_timeout": self.idle_timeout, "logger": http_logger()}


def client_key(transport: asyncio.BaseTransport) -> str:
    """Who is on the other end: ``ip:ADDRESS`` on TCP, ``uid:N`` on a unix socket."""
    sock = transport.get_extra_info("socket")
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX and sock is not None:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return f"uid:{uid}"
        except OSError:
            return "uid:?"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return f"ip:{peer[0]}"
    return "?"


class _Throttled:
    """Logs one line per kind of event at most every :data:`LOG_EVERY_S`, with a count."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        self._held[kind] += 1
        if now - self._last.get(kind, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        self._last[kind] = now
        count, self._held[kind] = self._held[kind], 0
        suffix = f" ({count} since the last such message)" if count > 1 else ""
        log.warning(message + suffix, *args)


class Gate:
    """The connection and stream bounds of one listening site."""

    def __init__(self, limits: Limits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.open: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()
        self.refused = 0
        self.timed_out = 0
        self.streams_refused = 0
        self.high_water = 0
        self._log = _Throttled()
        self._trim: asyncio.TimerHandle | None = None
        self._live: dict[asyncio.BaseTransport, _Guarded] = {}

    @property
    def total(self) -> int:
        return sum(self.open.values())

    @property
    def total_streams(self) -> int:
        return sum(self.streams.values())

    def protocol_factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards ``inner``'s protocols
        (:class:`vmplug.api.http.Connection`, or aiohttp's request handlers)."""
        return lambda: _Guarded(self, inner)

    # -- connections ----------------------------------------------------------------

    def admit(self, key: str) -> bool:
        total = self.total
        if total >= self.limits.max_connections or self.open[key] >= self.limits.per_client:
            self.refused += 1
            self._log.warn(
                "refused",
                "API %s: refused a connection from %s (%d open, %d from it; "
                "[api] max_connections = %d, max_connections_per_client = %d)",
                self.name, key, total, self.open[key],
                self.limits.max_connections, self.limits.per_client,
            )  # fmt: skip
            return False
        self.open[key] += 1
        self.high_water = max(self.high_water, total + 1)
        return True

    def release(self, key: str) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]
        if self.high_water >= FLOOD_MARK and self.total <= FLOOD_MARK // 4:
            self._schedule_trim()

    def timed_out_headers(self, key: str) -> None:
        self.timed_out += 1
        self._log.warn(
            "timeout",
            "API %s: closed a connection from %s that sent no whole request in %g s "
            "([api] header_timeout)",
            self.name, key, self.limits.header_timeout,
        )  # fmt: skip

    def when_lost(self, transport: asyncio.BaseTransport, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the connection of ``transport`` is gone (at once if it
        is already).  aiohttp does not cancel a handler whose client left, so an event
        stream would otherwise wait for its next write to notice."""
        guarded = self._live.get(transport)
        if guarded is None:
            callback()
        else:
            guarded.on_lost.append(callback)

    # -- event streams --------------------------------------------------------------

    @contextmanager
    def stream(self, key: str) -> Iterator[bool]:
        """``with gate.stream(key) as ok:`` -- ``ok`` is False when the bounds are reached
        (answer 503); the slot is held until the block ends."""
        total = self.total_streams
        if total >= self.limits.max_streams or self.streams[key] >= self.limits.streams_per_client:
            self.streams_refused += 1
            self._log.warn(
                "streams",
                "API %s: refused an event stream from %s (%d open, %d from it; "
                "[api] max_streams = %d, max_streams_per_client = %d)",
                self.name, key, total, self.streams[key],
                self.limits.max_streams, self.limits.streams_per_client,
            )  # fmt: skip
            yield False
            return
        self.streams[key] += 1
        try:
            yield True
        finally:
            self.streams[key] -= 1
            if self.streams[key] <= 0:
                del self.streams[key]

    # -- memory ---------------------------------------------------------------------

    def _schedule_trim(self) -> None:
        if self._trim is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._trim = loop.call_later(1.0, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if self.total > FLOOD_MARK // 4:
            return  # another flood: wait for its end
        peak, self.high_water = self.high_water, self.total
        trimmed = give_back_memory()
        log.info(
            "API %s: a flood is over (%d connections at most, %d refused so far)%s",
            self.name, peak, self.refused, "; free memory handed back" if trimmed else "",
        )  # fmt: skip

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.total,
            "streams": self.total_streams,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "streams_refused": self.streams_refused,
        }


def give_back_memory() -> bool:
    """Collect garbage and hand free heap pages back to the system (glibc's
    ``malloc_trim``); False where there is no such call (musl)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_TRIM: list[Any] = []


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up in the symbols this process already has
    (``dlopen(NULL)``: no ``find_library``, which runs ``ldconfig -p``); ctypes is
    imported here, at the end of a flood, not by every daemon's start (issue 16:
    ~0.2 s of the lab guest's start under TCG)."""
    if not _TRIM:
        import ctypes  # noqa: PLC0415

        try:
            libc = ctypes.CDLL(None)
            fn = libc.malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _TRIM.append(fn)
        except (OSError, AttributeError, TypeError):
            _TRIM.append(None)
    return _TRIM[0]


async def listen_unix(server: Callable[[], Any], gate: Gate, path: str) -> asyncio.Server:
    """Serve the protocols ``server`` makes (:class:`vmplug.api.http.Connection`)
    on the unix socket ``path``, behind ``gate``."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(gate.protocol_factory(server), path, backlog=128)


async def listen_tcp(
    server: Callable[[], Any], gate: Gate, host: str, port: int, *, tls: Any = None
) -> asyncio.Server:
    """Serve aiohttp's ``server`` on ``host:port`` (0: any free port), behind ``gate``
    (``tls``: an ``ssl.SSLContext``, the device host's mutual-TLS listener)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        gate.protocol_factory(server), host, port, reuse_address=True, backlog=128, ssl=tls
    )


class _Guarded(asyncio.Protocol):
    """One connection: admitted by its :class:`Gate` or answered 503; its first
    request's headers on a deadline; everything else is the inner protocol's."""

    def __init__(self, gate: Gate, make_inner: Callable[[], Any]) -> None:
        self.gate = gate
        self.make_inner = make_inner
        self.inner: Any = None
        self.key = ""
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.on_lost: list[Callable[[], None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.key = client_key(transport)
        if not self.gate.admit(self.key):
            transport.write(REFUSED)
            transport.close()
            return
        self.inner = self.make_inner()
        self.gate._live[transport] = self
        self.inner.connection_made(transport)
        if self.gate.limits.header_timeout > 0:
            loop = asyncio.get_running_loop()
            self.deadline = loop.call_later(self.gate.limits.header_timeout, self._expire)

    def _started(self) -> bool:
        """Has the inner protocol parsed a whole request head on this connection yet?"""
        return bool(getattr(self.inner, "_request_count", 1))

    def _expire(self) -> None:
        self.deadline = None
        if self.inner is not None and not self._started() and self.transport is not None:
            self.gate.timed_out_headers(self.key)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # refused: whatever it sends is dropped
        self.inner.data_received(data)
        if self.deadline is not None and self._started():
            self.deadline.cancel()
            self.deadline = None

    def eof_received(self) -> bool | None:
        if self.inner is None:
            return None
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.inner is None:
            return
        inner, self.inner = self.inner, None
        if self.transport is not None:
            self.gate._live.pop(self.transport, None)
        self.gate.release(self.key)
        inner.connection_lost(exc)
        callbacks, self.on_lost = self.on_lost, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one bad callback must not keep the others from running
                log.exception("API: a connection-lost callback failed")


#: bad requests logged per :data:`LOG_EVERY_S` at most; the rest are counted
BAD_REQUESTS_LOGGED = 10


class BadRequests:
    """One WARNING line per bad request, :data:`BAD_REQUESTS_LOGGED` per
    :data:`LOG_EVERY_S` at most, the next one saying how many were left out
    (anyone can send one).  One per listener: a flood on one does not
    silence the other's."""

    def __init__(self) -> None:
        self.window = 0.0
        self.logged = 0
        self.dropped = 0

    def line(
        self, peer: str, code: int, kind: str, reason: str
    ) -> tuple[str, tuple[Any, ...]] | None:
        """The message and its arguments, None when this one is left out."""
        now = time.monotonic()
        if now - self.window >= LOG_EVERY_S:
            self.window, self.logged = now, 0
        if self.logged >= BAD_REQUESTS_LOGGED:
            self.dropped += 1
            return None
        self.logged += 1
        if len(reason) > 160:
            reason = reason[:159] + "…"
        left_out = f" ({self.dropped} more left out of the log)" if self.dropped else ""
        self.dropped = 0
        return "API: bad request from %s, answered %s: %s: %s%s", (
            peer,
            code,
            kind,
            reason,
            left_out,
        )

    def warn(self, peer: str, code: int, kind: str, reason: str) -> None:
        """Log a request the unix socket's server (:mod:`vmplug.api.http`) refused."""
        said = self.line(peer, code, kind, reason)
        if said is not None:
            log.warning(said[0], *said[1])


class _BadRequestFilter(logging.Filter):
    """aiohttp's ``Error handling request`` for a request it could not parse: one
    WARNING line with the reason, no traceback, throttled by :class:`BadRequests`."""

    def __init__(self) -> None:
        super().__init__()
        self.bad = BadRequests()

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError  # noqa: PLC0415

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            reason = str(getattr(exc, "message", "") or "")
            said = self.bad.line(str(peer), exc.code, type(exc).__name__, reason)
            if said is None:
                return False
            record.msg, record.args = said
            if record.levelno > logging.WARNING:  # aiohttp's ERROR; its DEBUG stays DEBUG
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def http_logger() -> logging.Logger:
    """The logger aiohttp's request handler reports errors to (a handler's own bug
    keeps its traceback at ERROR; a bad request is one WARNING line)."""
    logger = logging.getLogger("vmplug.api.http")
    if not any(isinstance(f, _BadRequestFilter) for f in logger.filters):
        logger.addFilter(_BadRequestFilter())
    return logger


__all__ = [
    "REFUSED",
    "BadRequests",
    "Gate",
    "Limits",
    "client_key",
    "give_back_memory",
    "http_logger",
    "listen_tcp",
    "listen_unix",
]
