"""A usbredir message bigger than 4096 bytes reaches a real QEMU 7.2 over TLS.

QEMU 7.2's TLS chardev reads 4096 bytes per wake-up and wakes only when its
socket is readable, so the rest of a bigger TLS record waits inside GnuTLS
until the peer sends again (fixed in QEMU 8.0; Debian 12 ships 7.2).  In the
lab that was the remote usb-storage whose first data read hung: a bulk IN
reply is one big message, and the device side sends nothing more until
QEMU answers.  The export endpoint therefore writes TLS records of at most
:data:`~vmplug.remote.export.QEMU_TLS_RECORD` bytes.

Here a loopback usbredir device answers QEMU's hello with one write of
~12 KiB: its own hello (padded with unused capability words), the interface
info and a device connect.  QEMU attaches the device (QOM ``attached``)
only when it has parsed the message after the big one.  The control runs
the same stream with 16 KiB records, as before the fix: the whole stream
has left the endpoint and QEMU still has not seen the device connect, until
the device sends one more packet (in the lab nothing more came: usbredir
is request/reply).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.remote.conftest import Pki, running_vm, wait_for
from tests.support.qemu_proc import QemuFactory
from vmplug.remote import export
from vmplug.remote.export import ExportEndpoint, TcpSource
from vmplug.vms.base import UsbRedirSpec
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

DEV = "vmplug-records0001"
HELLO, DEVICE_CONNECT, INTERFACE_INFO, EP_INFO = 0, 1, 4, 5
SPEED_FULL = 1
#: what QEMU's usb-redir needs on xHCI: connect_device_version,
#: ep_info_max_packet_size, 64bits_ids (16-byte headers after the hellos),
#: 32bits_bulk_length
CAPS = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6)
PADDING = 12 * 1024  # capability words past the known ones (all zero)


def _packet(kind: int, body: bytes) -> bytes:
    if kind == HELLO:
        return struct.pack("<III", kind, len(body), 0) + body
    return struct.pack("<IIQ", kind, len(body), 0) + body


#: one interface, vendor class
_IFACE = struct.pack("<I", 1) + bytes(32) + bytes([0xFF]) + bytes(31) + bytes(64)


def device_stream() -> bytes:
    """hello (big) + interface info + endpoint info + device connect, as one write."""
    version = b"vmplug records test".ljust(64, b"\0")
    hello = _packet(HELLO, version + struct.pack("<I", CAPS) + bytes(PADDING))
    types = bytearray([0xFF] * 32)
    types[0] = types[16] = 0  # ep 0 out and in: control
    mps = [0] * 32
    mps[0] = mps[16] = 64
    ep_info = bytes(types) + bytes(32) + bytes(32) + struct.pack("<32H", *mps)
    connect = struct.pack("<BBBBHHH", SPEED_FULL, 0, 0, 0, 0x1234, 0x5678, 0x0100)
    return (
        hello
        + _packet(INTERFACE_INFO, _IFACE)
        + _packet(EP_INFO, ep_info)
        + _packet(DEVICE_CONNECT, connect)
    )


class BigDevice:
    """A usbredir device on loopback that answers QEMU's hello with
    :func:`device_stream` in one write, then reads until the end."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.answered = asyncio.Event()
        #: set to make the device send one more (small) packet
        self.poke = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _kind, length, _id = struct.unpack("<III", await reader.readexactly(12))
            await reader.readexactly(length)
            writer.write(device_stream())
            await writer.drain()
            self.answered.set()
            drain = asyncio.create_task(self._drain(reader))
            await self.poke.wait()
            writer.write(_packet(INTERFACE_INFO, _IFACE))
            await writer.drain()
            await drain
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    @staticmethod
    async def _drain(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def device() -> AsyncIterator[BigDevice]:
    dev = BigDevice()
    try:
        yield dev
    finally:
        dev.close()


async def _attached(probe: str) -> bool:
    def read() -> bool:
        with SyncQmp(probe) as q:
            path = f"/machine/peripheral/{DEV}"
            return q.execute("qom-get", {"path": path, "property": "attached"}) is True

    return await asyncio.to_thread(read)


async def _link(
    pki: Pki,
    device: BigDevice,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> tuple[ExportEndpoint, str]:
    port = await device.start()
    ep: ExportEndpoint = await make_endpoint(pki.devhost, TcpSource("127.0.0.1", port))
    vm, probe = await running_vm(qemu, make_vm, ("-global", "usb-redir.debug=4"))
    tls_dir: Path = pki.qemu_dir(pki.vmhost, "vmhost")
    await vm.attach(DEV, UsbRedirSpec("127.0.0.1", ep.address[1], "devhost", str(tls_dir)))
    await asyncio.wait_for(device.answered.wait(), 15)
    return ep, probe


async def test_a_message_bigger_than_qemus_read_reaches_qemu(
    pki: Pki,
    device: BigDevice,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    assert len(device_stream()) > 2 * export.QEMU_TLS_RECORD
    _ep, probe = await _link(pki, device, qemu, make_vm, make_endpoint)
    assert await wait_for(lambda: _attached(probe), timeout=20), "QEMU never saw the device"


async def test_control_16k_records_stall_qemu(
    pki: Pki,
    device: BigDevice,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the lab saw before the fix, without a guest: the stream has left
    the endpoint whole, and QEMU has parsed only its first 4096 bytes."""
    monkeypatch.setattr(export, "QEMU_TLS_RECORD", 16 * 1024)
    ep, probe = await _link(pki, device, qemu, make_vm, make_endpoint)
    total = len(device_stream())
    assert await wait_for(lambda: ep.state.last is not None and ep.state.last.down >= total)
    # QEMU had 2 s to parse what it was sent; the device connect waits inside GnuTLS
    assert not await wait_for(lambda: _attached(probe), timeout=2.0)
    # until the device sends again: then QEMU reads on, and attaches it
    device.poke.set()
    assert await wait_for(lambda: _attached(probe), timeout=20), "QEMU never saw the device"
