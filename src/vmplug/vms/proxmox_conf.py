"""Proxmox VE's own VM configs: ``/etc/pve/qemu-server/VMID.conf`` (qm.conf(5)).

What vmplug reads from them:

* ``name:`` -- the VM's name, so ``vmplug vms`` and ``init`` call VM 101 what
  Proxmox calls it;
* ``usbN:`` (``usb0`` ... ``usb13``) -- the USB devices Proxmox itself passes
  through when the VM starts: ``[host=]HOSTUSBDEVICE`` or ``mapping=NAME``,
  and ``usb3=1``.  HOSTUSBDEVICE is ``VENDOR:PRODUCT`` (hex, each optionally
  ``0x``-prefixed), ``BUS-PORT(.PORT)*`` (decimal) or ``spice`` -- the forms
  qemu-server's ``parse_usb_device`` accepts.  A ``mapping=`` names a
  cluster-wide resource mapping in ``/etc/pve/mapping/usb.cfg``, whose
  section for NAME has ``map id=VENDOR:PRODUCT,node=NODE[,path=BUS-PORT]``
  lines, one per cluster node.

The file is ``key: value`` lines; ``#`` lines at the top are the VM's
description; the current config ends at the first ``[SECTION]`` line
(snapshots, ``[PENDING]``), which vmplug does not read.  The config
directory is ``VMPLUG_PROXMOX_ETC`` when set (tests, a copy of /etc/pve).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from vmplug.engine.proxmox_conf import (
    MAPPING_ID,
    MAX_USB,
    HostDevice,
    PveVm,
    UsbEntry,
    claims,
    parse_mappings,
    parse_vm_conf,
)

DEFAULT_ETC_DIR = "/etc/pve/qemu-server"
DEFAULT_MAPPING_FILE = "/etc/pve/mapping/usb.cfg"


def etc_dir() -> Path:
    """``/etc/pve/qemu-server``, or ``VMPLUG_PROXMOX_ETC``."""
    return Path(os.environ.get("VMPLUG_PROXMOX_ETC") or DEFAULT_ETC_DIR)


def node_name() -> str:
    """This Proxmox node's name: ``VMPLUG_PROXMOX_NODE``, else the short host name."""
    return os.environ.get("VMPLUG_PROXMOX_NODE") or socket.gethostname().split(".")[0]


def mapping_file(etc: Path | None = None) -> Path:
    """``/etc/pve/mapping/usb.cfg`` beside the given qemu-server directory."""
    base = etc if etc is not None else etc_dir()
    if base == Path(DEFAULT_ETC_DIR):
        return Path(DEFAULT_MAPPING_FILE)
    return base.parent / "mapping" / "usb.cfg"


def read_vm_confs(etc: Path | None = None) -> list[PveVm]:
    """Every ``VMID.conf`` in the qemu-server directory (unreadable ones left out)."""
    base = etc if etc is not None else etc_dir()
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    out = []
    for path in entries:
        stem, dot, ext = path.name.partition(".")
        if not (dot and ext == "conf" and stem.isdigit()):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        out.append(parse_vm_conf(text, int(stem), str(path)))
    return sorted(out, key=lambda vm: vm.vmid)


def vm_names(etc: Path | None = None) -> dict[int, str]:
    """VMID -> the ``name:`` of its config."""
    return {vm.vmid: vm.name for vm in read_vm_confs(etc) if vm.name}


def read_mappings(path: Path | None = None) -> dict[str, list[HostDevice]]:
    """The cluster's USB resource mappings for this node (empty when there is no file)."""
    try:
        text = (path or mapping_file()).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return parse_mappings(text, node_name())


__all__ = [
    "DEFAULT_ETC_DIR",
    "MAPPING_ID",
    "MAX_USB",
    "HostDevice",
    "PveVm",
    "UsbEntry",
    "claims",
    "etc_dir",
    "mapping_file",
    "node_name",
    "parse_mappings",
    "parse_vm_conf",
    "read_mappings",
    "read_vm_confs",
    "vm_names",
]
