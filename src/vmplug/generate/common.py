"""Helpers every generator shares: what can be passed through, and safe comments.

Device names and serials come from the device itself (any bytes a firmware
author chose), so they only ever appear in comments, and every comment goes
through :func:`comment_text` first: one line, printable, no sequence that
ends a comment in any of the formats vmplug writes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from vmplug.errors import UsageError
from vmplug.model import CLASS_AUDIO, HIGH_SPEED, SUPER_SPEED, TransferType, UsbDevice

#: Audio class, streaming subclass (USB Audio 1.0/2.0/3.0 all use 01:02).
_AUDIO_STREAMING = 0x02
_PORT_PATH = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")
_COMMENT_MAX = 160


class CannotExpress(UsageError):
    """A device or value that the target format cannot express (exit status 2)."""


def comment_text(text: str, limit: int = _COMMENT_MAX) -> str:
    """``text`` made safe for a one-line comment in every format vmplug writes.

    Control, format and line/paragraph separator characters become ``?``
    (a newline, U+0085 or U+2028 would end a comment and start live
    configuration); backslashes become ``/`` (udev and systemd join a line
    that ends in one with the next); ``--`` cannot appear in an XML comment.
    The result is cut to ``limit`` characters: QEMU's ``-readconfig`` reads
    lines into a 1024-byte buffer and would treat the rest of a longer line as
    a new line.
    """
    out: list[str] = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "\\":
            out.append("/")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            out.append("?")
        else:
            out.append(ch)
    clean = "".join(out)
    while "--" in clean:
        clean = clean.replace("--", "-")
    clean = clean.strip()
    if len(clean) > limit:
        clean = clean[: limit - 3].rstrip() + "..."
    if clean.endswith("-"):
        clean += "."
    return clean


def device_label(device: UsbDevice) -> str:
    """Who this is, for a comment: name, id, port and serial (sanitised)."""
    name = device.display_name
    parts = [device.vidpid or "????:????", f"port {device.port}"]
    if device.serial:
        parts.append(f"serial {device.serial}")
    return comment_text(f"{name or 'USB device'} ({', '.join(parts)})")


def is_usb3(device: UsbDevice) -> bool:
    """SuperSpeed now, or SuperSpeed-capable (bcdUSB >= 3.0) on a slower port."""
    if device.speed_mbps is not None and device.speed_mbps >= SUPER_SPEED:
        return True
    if device.usb_version:
        try:
            return float(device.usb_version.strip()) >= 3.0
        except ValueError:
            return False
    return False


def is_high_speed_or_faster(device: UsbDevice) -> bool:
    return device.speed_mbps is not None and device.speed_mbps >= HIGH_SPEED


def has_iso_audio(device: UsbDevice) -> bool:
    """An audio-class interface that streams over isochronous endpoints.

    When the reader had no endpoint data, an audio *streaming* interface
    (01:02) counts: audio streaming is isochronous by definition.
    """
    for iface in device.interfaces:
        if iface.cls != CLASS_AUDIO:
            continue
        if not iface.alt_settings and iface.subclass == _AUDIO_STREAMING:
            return True
        for alt in iface.alt_settings:
            if any(ep.transfer_type is TransferType.ISOCHRONOUS for ep in alt.endpoints):
                return True
    return False


def host_bus_port(device: UsbDevice) -> tuple[int, str]:
    """QEMU's ``hostbus``/``hostport`` pair from the sysfs port path ``3-1.2`` -> (3, "1.2")."""
    m = _PORT_PATH.match(device.port)
    if not m:
        raise CannotExpress(f"{device.port}: not a device port path (expected bus-port.port...)")
    return int(m.group(1)), m.group(2)


def check_passable(devices: Sequence[UsbDevice]) -> None:
    """Refuse what no hypervisor can take: hubs, root hubs, devices without ids."""
    if not devices:
        raise UsageError("name at least one device (a port path like 3-1.2, vid:pid, or a serial)")
    for dev in devices:
        if dev.is_root_hub:
            raise CannotExpress(f"{dev.port} is a root hub; pass the devices behind it instead")
        if dev.is_hub:
            raise CannotExpress(
                f"{dev.port} ({dev.vidpid or '?'}) is a hub: QEMU cannot pass a hub through. "
                "Name the devices plugged into it instead."
            )
        if dev.vendor_id is None or dev.product_id is None:
            raise CannotExpress(
                f"{dev.port}: the kernel gave no vendor/product id (see `vmplug list` warnings)"
            )


def shared_ids(devices: Sequence[UsbDevice]) -> list[str]:
    """vid:pid values that more than one of ``devices`` share."""
    seen: dict[str, int] = {}
    for dev in devices:
        if dev.vidpid:
            seen[dev.vidpid] = seen.get(dev.vidpid, 0) + 1
    return [k for k, n in seen.items() if n > 1]


def share_text(devices: Sequence[UsbDevice], dup: Sequence[str]) -> str:
    """``2-1 and 2-3 share 0627:0001`` for each shared id."""
    parts = []
    for vidpid in dup:
        ports = [d.port for d in devices if d.vidpid == vidpid]
        parts.append(f"{', '.join(ports[:-1])} and {ports[-1]} share {vidpid}")
    return "; ".join(parts)
