"""The host inventory: sysfs devices, with names filled in from usb.ids."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

from vmplug.host import sysfs
from vmplug.host.names import UsbIds, find_usb_ids
from vmplug.model import UsbDevice

TYPE_CHECKING = False  # `vmplug list --json` imports this module: no typing, no pathlib
if TYPE_CHECKING:
    from pathlib import Path


def _root(explicit: str | Path | None) -> str | Path:
    return explicit or os.environ.get("VMPLUG_SYSFS_ROOT") or sysfs.DEFAULT_ROOT


def sysfs_root_from_env(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``VMPLUG_SYSFS_ROOT``, else ``/sys``."""
    from pathlib import Path  # noqa: PLC0415

    return Path(_root(explicit))


def name_devices(devices: list[UsbDevice], ids: UsbIds | None = None) -> list[UsbDevice]:
    """Fill ``vendor_name``/``product_name`` for devices that give no strings."""
    out: list[UsbDevice] = []
    for dev in devices:
        if (dev.manufacturer and dev.product) or dev.vendor_id is None:
            out.append(dev)
            continue
        if ids is None:
            ids = UsbIds(find_usb_ids())
        vendor, product = ids.lookup(dev.vendor_id, dev.product_id)
        out.append(dataclasses.replace(dev, vendor_name=vendor, product_name=product))
    return out


def _serial_unique(devices: list[UsbDevice]) -> list[bool]:
    """What each device's ``serial_unique`` should be: False when another present
    device has the same vid:pid and serial."""
    counts: Counter[tuple[int | None, int | None, str | None]] = Counter(
        (d.vendor_id, d.product_id, d.serial) for d in devices if d.serial
    )
    return [not (d.serial and counts[(d.vendor_id, d.product_id, d.serial)] > 1) for d in devices]


def mark_shared_serials(devices: list[UsbDevice]) -> list[UsbDevice]:
    """Flag devices whose vid:pid + serial another present device also has."""
    # replace only where the flag differs from the truth
    return [
        dev if dev.serial_unique == unique else dataclasses.replace(dev, serial_unique=unique)
        for dev, unique in zip(devices, _serial_unique(devices), strict=True)
    ]


def read_devices(root: str | Path | None = None) -> list[UsbDevice]:
    """Every USB device under the sysfs root (root hubs included), named."""
    devices = name_devices(sysfs.scan(_root(root)))
    # As mark_shared_serials, but these objects are this call's own, just made
    # and seen by nobody yet: set the flag in place instead of copying each one
    # (a tree of identical devices sharing one serial: ~6-12 ms per 1,000).
    for dev, unique in zip(devices, _serial_unique(devices), strict=True):
        if dev.serial_unique != unique:
            object.__setattr__(dev, "serial_unique", unique)
    return devices


def device_dir(root: str | Path, devpath: str) -> str:
    """The sysfs directory of a uevent's ``DEVPATH`` (already the resolved
    ``/devices/...`` path: no realpath needed)."""
    return os.path.join(root, devpath.lstrip("/"))  # noqa: PTH118


def read_one(root: str | Path, devpath: str, port: str) -> UsbDevice | None:
    """The device a uevent names, read and named as :func:`read_devices` reads
    each one; None when it is not there as one consistent set of attributes
    (gone again, or read while the kernel removed or set it up).  Whether its
    serial is shared is for the caller to mark, against the other devices."""
    read = sysfs.read_device(device_dir(root, devpath), port)
    return None if read is None else name_devices([read])[0]
