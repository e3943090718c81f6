"""What the daemon rigs share: real QEMU VMs with a second QMP socket each,
and a view of what QEMU really holds, read through that socket.

:class:`tests.qemu.test_daemon.Rig` and :class:`tests.support.apirig.ApiRig`
build on it; :meth:`QemuRig.close_vms` stops the observers and every QEMU
(by PID, through :class:`tests.support.qemu_proc.QemuProcess`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.support.qemu_proc import QemuProcess
from vmplug.vms.qmp import QmpVm


class QemuRig:
    """VMs by name, made on first use; one short socket directory for all."""

    def __init__(self, tmp: Path, sock_prefix: str) -> None:
        self.tmp = tmp
        self.qemus: dict[str, QemuProcess] = {}
        self.observers: dict[str, QmpVm] = {}
        # one short directory for every socket: a VM made again keeps its paths
        self.sock_dir = Path(tempfile.mkdtemp(prefix=sock_prefix, dir="/tmp"))
        self.config_path = tmp / "vmplug.toml"

    def qemu(self, name: str, usb: bool = True) -> QemuProcess:
        """QEMU ``name``; ``usb=False``: no USB controller, so every attach fails."""
        if name not in self.qemus:
            self.qemus[name] = QemuProcess(
                self.tmp,
                ["-device", "qemu-xhci,id=xhci"] if usb else [],
                qmp_sockets=2,
                name=name,
                sock_dir=self.sock_dir,
            )
        return self.qemus[name]

    def vm_tables(self, vms: tuple[str, ...]) -> str:
        """``[vm.NAME]`` tables pointing at each VM's first QMP socket."""
        return "".join(f'[vm.{n}]\nqmp = "{self.qemu(n).qmp_paths[0]}"\n\n' for n in vms)

    async def held(self, vm: str) -> dict[str, Any]:
        """What QEMU really holds, read through the test's own QMP socket."""
        q = self.qemus[vm]
        if not q.alive:
            return {}
        if vm not in self.observers:
            self.observers[vm] = QmpVm(f"obs-{vm}", str(q.qmp_paths[1]), shared=True)
            await self.observers[vm].start()
        try:
            return dict(await self.observers[vm].observe())
        except Exception:
            return {}

    async def ports(self, vm: str) -> set[str]:
        """The host ports of the usb-host devices VM ``vm`` holds."""
        return {f"{o.hostbus}-{o.hostport}" for o in (await self.held(vm)).values()}

    async def close_vms(self) -> None:
        """Stop the observers and every QEMU, then remove the socket directory."""
        for obs in self.observers.values():
            await obs.stop()
        for q in self.qemus.values():
            q.cleanup()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
