"""Everything the checks read, each input pointable at a real thing in tests.

The context gathers lazily and once: the sysfs tree, the kernel log, QEMU
processes and their QMP state, containers.  A gathering step that fails
raises inside the check that needed it, which turns it into that check's
finding (see :func:`vmplug.doctor.findings.run_checks`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmplug.model import UsbDevice

if TYPE_CHECKING:
    from vmplug.config import Config
    from vmplug.doctor.container_info import ContainerScan
    from vmplug.doctor.network import NetworkScan
    from vmplug.doctor.qemu_info import QemuInstance


def read_kmsg(path: Path = Path("/dev/kmsg")) -> str:
    """The kernel ring buffer as ``[seconds] message`` lines, from ``/dev/kmsg``.

    Falls back to ``dmesg`` when ``/dev/kmsg`` cannot be read; raises
    :class:`OSError` when neither works (``dmesg_restrict`` and no root).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return _dmesg()
    lines: list[str] = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                raise
            if not rec:
                break
            head, _, msg = rec.decode("utf-8", "replace").partition(";")
            fields = head.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            text = msg.split("\n", 1)[0]
            lines.append(f"[{usec / 1e6:12.6f}] {text}")
    finally:
        os.close(fd)
    return "\n".join(lines)


def _dmesg() -> str:
    exe = shutil.which("dmesg")
    if exe is None:
        raise OSError("cannot read /dev/kmsg and there is no dmesg")
    res = subprocess.run([exe], capture_output=True, text=True, check=False, timeout=10)
    if res.returncode != 0:
        raise OSError(f"dmesg: {res.stderr.strip() or res.returncode}")
    return res.stdout


def _sock_key(path: str) -> tuple[int, int] | str:
    """The socket file's identity: the same socket seen through /proc/PID/root or a
    bind mount has another path but the same inode."""
    try:
        st = Path(path).stat()
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


@dataclass
class DoctorContext:
    """The inputs of one doctor run."""

    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    proc_root: Path = Path("/proc")
    #: returns the kernel log text; None: read /dev/kmsg (or dmesg)
    kernel_log_source: Callable[[], str] | None = None
    config: Config | None = None
    #: vmplug's history database (read-only); None: the config's, when it exists
    store_path: Path | None = None
    device: str | None = None
    vm: str | None = None
    qmp_sockets: list[str] = field(default_factory=list)
    compose_files: list[Path] = field(default_factory=list)
    inspect_files: list[Path] = field(default_factory=list)
    #: Docker/Podman API sockets to try; None: the usual places
    api_sockets: list[str] | None = None
    qga_socket: str | None = None
    selinux_enforce: Path = Path("/sys/fs/selinux/enforce")
    timeout: float = 3.0
    debug: bool = False

    # ------------------------------------------------------------ host

    @cached_property
    def devices(self) -> list[UsbDevice]:
        from vmplug.host.inventory import read_devices  # noqa: PLC0415

        return read_devices(self.sysfs_root)

    @cached_property
    def selected(self) -> list[UsbDevice]:
        """The devices DEVICE names (empty when it names none, or no DEVICE)."""
        if not self.device:
            return []
        from vmplug.host.select import select  # noqa: PLC0415

        return select(self.devices, self.device)

    @cached_property
    def kernel_log(self) -> str:
        if self.kernel_log_source is not None:
            return self.kernel_log_source()
        return read_kmsg()

    @cached_property
    def history(self) -> Any:
        """A read-only :class:`vmplug.history.store.Store`, or None when there is no database."""
        path = self.store_path
        if path is None and self.config is not None:
            path = Path(self.config.daemon.database)
        if path is None or not path.exists():
            return None
        from vmplug.history.store import Store  # noqa: PLC0415

        return Store(path, readonly=True)

    # ------------------------------------------------------------ qemu

    @cached_property
    def qemus(self) -> list[QemuInstance]:
        """QEMU processes from /proc plus VMs known only by a QMP socket; QMP queried."""
        from vmplug.doctor.qemu_info import QemuInstance, find_processes, query_qmp  # noqa: PLC0415

        found = find_processes(self.proc_root)
        by_key = {_sock_key(p): inst for inst in found for p in inst.qmp_paths}
        sockets: list[tuple[str, str, str]] = [(s, f"--qmp {s}", s) for s in self.qmp_sockets]
        for vm in self.config.vms.values() if self.config is not None else ():
            if vm.kind == "qmp" and vm.qmp and not vm.is_tcp:
                sockets.append((vm.name, f"config [vm.{vm.name}]", vm.qmp))
            elif vm.kind == "proxmox":
                from vmplug.vms.proxmox import socket_path  # noqa: PLC0415

                path = str(socket_path(int(vm.proxmox or 0)))
                sockets.append((vm.name, f"config [vm.{vm.name}] proxmox = {vm.proxmox}", path))
        sockets += self._container_sockets()
        for name, source, sock in sockets:
            key = _sock_key(sock)
            inst = by_key.get(key)
            if inst is not None:  # a process we saw: name it after the config or container
                if not source.startswith("--qmp"):
                    inst.name = name
                continue
            inst = QemuInstance(name=name, source=source, qmp_paths=[sock])
            by_key[key] = inst
            found.append(inst)
        if self.vm is not None:
            found = [q for q in found if q.name == self.vm]
        for inst in found:
            query_qmp(inst, self.timeout)
        return found

    def _container_sockets(self) -> list[tuple[str, str, str]]:
        """QMP sockets of containers (dockurr/windows) that exist on this host."""
        from vmplug.doctor.container_info import host_path, qmp_socket  # noqa: PLC0415

        try:
            scan = self.containers
        except Exception:
            return []
        names = {
            vm.container: vm.name
            for vm in (self.config.vms.values() if self.config is not None else ())
            if vm.container
        }
        out = []
        for spec in scan.containers:
            found = qmp_socket(spec)
            host = host_path(spec, found[1]) if found else None
            if host and Path(host).exists():
                name = names.get(spec.name, spec.name)
                out.append((name, f"container {spec.name} ({spec.source})", host))
        return out

    def config_api_sockets(self) -> list[str]:
        """Docker/Podman sockets named by container VMs in the config (``uri``)."""
        out: list[str] = []
        for vm in self.config.vms.values() if self.config is not None else ():
            if vm.container and vm.uri and vm.uri.startswith("unix://"):
                out.append(vm.uri[len("unix://") :])
        return out

    # ------------------------------------------------------------ network

    @cached_property
    def network(self) -> NetworkScan:
        """Remote links: certificates, each endpoint probed, QEMU's chardevs."""
        from vmplug.doctor.network import gather  # noqa: PLC0415

        return gather(self)

    # ------------------------------------------------------------ targets

    @cached_property
    def targets(self) -> list[UsbDevice]:
        """Devices meant for a VM: DEVICE; else what config rules attach or a usb-host takes."""
        if self.device:
            return list(self.selected)
        out: list[UsbDevice] = []
        for dev in self.devices:
            if dev.is_root_hub or dev.is_hub:
                continue
            rc = self.config.decide(dev) if self.config is not None else None
            if (rc is not None and not rc.block) or self._taken_by_qemu(dev):
                out.append(dev)
        return out

    def _taken_by_qemu(self, dev: UsbDevice) -> bool:
        try:
            qemus = self.qemus
        except Exception:
            return False
        return any(h.matches(dev) for q in qemus for h in q.hosts())

    # ------------------------------------------------------------ containers

    @cached_property
    def containers(self) -> ContainerScan:
        from vmplug.doctor.container_info import gather_containers  # noqa: PLC0415
        from vmplug.wire.engine import candidates  # noqa: PLC0415

        if self.api_sockets is not None:
            sockets = list(self.api_sockets)
        else:
            sockets = list(dict.fromkeys([*self.config_api_sockets(), *candidates()]))
        return gather_containers(
            inspect_files=self.inspect_files,
            compose_files=self.compose_files,
            sockets=sockets,
            timeout=self.timeout,
        )

    def close(self) -> None:
        hist = self.__dict__.get("history")
        if hist is not None:
            with contextlib.suppress(Exception):
                hist.close()
