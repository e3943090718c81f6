"""``qm set VMID --usbN ...`` lines, for people who want Proxmox VE itself to hold a device.

Proxmox then passes the device through at every VM start (qemu-server turns a
``usbN`` line into ``-device usb-host,bus=xhci.0,port=N+1,...``), and vmplug
should leave it alone: a device both in a ``usbN`` line and in a vmplug rule
is a doctor finding.

* ``host=VENDOR:PRODUCT`` (the default) follows the device to any port;
  ``host=BUS-PORT`` (``--by-port``) takes whatever is plugged into that port,
  for identical devices -- Proxmox's BUS-PORT is exactly the sysfs port path.
* ``usb3=1`` for SuperSpeed devices (older machine types put them on an xHCI
  only then).
* ``mapping=NAME`` (``--mapping``): a cluster-wide resource mapping, so the
  VM can migrate to a node that has the same device; the mapping is created
  once per cluster with ``pvesh create /cluster/mapping/usb``.
* Each device gets the first ``usbN`` (N < 14) the VM's config does not use
  yet (when the config is readable here).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmplug.engine.proxmox_conf import MAPPING_ID, MAX_USB, PveVm
from vmplug.generate.common import (
    CannotExpress,
    check_passable,
    comment_text,
    device_label,
    is_usb3,
    share_text,
    shared_ids,
)
from vmplug.model import UsbDevice


@dataclass(frozen=True)
class UsbLine:
    key: str  # usbN
    value: str  # host=1235:821a,usb3=1 | mapping=NAME
    label: str


@dataclass(frozen=True)
class ProxmoxPlan:
    vmid: int
    lines: tuple[UsbLine, ...]
    #: (mapping id, its map value) to create first, when --mapping
    mapping: tuple[str, str] | None = None
    notes: tuple[str, ...] = ()

    def commands(self) -> list[list[str]]:
        out: list[list[str]] = []
        if self.mapping is not None:
            name, value = self.mapping
            out.append(["pvesh", "create", "/cluster/mapping/usb", "--id", name, "--map", value])
        for line in self.lines:
            out.append(["qm", "set", str(self.vmid), f"--{line.key}", line.value])
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid,
            "usb": [{"key": x.key, "value": x.value, "device": x.label} for x in self.lines],
            "mapping": ({"id": self.mapping[0], "map": self.mapping[1]} if self.mapping else None),
            "commands": [shlex.join(c) for c in self.commands()],
            "notes": list(self.notes),
        }


def plan_proxmox(
    devices: Sequence[UsbDevice],
    vmid: int,
    *,
    by_port: bool = False,
    mapping: str | None = None,
    node: str | None = None,
    existing: PveVm | None = None,
) -> ProxmoxPlan:
    check_passable(devices)
    if not 100 <= vmid <= 999_999_999:
        raise CannotExpress(f"--vmid {vmid} is not a Proxmox VMID (100 ... 999999999)")
    dup = shared_ids(devices)
    if dup and not by_port:
        raise CannotExpress(
            f"{share_text(devices, dup)}: host=VENDOR:PRODUCT cannot tell them apart "
            "(Proxmox would pass the first one it finds). Use --by-port to take each by its port."
        )
    if mapping is not None:
        if not MAPPING_ID.match(mapping):
            raise CannotExpress(
                f"--mapping {mapping!r}: a mapping id is a letter, then letters, digits, '_' or '-'"
            )
        if len(devices) != 1:
            raise CannotExpress("--mapping names one cluster-wide mapping: give one device")
    used = {e.index for e in existing.usb} if existing is not None else set()
    free = [i for i in range(MAX_USB) if i not in used]
    if len(free) < len(devices):
        raise CannotExpress(
            f"VM {vmid} has {len(used)} of Proxmox's {MAX_USB} usbN slots in use: "
            f"no room for {len(devices)} more"
        )
    notes: list[str] = []
    if existing is not None:
        for dev in devices:
            for entry in existing.usb:
                if entry.host is not None and entry.host.matches(dev):
                    notes.append(
                        f"{existing.path}: {entry.key} already takes {dev.port} "
                        f"({entry.key}: {entry.raw}); the new line would be a second one"
                    )
    lines = []
    map_def: tuple[str, str] | None = None
    for index, dev in zip(free, devices, strict=False):
        usb3 = ",usb3=1" if is_usb3(dev) else ""
        if mapping is not None:
            where = f",path={dev.port}" if by_port else ""
            if not node:
                raise CannotExpress("--mapping needs the node the device is on (--node)")
            here = node
            map_def = (mapping, f"node={here},id={dev.vidpid}{where}")
            value = f"mapping={mapping}{usb3}"
        else:
            value = f"host={dev.port if by_port else dev.vidpid}{usb3}"
        lines.append(UsbLine(key=f"usb{index}", value=value, label=device_label(dev)))
    if any(index >= 5 for index in free[: len(devices)]):
        notes.append(
            "usb5 and up need machine type >= 7.1 and ostype l26 or Windows > 7 "
            "(qemu-server's qemu-xhci)"
        )
    return ProxmoxPlan(vmid=vmid, lines=tuple(lines), mapping=map_def, notes=tuple(notes))


def render(plan: ProxmoxPlan) -> str:
    """A shell snippet: a comment per device, then the commands."""
    out = [
        f"# Proxmox VE holds these devices for VM {plan.vmid} (vmplug generate proxmox);",
        "# leave them out of vmplug's rules, or the two fight over them.",
    ]
    if plan.mapping is not None:
        out.append(
            "# once per cluster (skip it when the mapping exists; add the other nodes' maps):"
        )
        out.append(shlex.join(plan.commands()[0]))
    for line in plan.lines:
        out.append(f"# {line.key}: {comment_text(line.label)}")
        out.append(shlex.join(["qm", "set", str(plan.vmid), f"--{line.key}", line.value]))
    out.extend(f"# note: {comment_text(n)}" for n in plan.notes)
    return "\n".join(out) + "\n"


__all__ = ["ProxmoxPlan", "UsbLine", "plan_proxmox", "render"]
