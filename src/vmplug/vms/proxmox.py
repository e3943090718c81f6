"""Proxmox VE VMs: the QMP socket ``qemu-server`` gives every VM.

Proxmox starts each VM with ``-qmp unix:/var/run/qemu-server/VMID.qmp`` and
its own tools (``qm``, ``pvestatd`` every few seconds, backups, migration)
talk to QEMU through that same socket.  A QMP socket serves one client at a
time, so vmplug connects per operation and lets go at once
(:class:`~vmplug.vms.qmp.QmpVm` with ``shared=True``): between operations it
holds no connection, and while idle it only ``stat``s the socket, with a
brief probe every ``shared_probe_interval`` seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmplug.vms.base import OnVmEvent
from vmplug.vms.qmp import QmpVm

#: Where qemu-server puts its sockets; VMPLUG_PROXMOX_RUN overrides it (tests, chroots).
DEFAULT_RUN_DIR = "/var/run/qemu-server"


def run_dir() -> Path:
    return Path(os.environ.get("VMPLUG_PROXMOX_RUN") or DEFAULT_RUN_DIR)


def socket_path(vmid: int, root: Path | None = None) -> Path:
    """``/var/run/qemu-server/VMID.qmp``."""
    return (root if root is not None else run_dir()) / f"{vmid}.qmp"


def list_vmids(root: Path | None = None) -> list[int]:
    """VMIDs that have a QMP socket in the run directory (running VMs)."""
    base = root if root is not None else run_dir()
    try:
        names = [p.name for p in base.iterdir()]
    except OSError:
        return []
    found = []
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "qmp" and stem.isdigit():
            found.append(int(stem))
    return sorted(found)


class ProxmoxVm(QmpVm):
    """A Proxmox VE VM by VMID: always a shared, per-operation QMP socket."""

    def __init__(
        self,
        name: str,
        vmid: int,
        *,
        usb_bus: str | None = None,
        add_controller: bool = False,
        on_change: OnVmEvent | None = None,
        root: Path | None = None,
        shared_probe_interval: float = 10.0,
    ) -> None:
        self.vmid = vmid
        super().__init__(
            name,
            str(socket_path(vmid, root)),
            shared=True,
            usb_bus=usb_bus,
            add_controller=add_controller,
            on_change=on_change,
            shared_probe_interval=shared_probe_interval,
        )

    def __repr__(self) -> str:
        return f"<ProxmoxVm {self.name} vmid={self.vmid} {self.state.value}>"


__all__ = ["DEFAULT_RUN_DIR", "ProxmoxVm", "list_vmids", "run_dir", "socket_path"]
