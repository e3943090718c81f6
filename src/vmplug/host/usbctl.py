"""The kernel's USB levers the self-healing ladder pulls (:mod:`vmplug.daemon.heal`).

Each function acts on one device or hub port, through the interfaces the
kernel documents, and raises :class:`UsbCtlError` with the reason when the
kernel refuses (a missing node, no permission, a port with no ``disable``):

* :func:`reset_device` -- ``USBDEVFS_RESET`` on ``/dev/bus/usb/BBB/DDD``: the
  kernel resets the device's port and re-enumerates it at the same address
  (drivers are unbound and bound again; a process holding the node, QEMU
  included, keeps its descriptor but loses its claimed interfaces);
* :func:`cycle_port` -- ``1`` then ``0`` written to
  ``/sys/bus/usb/devices/HUB:1.0/HUB-portN/disable``: the hub disables the
  port (the device disconnects) and enables it again (the device is found and
  enumerated anew).  Whether VBUS is really cut depends on the hub: only a
  hub whose descriptor says per-port power switching (``wHubCharacteristics``
  bits 1:0 = ``01``) switches each port's power, and the kernel powers a port
  off only when its ``disable`` is set *and* nothing keeps it on.  Hubs with
  ganged power (``00``) or no power switching (``1x``, most cheap hubs and many
  root hubs) only disable the port's data link: a device that hung in a way
  only power-off clears stays hung.  :func:`power_switching` reads the bits;
* :func:`reauthorize` -- ``0`` then ``1`` written to the device's
  ``authorized``: the kernel unconfigures it (drivers unbound, interfaces
  gone) and configures it again, without touching the port.

Nothing here decides *whether* to act; the ladder does.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vmplug.errors import VmplugError

#: _IO('U', 20) from <linux/usbdevice_fs.h>
USBDEVFS_RESET = 0x5514

_PORT_RE = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")


class UsbCtlError(VmplugError):
    """The kernel refused a reset, port cycle or (de)authorization."""


@dataclass(frozen=True, slots=True)
class PortRef:
    """Where a device's port lives: the hub's kernel name and the port number."""

    hub: str  # "2-2.4" or "usb2" for a root hub
    number: int

    def disable_path(self, sysfs_root: Path) -> Path:
        """``…/devices/HUB/HUB:1.0/HUB-portN/disable`` (a root hub's ports are ``usbB-portN``)."""
        base = sysfs_root / "bus/usb/devices" / self.hub
        return base / f"{self.hub}:1.0" / f"{self.hub}-port{self.number}" / "disable"


def port_of(port: str) -> PortRef:
    """``2-2.4.2`` -> hub ``2-2.4`` port 2; ``2-1`` -> hub ``usb2`` port 1."""
    m = _PORT_RE.match(port)
    if m is None:
        raise UsbCtlError(f"not a USB port path: {port!r}")
    bus, chain = m.group(1), m.group(2).split(".")
    hub = f"usb{bus}" if len(chain) == 1 else f"{bus}-{'.'.join(chain[:-1])}"
    return PortRef(hub=hub, number=int(chain[-1]))


def devnode(busnum: int, devnum: int, dev_root: Path = Path("/dev")) -> Path:
    return dev_root / "bus/usb" / f"{busnum:03d}" / f"{devnum:03d}"


def reset_device(node: Path) -> None:
    """``USBDEVFS_RESET`` on the device's usbfs node."""
    try:
        fd = os.open(node, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsbCtlError(f"cannot open {node}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, USBDEVFS_RESET, 0)
    except OSError as exc:
        raise UsbCtlError(f"USBDEVFS_RESET on {node} refused: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise UsbCtlError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def cycle_port(sysfs_root: Path, port: str, off_s: float = 0.5) -> Path:
    """Disable the device's hub port, wait ``off_s``, enable it again; the
    attribute written is returned."""
    path = port_of(port).disable_path(sysfs_root)
    if not path.exists():
        raise UsbCtlError(f"{port}: its hub port has no disable attribute ({path})")
    _write(path, "1")
    try:
        time.sleep(off_s)
    finally:
        _write(path, "0")
    return path


def reauthorize(sysfs_root: Path, port: str, off_s: float = 0.2) -> Path:
    """Write 0, then 1, to the device's ``authorized``."""
    path = sysfs_root / "bus/usb/devices" / port / "authorized"
    if not path.exists():
        raise UsbCtlError(f"{port}: no such device ({path})")
    _write(path, "0")
    try:
        time.sleep(off_s)
    finally:
        _write(path, "1")
    return path


def power_switching(descriptor: bytes) -> str:
    """What a hub descriptor's ``wHubCharacteristics`` bits 1:0 say:
    ``"per-port"`` (a port's power can be cut), ``"ganged"`` (all ports at
    once: ``disable`` only stops the link) or ``"none"``."""
    if len(descriptor) < 5:
        raise UsbCtlError("hub descriptor too short")
    bits = descriptor[3] & 0b11
    return {0: "ganged", 1: "per-port"}.get(bits, "none")
