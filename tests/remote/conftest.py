"""Fixtures for the remote-link tests: a CA with host certificates, a usbredir
peer standing in for usbredirect on loopback, export endpoints, QmpVms."""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.qemu_proc import XHCI, QemuFactory
from vmplug.remote import certs
from vmplug.remote.export import ExportEndpoint, PlainSource
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp
from vmplug.wire.tls import server_context

USBREDIR_HELLO = 0


@dataclass
class Pki:
    """One installation's CA, a device host ``devhost`` (reached as 127.0.0.1)
    and a VM host ``vmhost``; ``other()`` makes a second, unrelated CA."""

    root: Path
    ca: certs.HostFiles
    devhost: certs.HostFiles
    vmhost: certs.HostFiles

    def issue(self, name: str, **kw: Any) -> certs.HostFiles:
        return certs.issue(self.root / "ca", name, self.root / name, **kw)

    def qemu_dir(self, files: certs.HostFiles, name: str) -> Path:
        return certs.qemu_client_dir(files, self.root / "qemu" / name)

    def other_ca(self) -> Path:
        other = self.root / "other-ca"
        certs.make_ca(other, name="someone else's CA")
        return other


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    root = tmp_path / "pki"
    ca = certs.make_ca(root / "ca")
    devhost = certs.issue(root / "ca", "devhost", root / "devhost", addresses=["127.0.0.1"])
    vmhost = certs.issue(root / "ca", "vmhost", root / "vmhost")
    return Pki(root, ca, devhost, vmhost)


def expired(pki: Pki, name: str) -> certs.HostFiles:
    now = dt.datetime.now(dt.UTC)
    return pki.issue(
        name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )


@dataclass
class UsbredirPeer:
    """A loopback usbredir peer in place of usbredirect: reads the first
    packet (QEMU's usb-redir sends its hello first), answers with its own
    hello, then reads and counts whatever comes until the stream ends."""

    hellos: list[bytes] = field(default_factory=list)
    received: int = 0
    connections: int = 0
    server: asyncio.Server | None = None
    got_hello: asyncio.Event = field(default_factory=asyncio.Event)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            kind, length, _id = struct.unpack("<III", await reader.readexactly(12))
            body = await reader.readexactly(length)
            self.received += 12 + length
            if kind == USBREDIR_HELLO:
                self.hellos.append(body[:64].rstrip(b"\0"))
                self.got_hello.set()
            version = b"vmplug test peer".ljust(64, b"\0")
            caps = struct.pack("<I", 0)
            writer.write(struct.pack("<III", USBREDIR_HELLO, 68, 0) + version + caps)
            await writer.drain()
            while data := await reader.read(65536):
                self.received += len(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
async def peer() -> AsyncIterator[UsbredirPeer]:
    p = UsbredirPeer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def make_endpoint() -> AsyncIterator[Callable[..., Any]]:
    """``await make_endpoint(pki, source, allow=..., files=...)``: a started
    export endpoint on 127.0.0.1 (a free port); all stopped at teardown."""
    made: list[ExportEndpoint] = []

    async def make(
        files: certs.HostFiles | None,
        source: PlainSource,
        *,
        allow: frozenset[str] | None = frozenset({"vmhost"}),
        **kw: Any,
    ) -> ExportEndpoint:
        tls = None if files is None else server_context(files.ca, files.cert, files.key)
        ep = ExportEndpoint("dev", source, host="127.0.0.1", port=0, tls=tls, allow=allow, **kw)
        await ep.start()
        made.append(ep)
        return ep

    yield make
    for ep in made:
        await ep.stop()


@pytest.fixture
async def make_vm() -> AsyncIterator[Callable[..., QmpVm]]:
    made: list[QmpVm] = []

    def make(name: str, address: str, **kw: Any) -> QmpVm:
        vm = QmpVm(name, address, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        await vm.stop()


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            return value
        await asyncio.sleep(step)


async def running_vm(
    qemu: QemuFactory, make_vm: Callable[..., QmpVm], extra: tuple[str, ...] = ()
) -> tuple[QmpVm, str]:
    """A QEMU with xHCI, running (usb-redir reads and writes nothing while the
    VM is stopped), and vmplug's QmpVm on its first QMP socket; the second
    socket (returned) is the test's own view."""
    proc = qemu([*XHCI, *extra], qmp_sockets=2)
    proc.start()
    probe = str(proc.qmp_paths[1])

    def cont() -> None:
        with SyncQmp(probe) as q:
            q.execute("cont")

    await asyncio.to_thread(cont)
    vm = make_vm("vm", proc.qmp_path)
    await vm.start()
    assert await vm.wait_connected(10)
    return vm, probe
