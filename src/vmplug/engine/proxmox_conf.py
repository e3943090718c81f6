"""Proxmox VE's config formats, parsed (no I/O: :mod:`vmplug.vms.proxmox_conf` reads the files).

* ``VMID.conf`` (qm.conf(5)): ``key: value`` lines; ``#`` lines at the top are
  the VM's description; the current config ends at the first ``[SECTION]``
  line (snapshots, ``[PENDING]``).  vmplug reads ``name:`` and ``usbN:``
  (``usb0`` ... ``usb13``): ``[host=]HOSTUSBDEVICE`` or ``mapping=NAME``, and
  ``usb3=1``.  HOSTUSBDEVICE is ``VENDOR:PRODUCT`` (hex, each optionally
  ``0x``-prefixed), ``BUS-PORT(.PORT)*`` (decimal) or ``spice`` -- the forms
  qemu-server's ``parse_usb_device`` accepts.
* ``mapping/usb.cfg``: cluster-wide resource mappings, a section config: an
  unindented mapping id, then indented ``map id=VENDOR:PRODUCT,node=NODE
  [,path=BUS-PORT]`` lines, one per cluster node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vmplug.model import UsbDevice

#: usb0 ... usb13 with qemu-xhci (machine >= 7.1); older machines stop at usb4.
MAX_USB = 14

_USB_KEY = re.compile(r"^usb(\d+)$")
_VIDPID = re.compile(r"^(?:0x)?([0-9A-Fa-f]{4}):(?:0x)?([0-9A-Fa-f]{4})$")
_BUSPORT = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")
#: Proxmox's pve-configid format, which mapping ids follow.
MAPPING_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class HostDevice:
    """One device of a usbN line or a mapping: by id, by bus-port, or spice."""

    vendor_id: int | None = None
    product_id: int | None = None
    port: str | None = None  # "BUS-PORT(.PORT)*", the sysfs name of the port
    spice: bool = False

    @classmethod
    def parse(cls, value: str) -> HostDevice | None:
        """qemu-server's ``parse_usb_device``; None for what it refuses."""
        m = _VIDPID.match(value)
        if m:
            return cls(vendor_id=int(m.group(1), 16), product_id=int(m.group(2), 16))
        if _BUSPORT.match(value):
            return cls(port=value)
        if value.lower() == "spice":
            return cls(spice=True)
        return None

    def matches(self, device: UsbDevice) -> bool:
        if self.port is not None:
            return device.port == self.port
        if self.vendor_id is not None:
            return device.vendor_id == self.vendor_id and device.product_id == self.product_id
        return False

    def text(self) -> str:
        if self.port is not None:
            return self.port
        if self.vendor_id is not None and self.product_id is not None:
            return f"{self.vendor_id:04x}:{self.product_id:04x}"
        return "spice"


@dataclass(frozen=True, slots=True)
class UsbEntry:
    """A ``usbN:`` line."""

    index: int
    raw: str
    host: HostDevice | None = None
    mapping: str | None = None
    usb3: bool = False

    @property
    def key(self) -> str:
        return f"usb{self.index}"

    @classmethod
    def parse(cls, index: int, value: str) -> UsbEntry:
        host: HostDevice | None = None
        mapping: str | None = None
        usb3 = False
        for n, part in enumerate(p.strip() for p in value.split(",")):
            if not part:
                continue
            key, eq, val = part.partition("=")
            if not eq:
                key, val = ("host", part) if n == 0 else (part, "")
            if key == "host":
                host = HostDevice.parse(val)
            elif key == "mapping":
                mapping = val
            elif key == "usb3":
                usb3 = val.strip().lower() in ("1", "yes", "on", "true")
        return cls(index=index, raw=value, host=host, mapping=mapping, usb3=usb3)


@dataclass(frozen=True, slots=True)
class PveVm:
    """What one ``VMID.conf`` says that vmplug cares about."""

    vmid: int
    path: str
    name: str | None = None
    usb: tuple[UsbEntry, ...] = ()
    #: line numbers of the usbN lines, for evidence
    lines: dict[str, int] = field(default_factory=dict)

    def free_usb_index(self) -> int | None:
        used = {e.index for e in self.usb}
        return next((i for i in range(MAX_USB) if i not in used), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid,
            "path": self.path,
            "name": self.name,
            "usb": [
                {
                    "key": e.key,
                    "host": e.host.text() if e.host else None,
                    "mapping": e.mapping,
                    "usb3": e.usb3,
                }
                for e in self.usb
            ],
        }


def parse_vm_conf(text: str, vmid: int, path: str = "<conf>") -> PveVm:
    """The current config of a ``VMID.conf`` (snapshot and pending sections skipped)."""
    name: str | None = None
    usb: list[UsbEntry] = []
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            break  # [snapshot], [PENDING], [special:cloudinit]: not the running config
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "name":
            name = value or None
            continue
        m = _USB_KEY.match(key)
        if m:
            usb.append(UsbEntry.parse(int(m.group(1)), value))
            lines[key] = number
    return PveVm(vmid=vmid, path=path, name=name, usb=tuple(usb), lines=lines)


def parse_mappings(text: str, node: str | None = None) -> dict[str, list[HostDevice]]:
    """``mapping/usb.cfg``: each mapping id and the devices its ``map`` lines name
    for ``node`` (all nodes' when none of its lines is for ``node`` or ``node`` is None)."""
    out: dict[str, list[tuple[str | None, HostDevice]]] = {}
    current: str | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            current = raw.strip().split()[0]
            out.setdefault(current, [])
            continue
        if current is None:
            continue
        key, _, value = raw.strip().partition(" ")
        if key != "map":
            continue
        props = dict(p.partition("=")[::2] for p in value.strip().split(",") if p)
        dev: HostDevice | None = None
        if props.get("path"):
            dev = HostDevice.parse(props["path"])
        elif props.get("id"):
            dev = HostDevice.parse(props["id"])
        if dev is not None:
            out[current].append((props.get("node"), dev))
    result: dict[str, list[HostDevice]] = {}
    for name, maps in out.items():
        mine = [d for n, d in maps if node is not None and n == node]
        result[name] = mine or [d for _, d in maps]
    return result


def claims(vm: PveVm, device: UsbDevice, mappings: dict[str, list[HostDevice]]) -> list[UsbEntry]:
    """The usbN lines of ``vm`` that take ``device`` (directly or through a mapping)."""

    def takes(entry: UsbEntry) -> bool:
        if entry.host is not None:
            return entry.host.matches(device)
        return any(d.matches(device) for d in mappings.get(entry.mapping or "", []))

    return [entry for entry in vm.usb if takes(entry)]


__all__ = [
    "MAPPING_ID",
    "MAX_USB",
    "HostDevice",
    "PveVm",
    "UsbEntry",
    "claims",
    "parse_mappings",
    "parse_vm_conf",
]
