"""Where the daemon learns that devices came or went.

Events only say *what to look at again*; the reconciler re-reads the device
from sysfs (or forgets it on ``remove``) and recomputes what it wants.  A lost
message is therefore harmless as long as vmplug notices the loss: the netlink
socket reports it as ``ENOBUFS``, and the daemon answers with a full rescan.

:class:`NetlinkEventSource` reads the kernel's uevents from a netlink socket
of its own (:class:`KernelUevents`: the kernel's wire format is NUL-separated
``KEY=VALUE`` lines) or udevd's through a pyudev ``Monitor``, driven by the
asyncio loop (``add_reader``, no thread).
:class:`ReplayEventSource` reads the same events, recorded from a real kernel,
from a FIFO or file as JSON lines: it stands in for a kernel on hosts without
USB (tests and CI), never in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Actions the daemon cares about for usb_device: ``bind`` means ready.
READY_ACTION = "bind"
GONE_ACTION = "remove"


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One uevent of a ``usb``/``usb_device``."""

    action: str  # add, bind, change, unbind, remove
    port: str  # sysfs name: "2-2.4.2"
    devpath: str | None = None  # /devices/... (relative to the sysfs root)
    busnum: int | None = None
    devnum: int | None = None
    product: str | None = None  # "vid/pid/bcd" in hex without padding, as the kernel says
    seqnum: int | None = None

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> HostEvent | None:
        """Build from uevent properties; ``None`` for anything but a usb_device."""
        if props.get("SUBSYSTEM") != "usb" or props.get("DEVTYPE") != "usb_device":
            return None
        devpath = props.get("DEVPATH")
        if not devpath:
            return None

        def num(key: str) -> int | None:
            value = props.get(key)
            return int(value) if value and value.isdigit() else None

        return cls(
            action=props.get("ACTION", "change"),
            port=devpath.rsplit("/", 1)[-1],
            devpath=devpath,
            busnum=num("BUSNUM"),
            devnum=num("DEVNUM"),
            product=props.get("PRODUCT"),
            seqnum=num("SEQNUM"),
        )


EventCallback = Callable[[HostEvent], None]
OverflowCallback = Callable[[], None]


class EventSource(Protocol):
    description: str

    def start(self, on_event: EventCallback, on_overflow: OverflowCallback) -> None: ...

    def stop(self) -> None: ...

    def pause(self) -> None:
        """Read nothing until :meth:`resume`: what arrives meanwhile waits
        where it is (the socket's buffer, the FIFO)."""

    def resume(self) -> None: ...


class _Reader:
    """A source's reader callback on a file descriptor of the running loop,
    which :meth:`pause` takes off and :meth:`resume` puts back.

    The daemon pauses its source while a replug's early device_add is in
    flight: the rest of the device's burst (its interfaces, their drivers,
    its ``bind``) would only queue behind the ``add`` being handled, and
    reading it then takes CPU from the kernel's probe and QEMU's open of the
    device that the device_add waits for (a one-CPU machine feels it).  A
    bare attacher does the same: it reads no uevent while it waits."""

    def __init__(self) -> None:
        self._reader: tuple[asyncio.AbstractEventLoop, int, Callable[[], None]] | None = None
        self._paused = False

    def _add(self, loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None]) -> None:
        self._reader = (loop, fd, callback)
        if not self._paused:
            loop.add_reader(fd, callback)

    def _remove(self) -> None:
        if self._reader is not None:
            loop, fd, _ = self._reader
            loop.remove_reader(fd)
            self._reader = None

    def pause(self) -> None:
        if not self._paused and self._reader is not None:
            loop, fd, _ = self._reader
            loop.remove_reader(fd)
        self._paused = True

    def resume(self) -> None:
        if self._paused and self._reader is not None:
            loop, fd, callback = self._reader
            loop.add_reader(fd, callback)
        self._paused = False


def _drain(receive: Callable[[], Any]) -> int:
    """Read and drop what a netlink socket holds; how many devices it held."""
    n = 0
    while True:
        try:
            if receive() is None:
                return n
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                continue  # a second loss while draining: drained all the same
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return n
            raise
        n += 1


#: linux/netlink.h
NETLINK_KOBJECT_UEVENT = 15
#: the kernel's multicast group on it (udevd re-sends on group 2, libudev's format)
KERNEL_GROUP = 1
#: linux/socket.h SO_RCVBUFFORCE (past rmem_max; needs CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33
#: what HostEvent.from_properties takes: KernelUevents drops the rest unparsed
USB_DEVICE_PROPERTIES = (b"SUBSYSTEM=usb", b"DEVTYPE=usb_device")
#: one uevent is at most UEVENT_BUFFER_SIZE (2048) bytes of environment plus its header
UEVENT_MAX = 8192


def parse_uevent(data: bytes) -> dict[str, str] | None:
    """The properties of one kernel uevent message (``ACTION@DEVPATH`` then
    NUL-separated ``KEY=VALUE``), or None for anything else (libudev's own
    format, which starts ``libudev``, or a message without a header)."""
    header, _, body = data.partition(b"\0")
    if b"@" not in header or header.startswith(b"libudev"):
        return None
    props: dict[str, str] = {}
    for field in body.split(b"\0"):
        key, eq, value = field.partition(b"=")
        if eq and key:
            props[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return props


class KernelUevents:
    """The kernel's uevent netlink socket, read without libudev.

    pyudev cost the daemon's start ~0.3 s in the lab guest under TCG (its
    import, ctypes, ``find_library`` running ``ldconfig -p``, libudev's
    loading) for a socket, a bind and NUL-separated lines.  Only the kernel's
    own messages are taken (sender port 0, as libudev checks); the receive
    buffer is set as libudev sets it (``SO_RCVBUFFORCE``, else ``SO_RCVBUF``).
    An overflow is :func:`socket.recv`'s ``OSError`` with ``ENOBUFS``.

    ``only``: properties (``b"SUBSYSTEM=usb"``) a message must carry, checked
    on its bytes before anything is parsed.  The kernel sends every
    subsystem's uevents on this group and no socket filter can pick them
    (the properties sit at no fixed offset): a keyboard's replug is ~35
    messages (its interfaces, HID, input, event and hidraw devices, each
    driver's bind), of which the daemon wants two: each is received, only
    those two are parsed.  (What mattered more for the replug's latency is
    not reading the burst at all while its device_add waits: ``_Reader``.)
    """

    def __init__(self, receive_buffer: int, only: Sequence[bytes] = ()) -> None:
        # each property is NUL-terminated and follows the header's or another's NUL
        self._only = tuple(b"\0" + prop + b"\0" for prop in only)
        self._sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_KOBJECT_UEVENT,
        )
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except OSError:  # no CAP_NET_ADMIN: as much as rmem_max allows
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self._sock.bind((0, KERNEL_GROUP))
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> dict[str, str] | None:
        """The next kernel uevent's properties; None when the socket holds none.
        Raises ``OSError`` (``ENOBUFS``: uevents were lost)."""
        # the loop every uevent of the machine passes: kept to a few bytecodes
        recvfrom, only = self._sock.recvfrom, self._only
        while True:
            try:
                data, address = recvfrom(UEVENT_MAX)
            except (BlockingIOError, InterruptedError):
                return None
            if address[0] != 0:
                continue  # not the kernel's: another process on the group
            for prop in only:
                if prop not in data:
                    break
            else:
                props = parse_uevent(data)
                if props is not None:
                    return props

    def close(self) -> None:
        self._sock.close()


def udevd_running(run_dir: Path = Path("/run/udev")) -> bool:
    """udevd creates its control socket here while it runs."""
    return (run_dir / "control").exists()


class NetlinkEventSource(_Reader):
    """uevents from the kernel, or from udevd once it has processed them.

    With udevd, events arrive after its rules ran (permissions and symlinks
    are in place) and the filter on subsystem/devtype runs in the kernel as a
    socket filter.  Without udevd (containers, minimal guests), the raw kernel
    events are used and filtered here.
    """

    RECEIVE_BUFFER = 16 * 1024 * 1024
    #: environment: the socket's receive buffer in bytes instead (tests make it
    #: tiny so that a burst of real uevents overflows it: ENOBUFS)
    RECEIVE_BUFFER_ENV = "VMPLUG_UEVENT_RCVBUF"

    def __init__(self, source: str | None = None) -> None:
        super().__init__()
        self.source = source or ("udev" if udevd_running() else "kernel")
        self.description = (
            "udev events (udevd is running)"
            if self.source == "udev"
            else "kernel uevents (no udevd: raw netlink)"
        )
        #: the socket read: a KernelUevents, or pyudev's Monitor for udevd's events
        self._monitor: Any = None
        self._close: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: ENOBUFS the kernel reported on this socket so far
        self.overflows = 0
        #: uevents dropped after an ENOBUFS (queued from before the loss)
        self.dropped_stale = 0

    def receive_buffer(self) -> int:
        raw = os.environ.get(self.RECEIVE_BUFFER_ENV, "")
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
        if raw:
            log.warning("%s=%r is no byte count: ignored", self.RECEIVE_BUFFER_ENV, raw)
        return self.RECEIVE_BUFFER

    def start(self, on_event: EventCallback, on_overflow: OverflowCallback) -> None:
        receive: Callable[[], Mapping[str, str] | None]
        if self.source == "kernel":
            kernel = KernelUevents(self.receive_buffer(), only=USB_DEVICE_PROPERTIES)
            self._monitor, self._close = kernel, kernel.close
            receive = kernel.receive
        else:
            receive = self._udev_monitor()
        self._loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    props = receive()
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        # the kernel dropped uevents: what the devices are now
                        # is in sysfs, so a rescan loses nothing of the state.
                        # The kernel reports ENOBUFS before the uevents still
                        # queued from before the loss: handled after the
                        # rescan they would undo it (a queued remove of a
                        # device that came back behind the burst detaches it),
                        # so they are dropped; the rescan reads what they said.
                        self.overflows += 1
                        stale = _drain(receive)
                        self.dropped_stale += stale
                        log.warning(
                            "uevent socket overflowed: events were lost, rescanning "
                            "(%d queued from before the loss dropped)", stale,
                        )  # fmt: skip
                        on_overflow()
                        continue
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        return
                    raise
                if props is None:
                    return
                event = HostEvent.from_properties(props)
                if event is not None:
                    on_event(event)
                    # back to the loop: the event is acted on (a replug's
                    # device_add sent) before the burst queued behind it is
                    # read; the socket stays readable for the rest
                    return

        self._add(self._loop, self._monitor.fileno(), readable)

    def _udev_monitor(self) -> Callable[[], Mapping[str, str] | None]:
        """udevd's events through a pyudev ``Monitor`` (libudev's format, its
        socket filter on subsystem/devtype); a reader of their properties."""
        import pyudev  # noqa: PLC0415 - only udevd's events need it

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source=self.source)
        monitor.filter_by(subsystem="usb", device_type="usb_device")
        with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN past rmem_max
            monitor.set_receive_buffer_size(self.receive_buffer())
        monitor.start()
        self._monitor, self._close = monitor, None

        # Read with libudev's receive (a non-blocking recvmsg), not pyudev's
        # poll(): after an overflow the socket polls as POLLERR, which poll()
        # turns into an OSError without an errno (the ENOBUFS is never read
        # and the socket stays in error: every later uevent would be missed).
        receive_device: Callable[[], Any] = getattr(
            monitor, "_receive_device", lambda: monitor.poll(timeout=0)
        )

        def receive() -> dict[str, str] | None:
            device = receive_device()
            if device is None:
                return None
            props = dict(device.properties)
            props.setdefault("ACTION", device.action or "change")
            return props

        return receive

    def stop(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._remove()
            if self._close is not None:
                self._close()
            self._monitor = self._close = None


class ReplayEventSource(_Reader):
    """Recorded uevents as JSON lines (one object of uevent properties per line).

    Reads a FIFO (a test writes events as they "happen") or a regular file.  A
    line ``{"OVERFLOW": "1"}`` stands for an ENOBUFS the kernel reported.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.description = f"replayed uevents from {path}"
        self._fd: int | None = None
        self._buffer = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, on_event: EventCallback, on_overflow: OverflowCallback) -> None:
        # O_RDWR on a FIFO: never sees EOF when a writer closes, never blocks.
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        fd = self._fd

        def readable() -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.stop()
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    props = json.loads(line)
                except ValueError:
                    log.warning("replay: ignoring a line that is not JSON: %r", line[:80])
                    continue
                if props.get("OVERFLOW"):
                    on_overflow()
                    continue
                event = HostEvent.from_properties({k: str(v) for k, v in props.items()})
                if event is not None:
                    on_event(event)

        self._add(self._loop, fd, readable)

    def stop(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._remove()
            os.close(self._fd)
            self._fd = None


def make_source(spec: str | None) -> EventSource:
    """``None``/``auto``: netlink (udev if running); ``kernel``/``udev``; ``replay:PATH``."""
    if spec is None or spec == "auto":
        return NetlinkEventSource()
    if spec in ("kernel", "udev"):
        return NetlinkEventSource(spec)
    if spec.startswith("replay:"):
        return ReplayEventSource(Path(spec[len("replay:") :]))
    from vmplug.errors import UsageError  # noqa: PLC0415

    raise UsageError(f"unknown event source {spec!r} (auto, kernel, udev or replay:PATH)")
