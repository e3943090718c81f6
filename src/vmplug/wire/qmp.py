"""QMP on :mod:`qemu.qmp`: the daemon's session client and a blocking front.

* :class:`Client` is a :class:`qemu.qmp.QMPClient` that hands each event to
  a callback (no unbounded event history), uses short exec ids and logs the
  wire only at DEBUG;
* :func:`parse_address`, :func:`close_bounded`, :func:`map_bounded`: what
  every QMP user needs around it;
* :class:`SyncQmp`: the one blocking client for short probes (the doctor,
  ``vmplug vms``, the lab): greeting, capabilities, commands with a deadline,
  events kept for :meth:`SyncQmp.wait_event`.  Unix and ``tcp:`` addresses.

What USB means in QMP (``usb-host``, QOM paths) is :mod:`vmplug.vms.qmp`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError, Runstate, StateError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from vmplug.wire._sync import LoopThread
from vmplug.wire.errors import AddressError, CommandError, WireError, WireTimeout

#: qemu.qmp's own log records (connection attempts, dropped replies) go here.
#: They are shown only when this logger is set to DEBUG: a daemon retrying a
#: missing socket every 2 s must not log an ERROR every time.
wire_log = logging.getLogger("vmplug.wire.qmp")


class _WireFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        return logging.getLogger(record.name).getEffectiveLevel() <= logging.DEBUG


_WIRE_FILTER = _WireFilter()


def wire_logger(name: str) -> logging.Logger:
    """A per-peer child of ``wire_log`` (a logger's filters see only its own records)."""
    logger = wire_log.getChild(name.replace(".", "_"))
    if _WIRE_FILTER not in logger.filters:
        logger.addFilter(_WIRE_FILTER)
    return logger


Target = str | tuple[str, int]


def parse_address(address: str) -> Target:
    """``/path/qmp.sock``, ``unix:/path``, or ``tcp:HOST:PORT`` (``tcp:[::1]:4444``).

    Raises :class:`~vmplug.wire.errors.AddressError` (a ``ValueError``)."""
    if address.startswith("tcp:"):
        host, sep, port = address[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AddressError(
                f"bad QMP address {address!r}: expected tcp:HOST:PORT", address=address
            )
        return (host.removeprefix("[").removesuffix("]"), int(port))
    path = address.removeprefix("unix:")
    if not path:
        raise AddressError("empty QMP socket path", address=address)
    return path


class Client(QMPClient):
    """A QMPClient that hands each event to a callback.

    QMPClient's default listener keeps every event in a queue and a history
    list forever; a daemon that holds a session for months must not.
    """

    def __init__(self, name: str, on_event: Callable[[Message], None]) -> None:
        super().__init__(name)
        self.logger = wire_logger(name)
        self._vmplug_on_event = on_event
        self._vmplug_ids = 0

    async def _event_dispatch(self, msg: Message) -> None:
        self._vmplug_on_event(msg)

    # qemu.qmp logs every message as indented JSON, built even when DEBUG is
    # off: as much CPU as the rest of a command's round trip.
    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False
    ) -> object:
        """:meth:`QMPClient.execute` with the command serialized once, not
        three times (``make_execute_msg`` and ``execute_msg``'s copy each
        encode it eagerly, and the exec id then makes both stale): a tenth of
        a command's CPU in the daemon (500 ``device_add`` at start)."""
        if self.runstate is not Runstate.RUNNING:
            raise StateError(
                f"{type(self).__name__} is not connected", self.runstate, Runstate.RUNNING
            )
        body: dict[str, object] = {"exec-oob" if oob else "execute": cmd}
        if arguments is not None:
            body["arguments"] = arguments
        msg = Message(body, eager=False)
        reply = await self._execute(msg)
        if "error" in reply:
            try:
                error_response = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error_response, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]

    def _get_exec_id(self) -> str:
        # QEMU up to 10.0 reads a monitor's input one byte per main-loop
        # iteration (~3.5 us of QEMU CPU per byte): "a" costs less than
        # qemu.qmp's "__qmp#00042".
        self._vmplug_ids += 1
        return format(self._vmplug_ids, "x")


#: Commands one session keeps in flight.  QEMU queues at most 8 per monitor
#: and stops reading past that, so more buys no speed, only memory: 500
#: attaches or 1,000 reads issued together would each hold a task, a message
#: and a reply queue at once (~10 MB of a daemon's peak).
IN_FLIGHT = 16

ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")


async def map_bounded(
    fn: Callable[[ItemT], Awaitable[ResultT]], items: Sequence[ItemT], limit: int = IN_FLIGHT
) -> list[ResultT]:
    """``[await fn(x) for x in items]`` with at most ``limit`` running at once."""
    if len(items) <= limit:
        return list(await asyncio.gather(*(fn(x) for x in items)))
    out: list[ResultT | None] = [None] * len(items)
    feed = iter(enumerate(items))

    async def worker() -> None:
        for i, item in feed:
            out[i] = await fn(item)

    await asyncio.gather(*(worker() for _ in range(limit)))
    return out  # type: ignore[return-value]  # every slot was filled


#: seconds a disconnect may take before vmplug lets the session go
CLOSE_TIMEOUT = 5.0


async def close_bounded(client: QMPClient) -> None:
    """Disconnect, swallowing what the bottom half died of (EOF, reset...)."""
    if client.runstate is Runstate.IDLE:
        return
    # bounded: a peer that stopped reading must not hold up a daemon's shutdown
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), CLOSE_TIMEOUT)


def describe_connect_error(exc: BaseException) -> str:
    """What went wrong reaching a socket, in its own words (``No such file or directory``)."""
    inner = exc.exc if isinstance(exc, ConnectError) else exc
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner) or type(inner).__name__


# ---------------------------------------------------------------------------
# the blocking front


class SyncQmp:
    """A short blocking QMP session: greeting, capabilities, commands, events.

    ``SyncQmp("/run/vm.qmp", timeout=5).execute("query-status")``.  Every
    call has a deadline: a socket nobody answers on (another client holds
    it: QMP serves one at a time) gives :class:`WireTimeout`, an error reply
    :class:`CommandError` (``qmp_class``), anything else :class:`WireError`.
    Events that arrive are kept in :attr:`events` until :meth:`wait_event`
    takes them.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, address: str | Path, timeout: float = 5.0, *, name: str = "probe") -> None:
        self.address = str(address)
        self.timeout = timeout
        self.target = parse_address(self.address)
        self.events: list[dict[str, Any]] = []
        self._arrived: asyncio.Event | None = None
        self._client: Client | None = None
        self._runner = LoopThread(f"vmplug-qmp-{name}")
        try:
            self._runner.run(self._connect(name), timeout + 1.0)
        except BaseException as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                raise self._timeout("the QMP greeting", timeout) from None
            raise

    # -- async halves (run on the private loop) ------------------------------

    def _on_event(self, msg: Message) -> None:
        self.events.append(dict(msg))
        if self._arrived is not None:
            self._arrived.set()

    async def _connect(self, name: str) -> None:
        self._arrived = asyncio.Event()
        client = Client(name, self._on_event)
        self._client = client
        try:
            await asyncio.wait_for(client.connect(self.target), self.timeout)
        except TimeoutError:
            raise self._timeout("the QMP greeting", self.timeout) from None
        except (QMPError, OSError, EOFError) as exc:
            raise WireError(
                f"{self.address}: cannot connect: {describe_connect_error(exc)}",
                address=self.address,
            ) from exc

    async def _execute(self, command: str, arguments: Mapping[str, object] | None) -> Any:
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            raise WireError(f"{self.address}: not connected", address=self.address, command=command)
        try:
            return await client.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandError(command, exc.error_class, str(exc), address=self.address) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise WireError(
                f"{self.address}: {command}: connection lost ({exc})",
                address=self.address,
                command=command,
            ) from exc

    async def _wait_event(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        assert self._arrived is not None
        while True:
            for ev in self.events:
                if match(ev):
                    self.events.remove(ev)
                    return ev
            client = self._client
            if client is None or client.runstate is not Runstate.RUNNING:
                raise WireError(f"{self.address}: connection closed", address=self.address)
            self._arrived.clear()
            await self._arrived.wait()

    async def _close(self) -> None:
        if self._client is not None:
            await close_bounded(self._client)

    # -- blocking calls ------------------------------------------------------

    def _timeout(self, what: str, timeout: float, command: str | None = None) -> WireTimeout:
        return WireTimeout(
            f"{self.address}: timed out waiting for {what} ({timeout:g} s)",
            address=self.address,
            command=command,
        )

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``command``'s return value; raises :class:`CommandError` on an error reply."""
        limit = self.timeout if timeout is None else timeout
        try:
            return self._runner.run(self._execute(command, arguments), limit)
        except TimeoutError:
            raise self._timeout(f"the answer to {command}", limit, command) from None

    def wait_event(self, name: str, timeout: float, **data: object) -> dict[str, Any]:
        """The first event called ``name`` whose data contains ``data`` (seen or future)."""

        def match(ev: dict[str, Any]) -> bool:
            got = ev.get("data") or {}
            return ev.get("event") == name and all(got.get(k) == v for k, v in data.items())

        try:
            return self._runner.run(self._wait_event(match), timeout)
        except TimeoutError:
            raise self._timeout(f"QMP event {name} {data}", timeout) from None

    def close(self) -> None:
        self._runner.close(self._close)

    def __enter__(self) -> SyncQmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "CLOSE_TIMEOUT",
    "IN_FLIGHT",
    "Client",
    "SyncQmp",
    "Target",
    "close_bounded",
    "describe_connect_error",
    "map_bounded",
    "parse_address",
    "wire_log",
    "wire_logger",
]
