"""Find the VMs on this host: what ``vmplug vms`` lists and ``vmplug init`` offers.

Where VMs are found:

* the config's ``[vm.NAME]`` tables;
* libvirt domains (``qemu:///system``, the URIs of libvirt VMs in the config,
  ``--libvirt-uri``);
* QEMU containers through the Docker or Podman API socket (dockurr/windows
  and other images), with the host path of their QMP socket;
* Proxmox VE sockets, ``/var/run/qemu-server/VMID.qmp``;
* ``qemu-system-*`` processes with a unix QMP socket on their command line
  (``-qmp``, or ``-chardev socket`` + ``-mon mode=control``); processes
  libvirt runs are shown as its domains instead.

Every QMP socket is reached per operation and let go at once (it serves one
client at a time): ``query-status``, the USB buses from QOM and the
``usb-host`` devices.  A socket another client holds shows as ``busy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.config import VmConfig

DEFAULT_LIBVIRT_URI = "qemu:///system"


@dataclass
class FoundVm:
    """One VM as discovery saw it."""

    name: str
    kind: str  # qmp | libvirt | container | proxmox
    where: str  # /path/qmp.sock | tcp:H:P | libvirt:DOM | container:NAME | proxmox:VMID
    source: str  # config | libvirt | container | proxmox | process
    state: str = "unknown"
    usb_buses: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    config_name: str | None = None
    pids: list[int] = field(default_factory=list)
    uri: str | None = None  # libvirt URI, container API socket
    qmp: str | None = None  # the QMP socket on the host, when there is one
    problem: str | None = None
    sockets: list[str] = field(default_factory=list)  # a process's unix QMP sockets

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "where": self.where,
            "source": self.source,
            "state": self.state,
            "usb_buses": self.usb_buses,
            "devices": self.devices,
            "config": self.config_name,
            "pids": self.pids,
            "uri": self.uri,
            "qmp": self.qmp,
            "problem": self.problem,
        }

    def vm_table(self) -> dict[str, Any]:
        """The ``[vm.NAME]`` keys that reach this VM."""
        if self.kind == "libvirt":
            table: dict[str, Any] = {"libvirt": self.where.removeprefix("libvirt:")}
            if self.uri and self.uri != DEFAULT_LIBVIRT_URI:
                table["uri"] = self.uri
            return table
        if self.kind == "container":
            table = {"container": self.where.removeprefix("container:")}
            if self.uri:
                table["uri"] = self.uri if self.uri.startswith("unix://") else f"unix://{self.uri}"
            return table
        if self.kind == "proxmox":
            return {"proxmox": int(self.where.removeprefix("proxmox:"))}
        return {"qmp": self.where}


# ---------------------------------------------------------------------------
# probing one QMP socket


async def probe_qmp(vm: FoundVm, address: str, timeout: float) -> None:
    """State, USB buses and usb-host devices of the QEMU at ``address``, one
    short connection per question."""
    from vmplug.vms.base import VmError  # noqa: PLC0415
    from vmplug.vms.qmp import QmpVm  # noqa: PLC0415

    qmp = QmpVm(vm.name, address, shared=True, connect_timeout=timeout, command_timeout=timeout)
    vm.qmp = address
    try:
        state = await qmp.status()
        vm.state = state.value
        buses = await qmp.usb_bus_info()
        vm.usb_buses = [b.describe() for b in buses]
        held = await qmp.observe_all()
        vm.devices = [_device_json(d) for d in held.values()]
    except VmError as exc:
        cause = exc.__cause__
        if isinstance(cause, TimeoutError):
            vm.state = "busy"
            vm.problem = (
                "another client holds the QMP socket (it serves one at a time): "
                "a running vmplug daemon, Proxmox's qm, libvirt..."
            )
        elif vm.state in ("unknown", "disconnected"):
            vm.state = "unreachable"
            vm.problem = str(exc)
        else:
            vm.problem = str(exc)
    finally:
        await qmp.stop()


def _device_json(obs: Any) -> dict[str, Any]:
    data: dict[str, Any] = obs.to_json()
    return {
        k: data[k] for k in ("id", "managed", "attached", "hostbus", "hostport", "hostaddr")
    } | {"vidpid": _vidpid(data.get("vendorid"), data.get("productid"))}


def _vidpid(vendor: object, product: object) -> str | None:
    if vendor is None or product is None:
        return None
    return f"{vendor}:{product}"


# ---------------------------------------------------------------------------
# sources


def scan_processes(proc_root: Path = Path("/proc")) -> list[FoundVm]:
    """``qemu-system-*`` processes with a unix QMP socket on their command line
    (:func:`vmplug.wire.proc.scan_qemu`)."""
    from vmplug.vms.container import IMAGE_MONITOR  # noqa: PLC0415
    from vmplug.wire.proc import scan_qemu  # noqa: PLC0415

    found: list[FoundVm] = []
    for proc in scan_qemu(proc_root):
        if proc.args.libvirt_managed:
            continue  # libvirt's monitor is libvirt's: the domain is listed from libvirt
        # a QEMU in a container names paths of its own mount namespace: reach
        # them through /proc/PID/root (the same socket file, whatever the mounts)
        reached = (proc.reach(p) for p in proc.args.qmp_paths if p != IMAGE_MONITOR)
        sockets = [p for p in reached if p is not None]
        vm = FoundVm(
            name=proc.args.name or f"qemu-{proc.pid}",
            kind="qmp",
            where=sockets[0] if sockets else "",
            source="process",
            pids=[proc.pid],
            sockets=sockets,
        )
        if not sockets:
            vm.state = "no-qmp"
            vm.problem = (
                "no unix QMP socket on its command line: add "
                "-qmp unix:/run/vmplug/NAME.sock,server=on,wait=off"
            )
        found.append(vm)
    return found


async def scan_libvirt(uri: str, timeout: float) -> tuple[list[FoundVm], str | None]:
    """Every domain of libvirt at ``uri`` (running or not); or why none."""
    try:
        import libvirt  # noqa: PLC0415
    except ImportError:
        return [], "libvirt-python is not installed (pip install 'vmplug[libvirt]')"
    from vmplug.vms.libvirt import usb_controllers, usb_hostdevs  # noqa: PLC0415

    libvirt.registerErrorHandler(lambda _c, _e: None, None)

    def scan() -> list[FoundVm]:
        conn = libvirt.open(uri)
        try:
            out = []
            for dom in conn.listAllDomains(0):
                state = dom.state()[0]
                xml = dom.XMLDesc(0)
                out.append(
                    FoundVm(
                        name=dom.name(),
                        kind="libvirt",
                        where=f"libvirt:{dom.name()}",
                        source="libvirt",
                        state=_LIBVIRT_STATES.get(state, "unknown"),
                        usb_buses=usb_controllers(xml),
                        devices=[
                            {
                                "id": hd.dev_id,
                                "managed": hd.dev_id.startswith("vmplug-"),
                                "attached": True,
                                "hostbus": hd.bus,
                                "hostport": None,
                                "hostaddr": hd.device,
                                "vidpid": None
                                if hd.vendor is None or hd.product is None
                                else f"{hd.vendor:04x}:{hd.product:04x}",
                            }
                            for hd in usb_hostdevs(xml)
                        ],
                        uri=uri,
                    )
                )
            return out
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    try:
        return await asyncio.wait_for(asyncio.to_thread(scan), timeout * 3), None
    except libvirt.libvirtError as exc:
        return [], f"libvirt at {uri}: {exc}"
    except TimeoutError:
        return [], f"libvirt at {uri}: no answer within {timeout * 3:g} s"


_LIBVIRT_STATES = {
    0: "unknown",
    1: "running",
    2: "running",  # blocked
    3: "paused",
    4: "shutting-down",
    5: "shut-off",
    6: "crashed",
    7: "suspended",
}


@dataclass
class ContainerDocs:
    """What one Docker/Podman API said: every container's inspect document."""

    #: the API socket that answered (None: no Docker or Podman here)
    address: str | None = None
    #: ``GET /containers/{id}/json`` of each container, running or not
    docs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


async def scan_containers(socket: str | None, timeout: float | None = None) -> ContainerDocs:
    """Every container (``all=1``: a QEMU that did not start is one to look at)
    the Docker/Podman API at ``socket`` knows, inspected: for ``vmplug vms`` and
    the doctor's container layer alike.  ``socket`` None: the first usual one;
    ``timeout`` per API call (None: the container backend's, for a slow engine)."""
    from vmplug.vms.container import API_TIMEOUT, find_api  # noqa: PLC0415
    from vmplug.wire.errors import EngineError  # noqa: PLC0415

    api = await find_api(socket, API_TIMEOUT if timeout is None else timeout)
    if api is None:
        return ContainerDocs()  # no Docker or Podman here: nothing to say
    out = ContainerDocs(address=api.address)
    try:
        for item in await api.containers():
            doc = await api.inspect(str(item.get("Id", "")))
            if doc is not None:
                out.docs.append(doc)
    except EngineError as exc:
        out.docs, out.error = [], str(exc)
    return out


def container_vms(scan: ContainerDocs, socket: str | None) -> list[FoundVm]:
    """The QEMU containers among ``scan``'s, with their QMP socket on the host."""
    from vmplug.vms.container import read_container  # noqa: PLC0415

    out = []
    for doc in scan.docs:
        found = read_container(doc)
        if not found.is_qemu:
            continue
        vm = FoundVm(
            name=found.name,
            kind="container",
            where=f"container:{found.name}",
            source="container",
            state="running" if found.running else "stopped",
            uri=scan.address if socket else None,
            problem=found.problem,
        )
        if found.socket is not None:
            vm.qmp = found.socket
        out.append(vm)
    return out


def scan_proxmox(run_dir: Path) -> list[FoundVm]:
    """Running Proxmox VMs (their QMP sockets), named as their VMID.conf names them
    (``pveVMID`` when it has no name vmplug's config can take)."""
    from vmplug.vms.proxmox import list_vmids, socket_path  # noqa: PLC0415
    from vmplug.vms.proxmox_conf import vm_names  # noqa: PLC0415

    names = {k: v for k, v in vm_names().items() if _PVE_NAME.fullmatch(v)}
    return [
        FoundVm(
            name=names.get(vmid, f"pve{vmid}"),
            kind="proxmox",
            where=f"proxmox:{vmid}",
            source="proxmox",
            qmp=str(socket_path(vmid, run_dir)),
        )
        for vmid in list_vmids(run_dir)
    ]


#: What vmplug's config takes as a VM name (config.py's rule).
_PVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def from_config(vms: Iterable[VmConfig]) -> list[FoundVm]:
    out = []
    for vmc in vms:
        kind = vmc.kind
        vm = FoundVm(
            name=vmc.name,
            kind=kind,
            where=vmc.where,
            source="config",
            config_name=vmc.name,
            uri=vmc.uri if kind != "libvirt" else (vmc.uri or DEFAULT_LIBVIRT_URI),
        )
        if kind == "qmp":
            vm.qmp = vmc.qmp
        elif kind == "proxmox" and vmc.proxmox is not None:
            from vmplug.vms.proxmox import socket_path  # noqa: PLC0415

            vm.qmp = str(socket_path(vmc.proxmox))
        out.append(vm)
    return out


# ---------------------------------------------------------------------------
# all together


@dataclass
class Discovery:
    vms: list[FoundVm]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"vms": [v.to_json() for v in self.vms], "notes": self.notes}


def _socket_id(path: str) -> tuple[int, int] | str | None:
    """The socket file itself (device, inode): the same whatever path leads to it
    (a container's bind mount, /proc/PID/root, a symlink); its real path when it
    cannot be stat'ed."""
    try:
        st = os.stat(path)  # noqa: PTH116
    except OSError:
        return os.path.realpath(path) if path.startswith("/") else None
    return (st.st_dev, st.st_ino)


def _key(vm: FoundVm) -> tuple[str, str]:
    if vm.kind == "libvirt":
        return ("libvirt", f"{vm.uri or DEFAULT_LIBVIRT_URI}|{vm.where}")
    if vm.kind == "container":
        return ("container", vm.where)
    if vm.qmp:
        return ("qmp", os.path.realpath(vm.qmp) if vm.qmp.startswith("/") else vm.qmp)
    return ("pid", ",".join(map(str, vm.pids)) or vm.name)


async def discover(
    config_vms: Sequence[VmConfig] = (),
    *,
    libvirt_uris: Sequence[str] = (DEFAULT_LIBVIRT_URI,),
    docker_socket: str | None = None,
    proxmox_run: Path | None = None,
    processes: bool = True,
    patterns: Sequence[str] = (),
    timeout: float = 2.0,
) -> Discovery:
    """Every VM found, merged (a config VM that is also a process is one row),
    then probed over QMP where a socket is known."""
    from vmplug.vms.proxmox import run_dir  # noqa: PLC0415

    notes: list[str] = []
    rows: list[FoundVm] = from_config(config_vms)
    uris = list(dict.fromkeys([*libvirt_uris, *(v.uri for v in rows if v.kind == "libvirt")]))
    lv_results = await asyncio.gather(*(scan_libvirt(u, timeout) for u in uris if u))
    for (found, note), uri in zip(lv_results, uris, strict=False):
        rows.extend(found)
        if note and (uri != DEFAULT_LIBVIRT_URI or Path("/run/libvirt/libvirt-sock").exists()):
            notes.append(note)
    scan = await scan_containers(docker_socket)
    containers, note = container_vms(scan, docker_socket), scan.error
    rows.extend(containers)
    if note:
        notes.append(note)
    rows.extend(scan_proxmox(proxmox_run or run_dir()))
    if processes:
        rows.extend(scan_processes())

    merged: dict[tuple[str, str], FoundVm] = {}
    for vm in rows:
        if vm.source == "process":
            continue
        key = _key(vm)
        have = merged.get(key)
        if have is None:
            merged[key] = vm
            continue
        # the config's row keeps its name; it learns what the scan saw
        have.state = vm.state if vm.state != "unknown" else have.state
        have.usb_buses = have.usb_buses or vm.usb_buses
        have.devices = have.devices or vm.devices
        have.problem = have.problem or vm.problem
        have.qmp = have.qmp or vm.qmp
    vms = list(merged.values())
    # a config's container VM the scan did not see (another API socket): ask for it
    for vm in vms:
        if vm.kind == "container" and vm.qmp is None and vm.source == "config":
            from vmplug.vms.container import ContainerError, DockerApiError, locate  # noqa: PLC0415

            try:
                located = await locate(vm.where.removeprefix("container:"), vm.uri or docker_socket)
                vm.qmp = located.socket
            except (ContainerError, DockerApiError) as exc:
                vm.state = "unreachable"
                vm.problem = str(exc)
    # a QEMU process behind a config, container or Proxmox VM: the same row
    by_socket = {_socket_id(v.qmp): v for v in vms if v.qmp and v.qmp.startswith("/")}
    by_socket.pop(None, None)
    for proc in (v for v in rows if v.source == "process"):
        owner = next((by_socket[r] for r in map(_socket_id, proc.sockets) if r in by_socket), None)
        if owner is not None:
            owner.pids = sorted(set(owner.pids) | set(proc.pids))
            owner.sockets = list(dict.fromkeys([*owner.sockets, *proc.sockets]))
            continue
        proc.qmp = proc.where or None
        vms.append(proc)
    if patterns:
        vms = [v for v in vms if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    await asyncio.gather(
        *(
            _probe_first_free(vm, timeout)
            for vm in vms
            if vm.qmp and vm.kind != "libvirt" and vm.state not in ("stopped", "no-qmp")
        )
    )
    return Discovery(vms, notes)


async def _probe_first_free(vm: FoundVm, timeout: float) -> None:
    """Probe the VM's QMP socket; a process with several tries the next while
    one is busy (a running vmplug daemon holds its own)."""
    candidates = [vm.qmp or "", *(s for s in vm.sockets if s != vm.qmp)]
    for address in candidates:
        vm.state, vm.problem = "unknown", None
        await probe_qmp(vm, address, timeout)
        if vm.state != "busy":
            return


__all__ = [
    "DEFAULT_LIBVIRT_URI",
    "ContainerDocs",
    "Discovery",
    "FoundVm",
    "container_vms",
    "discover",
    "from_config",
    "probe_qmp",
    "scan_containers",
    "scan_libvirt",
    "scan_processes",
    "scan_proxmox",
]
