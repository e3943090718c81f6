"""A usbredir device peer on loopback, in place of ``usbredirect`` where this
machine has no USB (its kernel has none: real usbredirect runs in the lab).

It speaks the usbredir protocol (usbredirproto.h, usbredir 0.13) as the
device side does: answers QEMU's hello with its own (caps
``ep_info_max_packet_size``, ``64bits_ids``, ``32bits_bulk_length``: what
QEMU's usb-redir wants before it attaches to an xHCI port), then announces
one full-speed HID keyboard (interface and endpoint info, then
``device_connect``).  QEMU's usb-redir then attaches a device to the guest's
bus (QOM ``attached`` true); when the stream ends, QEMU detaches it.  Every
connection and every ``device_connect`` it sent is counted, so a test sees
a re-plug (a new stream) as it happens and a duplicate as a count.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

HELLO = 0
DEVICE_CONNECT = 1
INTERFACE_INFO = 4
EP_INFO = 5
CAP_EP_INFO_MAX_PACKET_SIZE = 4
CAP_64BITS_IDS = 5
CAP_32BITS_BULK_LENGTH = 6
CAPS = (1 << CAP_EP_INFO_MAX_PACKET_SIZE) | (1 << CAP_64BITS_IDS) | (1 << CAP_32BITS_BULK_LENGTH)
SPEED_FULL = 1
TYPE_CONTROL, TYPE_INTERRUPT, TYPE_INVALID = 0, 3, 255


def _packet(kind: int, body: bytes) -> bytes:
    """A packet after the hello: both sides have 64-bit ids, a 16-byte header."""
    return struct.pack("<IIQ", kind, len(body), 0) + body


def announce(vendor: int = 0x0627, product: int = 0x0001) -> bytes:
    """Interface info, endpoint info and device_connect of a HID keyboard."""
    iface = struct.pack("<I", 1) + bytes(
        [0] * 32 + [3] + [0] * 31 + [1] + [0] * 31 + [1] + [0] * 31
    )
    types = [TYPE_INVALID] * 32
    intervals = [0] * 32
    interfaces = [0] * 32
    max_packet = [0] * 32
    types[0] = types[16] = TYPE_CONTROL  # endpoint 0, both directions
    max_packet[0] = max_packet[16] = 64
    types[17], intervals[17], max_packet[17] = TYPE_INTERRUPT, 10, 8  # 0x81: interrupt IN
    ep = bytes(types) + bytes(intervals) + bytes(interfaces) + struct.pack("<32H", *max_packet)
    connect = struct.pack("<BBBBHH", SPEED_FULL, 0, 0, 0, vendor, product)
    return _packet(INTERFACE_INFO, iface) + _packet(EP_INFO, ep) + _packet(DEVICE_CONNECT, connect)


@dataclass
class UsbredirDevice:
    """``await dev.start()``; ``dev.port`` on 127.0.0.1; ``await dev.stop()``."""

    connections: int = 0
    connects_sent: int = 0
    open_streams: int = 0
    received: int = 0
    server: asyncio.Server | None = None
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
        self.open_streams += 1
        self._writers.append(writer)
        try:
            kind, length, _id = struct.unpack("<III", await reader.readexactly(12))
            await reader.readexactly(length)
            if kind != HELLO:
                return
            version = b"vmplug test device".ljust(64, b"\0")
            writer.write(struct.pack("<III", HELLO, 68, 0) + version + struct.pack("<I", CAPS))
            writer.write(announce())
            await writer.drain()
            self.connects_sent += 1
            while data := await reader.read(65536):
                self.received += len(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_streams -= 1
            writer.transport.abort()
