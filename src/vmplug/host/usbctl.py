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
  only power-off clears stays hung.  :func:`power_switching` reads the bits.
  Worse, on some of them the device does not come back at all (measured in
  the lab guest, Linux 6.1 on EHCI's root hub under QEMU 7.2: the kernel
  disconnects it and clears the connect change; the port then reads
  connected and enabled, a ``PORT_RESET`` sent to it through the hub's usbfs
  node is refused while it is suspended and, after the suspend is cleared,
  goes through without anything enumerating the device; only rebinding the
  hub driver, which takes every device on the hub, brought it back), so the
  ladder skips this lever on such hubs
  (:func:`vmplug.daemon.heal.port_cycle_rung`);
* :func:`reauthorize` -- ``0`` then ``1`` written to the device's
  ``authorized``: the kernel unconfigures it (drivers unbound, interfaces
  gone) and configures it again, without touching the port;
* :func:`rebind_controller` -- the host controller's PCI address written to
  its driver's ``unbind`` and ``bind`` (every device on it is lost and
  enumerated anew): only for a controller the caller names as allowed.

Whether a port cycle cut the power is *measured*, not assumed:
:func:`cycle_port` reads the port's status from its hub (``GET_STATUS`` over
``USBDEVFS_CONTROL`` on the hub's node, the request ``lsusb -v`` makes) while
the port is disabled: ``PORT_POWER`` clear means the power was cut.  The
hub's ``wHubCharacteristics`` (its class descriptor, which sysfs'
``descriptors`` does not hold) say what the hub claims (:func:`hub_power`).

Nothing here decides *whether* to act; the ladder does.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from vmplug.errors import VmplugError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

#: _IO('U', 20) from <linux/usbdevice_fs.h>
USBDEVFS_RESET = 0x5514
#: _IOWR('U', 0, struct usbdevfs_ctrltransfer) on a 64-bit kernel (24 bytes)
USBDEVFS_CONTROL = 0xC0185500
_PCI_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@functools.cache
def _ctrl_transfer() -> type[ctypes.Structure]:
    """``struct usbdevfs_ctrltransfer``, built at first use: ctypes is ~0.1 s of
    ``vmplug run``'s start in the lab guest under TCG, and only a rung needs it."""
    import ctypes  # noqa: PLC0415

    class CtrlTransfer(ctypes.Structure):
        _fields_ = (
            ("bRequestType", ctypes.c_uint8),
            ("bRequest", ctypes.c_uint8),
            ("wValue", ctypes.c_uint16),
            ("wIndex", ctypes.c_uint16),
            ("wLength", ctypes.c_uint16),
            ("timeout", ctypes.c_uint32),
            ("data", ctypes.c_void_p),
        )

    return CtrlTransfer


_PORT_RE = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")


class UsbCtlError(VmplugError):
    """The kernel refused a reset, port cycle or (de)authorization."""


@dataclass(frozen=True, slots=True)
class PortRef:
    """Where a device's port lives: the hub's kernel name and the port number."""

    hub: str  # "2-2.4" or "usb2" for a root hub
    number: int

    def disable_path(self, sysfs_root: Path) -> Path:
        """``…/devices/HUB/HUB:1.0/HUB-portN/disable``; a root hub ``usbB``'s
        interface is ``B-0:1.0`` and its ports ``usbB-portN``."""
        base = sysfs_root / "bus/usb/devices" / self.hub
        intf = f"{self.hub[3:]}-0:1.0" if self.hub.startswith("usb") else f"{self.hub}:1.0"
        return base / intf / f"{self.hub}-port{self.number}" / "disable"


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


def control_in(node: Path, request_type: int, request: int, value: int, index: int,
               length: int, timeout_ms: int = 1000) -> bytes:  # fmt: skip
    """One IN control transfer on a device's endpoint 0 through its usbfs node."""
    import ctypes  # noqa: PLC0415 - see _ctrl_transfer

    buf = ctypes.create_string_buffer(length)
    xfer = _ctrl_transfer()(request_type, request, value, index, length, timeout_ms,
                         ctypes.cast(buf, ctypes.c_void_p))  # fmt: skip
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UsbCtlError(f"cannot open {node}: {exc.strerror}") from None
    try:
        n = fcntl.ioctl(fd, USBDEVFS_CONTROL, xfer)
    except OSError as exc:
        raise UsbCtlError(f"control transfer on {node} refused: {exc.strerror}") from None
    finally:
        os.close(fd)
    return buf.raw[: int(n)]


def _hub_node(sysfs_root: Path, hub: str, dev_root: Path) -> tuple[Path, bool]:
    """The hub's usbfs node and whether it is a SuperSpeed hub."""
    base = sysfs_root / "bus/usb/devices" / hub
    try:
        busnum = int((base / "busnum").read_text())
        devnum = int((base / "devnum").read_text())
        speed = float((base / "speed").read_text() or 0)
    except (OSError, ValueError) as exc:
        raise UsbCtlError(f"hub {hub}: cannot read its bus/device number: {exc}") from None
    return devnode(busnum, devnum, dev_root), speed >= 5000


def hub_power(sysfs_root: Path, hub: str, dev_root: Path = Path("/dev")) -> str:
    """What hub ``hub`` (``usb2``, ``2-2.4``) says of its port power switching,
    from its class descriptor (:func:`power_switching`)."""
    node, superspeed = _hub_node(sysfs_root, hub, dev_root)
    # GET_DESCRIPTOR, class, device: type 0x29 (USB 2 hub) or 0x2a (SuperSpeed hub)
    raw = control_in(node, 0xA0, 0x06, (0x2A if superspeed else 0x29) << 8, 0, 71)
    return power_switching(raw)


def port_powered(sysfs_root: Path, port: str, dev_root: Path = Path("/dev")) -> bool:
    """Whether the device's hub port has power now: ``PORT_POWER`` in the
    status its hub gives (``GET_STATUS``, recipient: other = the port)."""
    ref = port_of(port)
    node, superspeed = _hub_node(sysfs_root, ref.hub, dev_root)
    raw = control_in(node, 0xA3, 0x00, 0, ref.number, 4)
    if len(raw) < 2:
        raise UsbCtlError(f"{port}: short port status from hub {ref.hub}")
    status = int.from_bytes(raw[:2], "little")
    return bool(status & (1 << (9 if superspeed else 8)))


@dataclass(frozen=True, slots=True)
class Cycled:
    """What a port cycle did: the attribute written, and whether the port had
    power while disabled (None: its hub could not be asked)."""

    disable: Path
    powered_while_off: bool | None
    #: the hub's own claim (per-port, ganged, none) or None
    switching: str | None

    @property
    def note(self) -> str:
        if self.powered_while_off is False:
            return "power cycled"
        if self.powered_while_off is True:
            return "port disabled, power not cut"
        return "port disabled, power not known (hub not readable)"


def cycle_port(
    sysfs_root: Path, port: str, off_s: float = 0.5, dev_root: Path | None = None
) -> Cycled:
    """Disable the device's hub port, wait ``off_s``, enable it again.  With
    ``dev_root`` (the live /dev) the port's power is read from its hub while
    disabled."""
    path = port_of(port).disable_path(sysfs_root)
    if not path.exists():
        raise UsbCtlError(f"{port}: its hub port has no disable attribute ({path})")
    powered: bool | None = None
    switching: str | None = None
    if dev_root is not None:
        try:
            switching = hub_power(sysfs_root, port_of(port).hub, dev_root)
        except UsbCtlError:
            switching = None
    _write(path, "1")
    try:
        time.sleep(off_s / 2)
        if dev_root is not None:
            try:
                powered = port_powered(sysfs_root, port, dev_root)
            except UsbCtlError:
                powered = None
        time.sleep(off_s / 2)
    finally:
        _write(path, "0")
    return Cycled(path, powered, switching)


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


def controller_of(sysfs_root: Path, port: str) -> str | None:
    """The PCI address of the host controller a device hangs from (the path
    component just above its ``usbN``), or None (not on PCI: dummy_hcd, a
    platform controller)."""
    real = (sysfs_root / "bus/usb/devices" / port).resolve()
    parts = real.parts
    for i, part in enumerate(parts):
        if re.fullmatch(r"usb\d+", part) and i > 0 and _PCI_RE.match(parts[i - 1]):
            return parts[i - 1]
    return None


def rebind_controller(sysfs_root: Path, pci: str, allowed: Collection[str],
                      off_s: float = 0.5) -> Path:  # fmt: skip
    """Unbind the host controller at PCI address ``pci`` from its driver and
    bind it again -- only when ``pci`` is in ``allowed`` (the config's
    ``[heal] controllers``); the driver directory is returned."""
    if pci not in allowed:
        raise UsbCtlError(f"controller {pci} is not in [heal] controllers: vmplug never resets it")
    dev = sysfs_root / "bus/pci/devices" / pci
    try:
        driver = (dev / "driver").resolve(strict=True)
    except OSError:
        raise UsbCtlError(f"controller {pci}: no driver bound ({dev}/driver)") from None
    _write(driver / "unbind", pci)
    try:
        time.sleep(off_s)
    finally:
        _write(driver / "bind", pci)
    return driver


def power_switching(descriptor: bytes) -> str:
    """What a hub descriptor's ``wHubCharacteristics`` bits 1:0 say:
    ``"per-port"`` (a port's power can be cut), ``"ganged"`` (all ports at
    once: ``disable`` only stops the link) or ``"none"``."""
    if len(descriptor) < 5:
        raise UsbCtlError("hub descriptor too short")
    bits = descriptor[3] & 0b11
    return {0: "ganged", 1: "per-port"}.get(bits, "none")
