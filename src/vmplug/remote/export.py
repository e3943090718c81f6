"""The device host's side of a remote link: one mutual-TLS endpoint per exported device.

A VM host's QEMU connects (a ``socket`` chardev with ``tls-creds``) to the
endpoint of the device it wants.  The endpoint

1. does the TLS handshake itself (so a refusal has a reason: unknown CA,
   expired certificate, no certificate, plaintext), requires a client
   certificate signed by the installation's CA, and checks the client's name
   against the VM hosts this device may go to (``allow``);
2. lets one VM host hold the device at a time: a second host is refused and
   the reason logged (first come wins); the *same* host connecting again
   (its link was cut and QEMU reconnected) replaces its stale connection;
3. opens the plaintext side (a :class:`PlainSource`): for a real device a
   ``usbredirect --device BUS-DEV --to 127.0.0.1:PORT`` it starts and
   supervises (:class:`UsbredirectSource`); while the device is absent the
   TLS connection is held and QEMU's hello waits in the buffer, so a replug
   is streamed as soon as the kernel shows the device again;
4. relays both ways (:func:`vmplug.wire.tls.relay`) until either side ends:
   usbredirect exits when its device is unplugged (it does not follow
   hotplug), which closes the link; QEMU sees an unplug and reconnects;
5. watches the link itself (see :func:`link_silence`): TCP keepalive every
   second, and when the VM host has acknowledged nothing for
   ``link_timeout`` seconds (the network is cut) the link is declared dead:
   the device is let go (another VM host may take it) and the TLS socket is
   half-closed but *kept*, so the kernel goes on retransmitting its FIN.  A
   cut shorter than ``link_timeout`` is invisible (TCP carries on, nothing
   re-plugged); after a longer one the FIN reaches QEMU the moment the
   network is back, QEMU sees the stream end (an unplug in the guest) and its
   reconnect brings the device back.  QEMU 7.2's socket chardev has no
   keepalive interval of its own, so without that FIN QEMU would sit on a
   dead half-open connection until it next writes.

The plaintext usbredir stream never leaves loopback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmplug.aio import cancel_and_wait
from vmplug.errors import UsageError, VmplugError
from vmplug.wire.tls import CHUNK, RelayStats, close_writer, describe_tls_error, peer_names, relay

log = logging.getLogger("vmplug.remote.export")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ExportError(VmplugError):
    """An export endpoint could not start (port taken, usbredirect missing...)."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a device is now on the device host's buses."""

    busnum: int
    devnum: int

    @property
    def usbredirect_arg(self) -> str:
        return f"{self.busnum}-{self.devnum}"


class SysfsLocator:
    """Find a device by its port path (``1-1``, ``3-2.4``) in sysfs, optionally
    checking its vendor:product, so a different device in the same socket is
    never exported in its place."""

    def __init__(
        self,
        port_path: str,
        *,
        vendor: int | None = None,
        product: int | None = None,
        sysfs: Path = Path("/sys"),
    ) -> None:
        if not port_path or "/" in port_path or port_path.startswith("."):
            raise UsageError(f"invalid USB port path {port_path!r} (like 1-2 or 3-1.4)")
        self.port_path = port_path
        self.vendor = vendor
        self.product = product
        self.base = sysfs / "bus" / "usb" / "devices" / port_path

    def __call__(self) -> Location | None:
        try:
            bus = int((self.base / "busnum").read_text())
            dev = int((self.base / "devnum").read_text())
            if self.vendor is not None and int((self.base / "idVendor").read_text(), 16) != (
                self.vendor
            ):
                return None
            if self.product is not None and int((self.base / "idProduct").read_text(), 16) != (
                self.product
            ):
                return None
        except (OSError, ValueError):
            return None
        return Location(bus, dev)

    def __repr__(self) -> str:
        return f"<SysfsLocator {self.port_path}>"


class PlainLink(Protocol):
    """An open plaintext usbredir stream to the device (loopback only)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def present(self) -> bool:
        """False once the device this link streams is gone from the bus (or replaced)."""
        ...

    async def close(self) -> None: ...


class PlainSource(Protocol):
    """Where an endpoint gets the device's usbredir stream from."""

    async def open(self) -> PlainLink | None:
        """A stream now, or None when the device is not there (try again later)."""
        ...

    def describe(self) -> str: ...


@dataclass(slots=True)
class _TcpLink:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    process: asyncio.subprocess.Process | None = None
    #: where the device was when the link opened, and how to look again
    where: Location | None = None
    locate: Callable[[], Location | None] | None = None

    def present(self) -> bool:
        """The device file usbredirect holds is still there.

        Not a sysfs look-up: usbredirect resets the device when it claims it,
        and sysfs may show it in flux meanwhile; a deleted usbfs node is
        exact (the kernel removed the device this process opened)."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return proc is None
        held = _usbfs_files(proc.pid)
        if held is None:  # not opened yet, or /proc unreadable: ask sysfs
            return self.locate is None or self.locate() is not None
        return not any(target.endswith(" (deleted)") for target in held)

    async def close(self) -> None:
        await close_writer(self.writer)
        proc = self.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _usbfs_files(pid: int) -> list[str] | None:
    """The /dev/bus/usb nodes process ``pid`` has open (as readlink shows
    them, `` (deleted)`` appended once the device is gone); None for none."""
    found: list[str] = []
    base = Path(f"/proc/{pid}/fd")
    try:
        fds = list(base.iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("/dev/bus/usb/"):
            found.append(target)
    return found or None


class TcpSource:
    """A usbredir peer already listening on loopback (a usbredirect started
    elsewhere with ``--as``, or a test peer)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def open(self) -> PlainLink | None:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return None
        return _TcpLink(reader, writer)

    def describe(self) -> str:
        return f"tcp {self.host}:{self.port}"


class UsbredirectSource:
    """Start one ``usbredirect --device BUS-DEV --to 127.0.0.1:PORT`` per
    connection and hand over the stream it opens to us.

    usbredirect does not follow hotplug: it exits when its device goes, and a
    replugged device has a new device number, so each connection locates the
    device again.  ``last_error`` keeps usbredirect's last words.
    """

    def __init__(
        self,
        locate: Callable[[], Location | None],
        *,
        program: str = "usbredirect",
        start_timeout: float = 5.0,
        keepalive: bool = True,
    ) -> None:
        path = shutil.which(program)
        if path is None:
            raise ExportError(
                f"{program} not found; install the Debian package usbredirect "
                "(apt-get install usbredirect)"
            )
        self.program = path
        self.locate = locate
        self.start_timeout = start_timeout
        self.keepalive = keepalive
        self.last_error: str | None = None
        self.starts = 0

    def describe(self) -> str:
        return f"usbredirect {self.locate!r}"

    def device_present(self) -> bool:
        """The device is on this host's bus now (what the doctor is told)."""
        return self.locate() is not None

    async def open(self) -> PlainLink | None:
        where = self.locate()
        if where is None:
            return None
        accepted: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if accepted.done():
                writer.transport.abort()  # only the first connection: usbredirect's
            else:
                accepted.set_result((reader, writer))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        argv = [self.program, "--device", where.usbredirect_arg, "--to", f"127.0.0.1:{port}"]
        if self.keepalive:
            argv.append("--keepalive")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            server.close()
            self.last_error = f"cannot run {self.program}: {exc}"
            return None
        self.starts += 1
        exited = asyncio.create_task(proc.wait())
        try:
            waiting: set[asyncio.Future[object]] = {accepted, exited}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(
                waiting, timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            server.close()
        if accepted.done():
            exited.cancel()
            reader, writer = accepted.result()
            if proc.stderr is not None:
                _drain_stderr(proc.stderr, self)
            return _TcpLink(reader, writer, proc, where, self.locate)
        exited.cancel()
        stderr = b""
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if proc.stderr is not None:
            with contextlib.suppress(Exception):
                stderr = await asyncio.wait_for(proc.stderr.read(4096), 1.0)
        why = stderr.decode(errors="replace").strip() or (
            f"exit status {proc.returncode}" if exited in done else "no connection in time"
        )
        self.last_error = f"usbredirect --device {where.usbredirect_arg}: {why}"
        return None


def _drain_stderr(stream: asyncio.StreamReader, owner: UsbredirectSource) -> None:
    async def drain() -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").strip()
            if text:
                owner.last_error = text
                log.debug("usbredirect: %s", text)

    task = asyncio.get_running_loop().create_task(drain())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()


#: TCP keepalive on every accepted link: first probe after 1 s idle, then every
#: second; the kernel itself gives up only after 127 unanswered probes, long
#: after ``link_timeout`` has ended the link.
KEEPALIVE_IDLE = 1
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 127
#: What ``vmplug doctor`` sends instead of a usbredir hello (whose first four
#: bytes are the packet type 0): the endpoint answers with one JSON line of its
#: state (:meth:`ExportEndpoint.probe_reply`) and hangs up.  Only a client that
#: passed the mutual-TLS checks gets that far.
PROBE = b"VMPLUG-PROBE 1\n"
#: how long a dead link's socket is kept to retransmit its FIN (then closed)
LINGER_MAX = 900.0
#: The most plaintext one TLS record to QEMU carries.  QEMU's socket chardev
#: reads at most 4096 bytes per wake-up (char-socket.c's CHR_READ_BUF_LEN)
#: and, over TLS, wakes only when its *socket* is readable: what GnuTLS has
#: already decrypted from a bigger record waits inside GnuTLS until the peer
#: sends again.  usbredir is request/reply, so the rest of a bulk IN reply
#: (a usb-storage read: 4 KiB-240 KiB) waited for good and the guest's
#: usb-storage reset the device after 30 s.  QEMU 8.0 fixed it
#: (io/channel-tls.c checks gnutls_record_check_pending); Debian 12's 7.2
#: does not.  Records of at most 4096 bytes are consumed whole by one read.
QEMU_TLS_RECORD = 4096

_TCP_INFO_LEN = 104
_TCP_STATE_ESTABLISHED = 1
_TCP_STATE_CLOSE_WAIT = 8
#: ESTABLISHED, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING: our FIN not yet acknowledged
_FIN_PENDING = frozenset({1, 4, 8, 9, 11})


def tune_keepalive(sock: socket.socket) -> None:
    """Keepalive probes every second on an accepted link (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The few fields of the kernel's ``struct tcp_info`` a link watch needs."""

    state: int
    retransmits: int
    probes: int
    rtt_us: int
    unacked: int
    total_retrans: int
    last_data_recv_ms: int
    last_ack_recv_ms: int


class _Sock(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def tcp_info(sock: _Sock | None) -> TcpInfo | None:
    """``TCP_INFO`` of a connected socket (Linux), or None when unreadable."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(raw) < 104:
        return None
    state, _ca, retransmits, probes = struct.unpack_from("<4B", raw, 0)
    (unacked,) = struct.unpack_from("<I", raw, 24)
    last_data_recv, last_ack_recv = struct.unpack_from("<II", raw, 52)
    (rtt,) = struct.unpack_from("<I", raw, 68)
    (total_retrans,) = struct.unpack_from("<I", raw, 100)
    return TcpInfo(
        state, retransmits, probes, rtt, unacked, total_retrans, last_data_recv, last_ack_recv
    )


def link_silence(sock: _Sock | None) -> float:
    """Seconds since the peer last sent anything on ``sock`` (data or an ACK).

    With keepalive every second a live peer answers at least every second or
    two, whatever the usbredir stream does; a cut network shows as a growing
    silence.  0 when it cannot be read (never declares a link dead by guess)."""
    info = tcp_info(sock)
    if info is None or info.state not in (_TCP_STATE_ESTABLISHED, _TCP_STATE_CLOSE_WAIT):
        return 0.0
    return min(info.last_ack_recv_ms, info.last_data_recv_ms) / 1000.0


def _raw_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection the endpoint turned away, and why."""

    at: float
    peer: str
    reason: str


@dataclass(slots=True)
class EndpointState:
    """What an endpoint has seen (for ``status``, ``doctor`` and tests)."""

    holder: str | None = None  # the VM host streaming the device now
    streaming: bool = False  # the device's usbredir stream is relayed now
    connections: int = 0
    sessions: int = 0  # relays begun
    refusals: collections.deque[Refusal] = field(
        default_factory=lambda: collections.deque(maxlen=50)
    )
    last: RelayStats | None = None
    bytes_up: int = 0  # VM host -> device, all sessions
    bytes_down: int = 0
    probes: int = 0  # doctor probes answered
    dead_links: int = 0  # links ended because the VM host went silent (network cut)
    last_dead_at: float | None = None  # time.time() of the last one
    rtt_ms: float | None = None  # the streaming link's smoothed RTT (kernel's TCP_INFO)
    retransmits: int = 0  # the streaming link's retransmitted segments so far


class _RecordWriter(asyncio.StreamWriter):
    """A TLS stream to QEMU that writes records of at most
    :data:`QEMU_TLS_RECORD` bytes (asyncio's SSL transport turns each
    ``write`` into records of its own, up to 16 KiB each)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= QEMU_TLS_RECORD:
            super().write(data)
            return
        view = memoryview(data)
        for at in range(0, len(view), QEMU_TLS_RECORD):
            super().write(bytes(view[at : at + QEMU_TLS_RECORD]))


class ExportEndpoint:
    """One exported device: a TLS listener on ``host:port`` (see the module doc)."""

    def __init__(
        self,
        name: str,
        source: PlainSource,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        allow: frozenset[str] | None = None,
        insecure: bool = False,
        handshake_timeout: float = 10.0,
        first_byte_timeout: float = 30.0,
        device_wait: float = 300.0,
        poll: float = 0.2,
        link_timeout: float = 10.0,
    ) -> None:
        if tls is None and not insecure:
            raise UsageError(
                f"export {name}: no TLS certificates; give cert/key/CA, "
                "or set insecure = true (lab networks only)"
            )
        self.name = name
        self.source = source
        self.host = host
        self.port = port
        self.tls = tls
        self.allow = allow
        self.insecure = insecure
        self.handshake_timeout = handshake_timeout
        self.first_byte_timeout = first_byte_timeout
        self.device_wait = device_wait
        self.poll = poll
        if not 1.0 <= link_timeout <= 3600.0:
            raise UsageError(f"export {name}: link_timeout must be 1..3600 s")
        self.link_timeout = link_timeout
        self.state = EndpointState()
        self._lingering: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._holder_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()  # set on every state change (tests wait on it)

    @property
    def address(self) -> tuple[str, int]:
        """The address it listens on (the real port when ``port`` was 0)."""
        if self._listener is None:
            return (self.host, self.port)
        sockname = self._listener.getsockname()
        return (str(sockname[0]), int(sockname[1]))

    async def start(self) -> None:
        # An accept loop of our own: the TLS handshake runs on the accepted
        # socket before any byte is read (StreamWriter.start_tls after
        # start_server loses a ClientHello already read into the buffer), and
        # its failure is ours to report.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ExportError(
                f"export {self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept(sock), name=f"export-{self.name}")
        log.info("export %s: listening on %s:%d (%s)", self.name, *self.address, self._mode())

    def _mode(self) -> str:
        return "INSECURE plaintext" if self.tls is None else "mutual TLS"

    async def stop(self) -> None:
        await cancel_and_wait([self._accept_task, *self._tasks, *self._lingering])
        self._accept_task = None
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def _touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _refuse(self, peer: str, reason: str) -> None:
        self.state.refusals.append(Refusal(time.time(), peer, reason))
        log.warning("export %s: refused %s: %s", self.name, peer, reason)
        self._touch()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("export %s: accept: %s", self.name, exc)
                await asyncio.sleep(0.5)
                continue
            task = loop.create_task(self._serve(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, conn: socket.socket) -> Streams:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol,
            conn,
            ssl=self.tls,
            ssl_handshake_timeout=self.handshake_timeout if self.tls is not None else None,
        )
        kind = asyncio.StreamWriter if self.tls is None else _RecordWriter
        return reader, kind(transport, protocol, reader, loop)

    async def _serve(self, conn: socket.socket, addr: object) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.state.connections += 1
        tune_keepalive(conn)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            reader, writer = await self._open(conn)
        except (ssl.SSLError, OSError, EOFError, TimeoutError) as exc:
            self._refuse(peer, describe_tls_error(exc))
            conn.close()
            return
        who = peer
        if self.tls is not None:
            names = peer_names(writer.get_extra_info("ssl_object"))
            if self.allow is not None and not set(names) & self.allow:
                self._refuse(
                    peer,
                    f"client certificate for {', '.join(names) or '(no name)'} is not "
                    f"allowed (this device goes to {', '.join(sorted(self.allow))})",
                )
                await close_writer(writer)
                return
            who = names[0] if names else peer
        # Open nothing until the client speaks: QEMU checks our certificate
        # only after the handshake and hangs up without a byte when it fails.
        try:
            first = await asyncio.wait_for(reader.read(CHUNK), self.first_byte_timeout)
        except TimeoutError:
            self._refuse(peer, f"{who} sent nothing in {self.first_byte_timeout:g} s")
            await close_writer(writer)
            return
        except (OSError, ssl.SSLError) as exc:
            first = b""
            log.debug("export %s: %s: %s", self.name, peer, exc)
        if not first:
            self._refuse(
                peer,
                f"{who} hung up right after the handshake: it rejected this device host's "
                "certificate (expired? not for the address it dials?)"
                if self.tls is not None
                else f"{who} hung up without sending anything",
            )
            await close_writer(writer)
            return
        if first.startswith(PROBE):
            self.state.probes += 1
            with contextlib.suppress(OSError, ssl.SSLError):
                writer.write(json.dumps(self.probe_reply(who)).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), self.handshake_timeout)
            await close_writer(writer)
            return
        holder = self.state.holder
        if holder is not None and holder != who:
            self._refuse(peer, f"{self.name} is held by {holder} (first come wins)")
            await close_writer(writer)
            return
        if holder is not None and self._holder_task is not None:
            # the same VM host again: its old link is dead (cut, QEMU restarted)
            log.info("export %s: %s reconnected; dropping its old link", self.name, who)
            await cancel_and_wait([self._holder_task])
        me = asyncio.current_task()
        assert me is not None
        self._holder_task = me
        self.state.holder = who
        self._touch()
        try:
            await self._stream(who, first, reader, writer)
        finally:
            if self._holder_task is me:
                self._holder_task = None
                self.state.holder = None
                self.state.streaming = False
            self._touch()

    async def _stream(
        self, who: str, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        link: PlainLink | None = None
        try:
            deadline = time.monotonic() + self.device_wait
            while link is None:
                link = await self.source.open()
                if link is not None:
                    break
                if time.monotonic() > deadline or writer.is_closing():
                    log.info("export %s: device not there; closing %s's link", self.name, who)
                    return
                await asyncio.sleep(self.poll)
            self.state.sessions += 1
            self.state.streaming = True
            stats = RelayStats(up=len(first))
            self.state.last = stats
            self._touch()
            log.info("export %s: streaming to %s (%s)", self.name, who, self.source.describe())
            link.writer.write(first)
            await self._relay_while_present(link, reader, writer, stats)
            self.state.bytes_up += stats.up
            self.state.bytes_down += stats.down
            side = {
                "a": "the VM host",
                "b": "the device side",
                "device": "an unplug",
                "timeout": f"a silent network ({self.link_timeout:g} s without a packet)",
            }.get(stats.closed_by or "", "vmplug")
            log.info(
                "export %s: link to %s ended by %s (%d B up, %d B down)",
                self.name,
                who,
                side,
                stats.up,
                stats.down,
            )
        finally:
            if link is not None:
                await link.close()
            await close_writer(writer)

    async def _relay_while_present(
        self,
        link: PlainLink,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stats: RelayStats,
    ) -> None:
        """Relay until either side ends, or the device leaves the bus.

        usbredirect does not exit when its device is unplugged (it tells
        QEMU the device disconnected and keeps its dead handle), and it
        would never see the replugged device: so the link ends when the
        kernel shows the device gone, and QEMU's reconnect finds it again."""
        task = asyncio.create_task(relay((reader, writer), (link.reader, link.writer), stats))
        tcp = writer.get_extra_info("socket")
        try:
            while not task.done():
                # sampled before the wait too: a link is measured from its first moment
                info = tcp_info(tcp)
                if info is not None:
                    self.state.rtt_ms = info.rtt_us / 1000.0
                    self.state.retransmits = info.total_retrans
                await asyncio.wait({task}, timeout=self.poll)
                if task.done():
                    break
                if not link.present():
                    log.info("export %s: device left the bus; ending the link", self.name)
                    stats.closed_by = "device"
                elif (silent := link_silence(tcp)) >= self.link_timeout:
                    log.warning(
                        "export %s: no packet from the VM host for %.1f s (network cut?); "
                        "letting the device go, the link ends when the network is back",
                        self.name,
                        silent,
                    )
                    stats.closed_by = "timeout"
                    self.state.dead_links += 1
                    self.state.last_dead_at = time.time()
                    keep = _raw_socket(writer)
                    if keep is not None:
                        lingering = asyncio.create_task(self._linger(keep))
                        self._lingering.add(lingering)
                        lingering.add_done_callback(self._lingering.discard)
                else:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def probe_reply(self, who: str) -> dict[str, object]:
        """The endpoint's state as the doctor on a VM host reads it."""
        st = self.state
        present = getattr(self.source, "device_present", None)
        return {
            "name": self.name,
            "you": who,
            "holder": st.holder,
            "streaming": st.streaming,
            "present": present() if callable(present) else None,
            "sessions": st.sessions,
            "dead_links": st.dead_links,
            "last_dead_at": st.last_dead_at,
            "rtt_ms": st.rtt_ms,
            "retransmits": st.retransmits,
            "link_timeout": self.link_timeout,
            "last_refusal": st.refusals[-1].reason if st.refusals else None,
        }

    async def _linger(self, keep: socket.socket) -> None:
        """Half-close a dead link's socket and keep it, so its FIN is
        retransmitted until the network is back (then QEMU sees the stream
        end and reconnects); closed once the FIN is acknowledged, the peer
        answered, or after :data:`LINGER_MAX`."""
        try:
            with contextlib.suppress(OSError):
                keep.shutdown(socket.SHUT_WR)
            end = time.monotonic() + LINGER_MAX
            while time.monotonic() < end:
                info = tcp_info(keep)
                if info is None or info.state not in _FIN_PENDING:
                    return
                await asyncio.sleep(0.2)
        finally:
            keep.close()


class Exporter:
    """Every export endpoint of a device host, started and stopped together."""

    def __init__(self, endpoints: list[ExportEndpoint]) -> None:
        self.endpoints = endpoints

    async def start(self) -> None:
        started: list[ExportEndpoint] = []
        try:
            for ep in self.endpoints:
                await ep.start()
                started.append(ep)
        except BaseException:
            for ep in started:
                await ep.stop()
            raise

    async def stop(self) -> None:
        for ep in self.endpoints:
            await ep.stop()

    def to_json(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for ep in self.endpoints:
            host, port = ep.address
            last = ep.state.refusals[-1] if ep.state.refusals else None
            out.append(
                {
                    "name": ep.name,
                    "listen": f"{host}:{port}",
                    "tls": ep.tls is not None,
                    "holder": ep.state.holder,
                    "streaming": ep.state.streaming,
                    "sessions": ep.state.sessions,
                    "bytes_up": ep.state.bytes_up,
                    "bytes_down": ep.state.bytes_down,
                    "dead_links": ep.state.dead_links,
                    "rtt_ms": ep.state.rtt_ms,
                    "retransmits": ep.state.retransmits,
                    "link_timeout": ep.link_timeout,
                    "last_refusal": None if last is None else f"{last.peer}: {last.reason}",
                }
            )
        return out


__all__ = [
    "PROBE",
    "EndpointState",
    "ExportEndpoint",
    "ExportError",
    "Exporter",
    "Location",
    "PlainLink",
    "PlainSource",
    "Refusal",
    "SysfsLocator",
    "TcpInfo",
    "TcpSource",
    "UsbredirectSource",
    "link_silence",
    "tcp_info",
    "tune_keepalive",
]
