"""Find the VMs on this host (``vmplug vms``) and write a first config (``vmplug init``).

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
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from vmplug.cli.app import EPILOG_ENV, Context, cli, emit_json, escape, pass_ctx
from vmplug.config import VmConfig, config_path, load_config, parse_config
from vmplug.errors import UsageError, VmplugError
from vmplug.model import UsbDevice

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


async def scan_containers(socket: str | None, timeout: float) -> tuple[list[FoundVm], str | None]:
    """QEMU containers the Docker/Podman API knows, with their QMP socket on the host."""
    from vmplug.vms.container import find_api, read_container  # noqa: PLC0415
    from vmplug.wire.errors import EngineError  # noqa: PLC0415

    api = await find_api(socket)
    if api is None:
        return [], None  # no Docker or Podman here: nothing to say
    try:
        listing = await api.containers()
        docs = [await api.inspect(str(c.get("Id", ""))) for c in listing]
    except EngineError as exc:
        return [], str(exc)
    out = []
    for doc in docs:
        if doc is None:
            continue
        found = read_container(doc)
        if not found.is_qemu:
            continue
        vm = FoundVm(
            name=found.name,
            kind="container",
            where=f"container:{found.name}",
            source="container",
            state="running" if found.running else "stopped",
            uri=api.address if socket else None,
            problem=found.problem,
        )
        if found.socket is not None:
            vm.qmp = found.socket
        out.append(vm)
    return out, None


def scan_proxmox(run_dir: Path) -> list[FoundVm]:
    from vmplug.vms.proxmox import list_vmids, socket_path  # noqa: PLC0415

    return [
        FoundVm(
            name=f"pve{vmid}",
            kind="proxmox",
            where=f"proxmox:{vmid}",
            source="proxmox",
            qmp=str(socket_path(vmid, run_dir)),
        )
        for vmid in list_vmids(run_dir)
    ]


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
    containers, note = await scan_containers(docker_socket, timeout)
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


# ---------------------------------------------------------------------------
# vmplug vms


def _load_config_vms(obj: Context, *, quiet_missing: bool) -> list[VmConfig]:
    path = config_path(obj.config)
    if quiet_missing and obj.config is None and not path.exists():
        return []
    return list(load_config(path).vms.values())


_DISCOVERY_OPTIONS = [
    click.option(
        "--libvirt-uri",
        "libvirt_uris",
        multiple=True,
        metavar="URI",
        envvar="VMPLUG_LIBVIRT_URI",
        help=f"libvirt to ask for domains (repeatable; default {DEFAULT_LIBVIRT_URI}).",
    ),
    click.option(
        "--docker-socket",
        metavar="PATH",
        help="Docker or Podman API socket (default: DOCKER_HOST, /var/run/docker.sock, "
        "/run/podman/podman.sock, $XDG_RUNTIME_DIR/podman/podman.sock).",
    ),
    click.option(
        "--proxmox-run",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="VMPLUG_PROXMOX_RUN",
        help="Where Proxmox's QMP sockets are (default /var/run/qemu-server).",
    ),
    click.option("--no-processes", is_flag=True, help="Do not look for QEMU processes in /proc."),
    click.option(
        "--timeout",
        type=click.FloatRange(0.1, 60),
        default=2.0,
        show_default=True,
        help="Seconds to wait for each QMP socket or libvirt.",
    ),
]


def _discovery_options(fn: Any) -> Any:
    for option in reversed(_DISCOVERY_OPTIONS):
        fn = option(fn)
    return fn


def _run_discovery(
    obj: Context,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
) -> Discovery:
    config_vms = _load_config_vms(obj, quiet_missing=True)
    return asyncio.run(
        discover(
            config_vms,
            libvirt_uris=libvirt_uris or (DEFAULT_LIBVIRT_URI,),
            docker_socket=docker_socket,
            proxmox_run=proxmox_run,
            processes=not no_processes,
            patterns=patterns,
            timeout=timeout,
        )
    )


@cli.command("vms", epilog=EPILOG_ENV)
@click.argument("patterns", nargs=-1, metavar="[PATTERN]...")
@_discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
def vms(
    obj: Context,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """List the VMs on this host: config, libvirt, containers, Proxmox, processes.

    PATTERNs (shell globs, e.g. 'win*') keep only the VMs whose name
    matches one; only those are asked anything.  For each VM: where vmplug reaches
    it (a QMP socket, libvirt:DOMAIN, container:NAME, proxmox:VMID), its
    state, its USB buses and the usb-host devices it holds (vmplug's are
    marked *).  QMP sockets are reached one short connection at a time; a
    socket another client holds shows as busy.

    \b
    Examples:
      vmplug vms
      vmplug vms 'win*' --json
      vmplug vms --libvirt-uri qemu:///session --no-processes

    Exit status: 0 (also when none is found), 2 bad input.
    """
    found = _run_discovery(
        obj, patterns, libvirt_uris, docker_socket, proxmox_run, no_processes, timeout
    )
    if as_json:
        emit_json(found.to_json())
        return
    for note in found.notes:
        click.echo(f"note: {note}", err=True)
    if not found.vms:
        click.echo("no VMs found", err=True)
        return
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "KIND", "WHERE", "STATE", "USB BUS", "DEVICES", "CONFIG"):
        table.add_column(col, overflow="fold")
    for vm in found.vms:
        devices = (
            " ".join(
                ("*" if d["managed"] else "")
                + (
                    f"{d['hostbus']}-{d['hostport']}"
                    if d.get("hostport")
                    else f"{d['hostbus']}/{d['hostaddr']}"
                    if d.get("hostaddr")
                    else str(d.get("vidpid") or d["id"])
                )
                for d in vm.devices
            )
            or "-"
        )
        state = vm.state + (f" ({vm.problem})" if vm.problem else "")
        table.add_row(
            escape(vm.name),
            vm.kind,
            escape(vm.where or "-"),
            escape(state),
            escape(", ".join(vm.usb_buses) or "-"),
            escape(devices),
            escape(vm.config_name or "-"),
        )
    obj.console.print(table)


# ---------------------------------------------------------------------------
# vmplug init


def parse_where(
    where: str, *, libvirt_uri: str | None, docker_socket: str | None
) -> FoundVm | None:
    """``--vm NAME=WHERE``: a QMP path, tcp:H:P, libvirt:DOM, container:NAME,
    proxmox:VMID (None: not one of those forms)."""
    if where.startswith("libvirt:"):
        return FoundVm("", "libvirt", where, "flag", uri=libvirt_uri)
    if where.startswith("container:"):
        return FoundVm("", "container", where, "flag", uri=docker_socket)
    if where.startswith("proxmox:"):
        if not where[8:].isdigit():
            raise UsageError(f"--vm: {where!r}: proxmox:VMID takes a number")
        return FoundVm("", "proxmox", where, "flag")
    if where.startswith("qmp:"):
        where = where[4:]
    if where.startswith(("/", "tcp:", "unix:")):
        return FoundVm("", "qmp", where.removeprefix("unix:"), "flag")
    return None


def render_config(vms: Sequence[tuple[str, FoundVm]], rules: Sequence[tuple[str, str, str]]) -> str:
    """TOML for the chosen VMs and ``(vm, rule text, label)`` rules."""
    import tomlkit  # noqa: PLC0415

    doc = tomlkit.document()
    doc.add(tomlkit.comment("vmplug configuration, first written by `vmplug init`."))
    doc.add(tomlkit.comment("Check it with `vmplug check-config`; rules: first match wins."))
    doc.add(tomlkit.nl())
    vm_super = tomlkit.table(is_super_table=True)
    for name, vm in vms:
        table = tomlkit.table()
        for key, value in vm.vm_table().items():
            table.add(key, value)
        if vm.source != "flag":
            table.comment(f"found: {vm.source}" + (f", {vm.state}" if vm.state else ""))
        vm_super.add(name, table)
    doc.add("vm", vm_super)
    if rules:
        aot = tomlkit.aot()
        for vm_name, text, label in rules:
            rule = tomlkit.table()
            rule.add("attach", vm_name)
            rule.add("match", tomlkit.string(text, literal="'" not in text))
            rule["match"].comment(label)
            aot.append(rule)
        doc.add("rule", aot)
    return tomlkit.dumps(doc)


def rule_for(dev: UsbDevice, *, by_port: bool) -> str:
    if by_port:
        return f'via-port "{dev.port}"'
    return f"id {dev.vidpid}"


def _label(dev: UsbDevice) -> str:
    from vmplug.host.select import describe  # noqa: PLC0415

    return describe(dev)


@cli.command("init", epilog=EPILOG_ENV)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write (default: --config, VMPLUG_CONFIG, /etc/vmplug/vmplug.toml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option(
    "--vm",
    "vm_specs",
    multiple=True,
    metavar="NAME[=WHERE]",
    help="A VM to manage: WHERE is a QMP socket path, tcp:HOST:PORT, libvirt:DOMAIN, "
    "container:NAME or proxmox:VMID; NAME alone takes the found VM of that name.",
)
@click.option(
    "--device",
    "device_specs",
    multiple=True,
    metavar="[VM=]SELECTOR",
    help="A device to route (port 3-1.2, vid:pid, serial or rule:RULE) to VM "
    "(may be left out when there is one VM).",
)
@click.option("--by-port", is_flag=True, help="Rules match the port (via-port), not vid:pid.")
@click.option(
    "--interactive/--no-interactive",
    default=None,
    help="Ask which VMs and devices (default: when stdin is a terminal and no --vm is given).",
)
@click.option(
    "--match", "patterns", multiple=True, metavar="GLOB", help="Only found VMs whose name matches."
)
@_discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@pass_ctx
def init(
    obj: Context,
    output: Path | None,
    force: bool,
    vm_specs: tuple[str, ...],
    device_specs: tuple[str, ...],
    by_port: bool,
    interactive: bool | None,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Write a first config from the VMs found here and the devices you pick.

    In a terminal, with no --vm, vmplug lists the VMs it finds (as `vmplug
    vms` does) and the USB devices present, and asks which to use.  For
    scripts, --vm and --device say it all; a --vm NAME without =WHERE takes
    the found VM of that name.  The file is checked as `vmplug check-config`
    would before it is written, and an existing file is kept unless --force.

    \b
    Examples:
      vmplug init
      vmplug init -o vmplug.toml --vm win=/srv/win/qmp/qmp.sock --device 1235:821a
      vmplug init --vm win11=libvirt:win11 --device win11=3-1.2 --by-port
      vmplug init --vm windows --device 'windows=rule:with-interface one-of { 01:*:* }'

    Exit status: 0 written, 1 failure, 2 bad input (or the file exists).
    """
    target = output or config_path(obj.config)
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    if interactive is None:
        interactive = sys.stdin.isatty() and not vm_specs
    uri = libvirt_uris[0] if libvirt_uris else None
    discovery: Discovery | None = None

    def found() -> Discovery:
        nonlocal discovery
        if discovery is None:
            discovery = asyncio.run(
                discover(
                    [],
                    libvirt_uris=libvirt_uris or (DEFAULT_LIBVIRT_URI,),
                    docker_socket=docker_socket,
                    proxmox_run=proxmox_run,
                    processes=not no_processes,
                    patterns=patterns,
                    timeout=timeout,
                )
            )
        return discovery

    chosen: list[tuple[str, FoundVm]] = []
    for spec in vm_specs:
        name, eq, where = spec.partition("=")
        if not name:
            raise UsageError(f"--vm {spec!r}: give NAME=WHERE or NAME")
        vm = (
            parse_where(where, libvirt_uri=uri, docker_socket=docker_socket) if eq else None
        ) or _found_by_name(found(), where if eq else name, spec)
        chosen.append((name, vm))

    devices = obj.devices(include_root_hubs=False)
    rules: list[tuple[str, str, str]] = []
    if interactive:
        chosen, rules = _ask(found(), devices, chosen, by_port=by_port)
    names = [n for n, _ in chosen]
    for spec in device_specs:
        rules.extend(_device_rules(spec, names, devices, by_port=by_port))
    if not chosen:
        raise UsageError("no VM chosen: give --vm NAME=WHERE (see `vmplug vms`)")
    if len(set(names)) != len(names):
        raise UsageError(f"--vm: a VM name is given twice ({', '.join(names)})")
    text = render_config(chosen, rules)
    try:
        parse_config(text, target)  # never write what would not load
    except VmplugError as exc:
        raise UsageError(f"the config would not load: {exc.render()}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".vmplug-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    if as_json:
        emit_json(
            {
                "config": str(target),
                "vms": {n: vm.vm_table() for n, vm in chosen},
                "rules": [{"attach": v, "match": t} for v, t, _ in rules],
            }
        )
        return
    click.echo(
        f"wrote {target}: {len(chosen)} VMs, {len(rules)} rules "
        "(check it with `vmplug check-config`, run with `vmplug run`)",
        err=True,
    )


def _found_by_name(discovery: Discovery, name: str, spec: str) -> FoundVm:
    matches = [v for v in discovery.vms if v.name == name and v.where]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted({v.name for v in discovery.vms if v.where})) or "none"
    if not matches:
        raise UsageError(
            f"--vm {spec!r}: no VM named {name!r} found (found: {known}); "
            "or give WHERE: a QMP path, tcp:H:P, libvirt:DOM, container:NAME, proxmox:VMID"
        )
    raise UsageError(
        f"--vm {spec!r}: {len(matches)} VMs are named {name!r} "
        f"({', '.join(m.where for m in matches)}); give WHERE"
    )


def _device_rules(
    spec: str, vm_names: Sequence[str], devices: Sequence[UsbDevice], *, by_port: bool
) -> list[tuple[str, str, str]]:
    from vmplug.host.select import select_many  # noqa: PLC0415

    vm_name, eq, selector = spec.partition("=")
    if not eq or vm_name not in vm_names:
        if len(vm_names) != 1:
            raise UsageError(
                f"--device {spec!r}: say which VM: VM=SELECTOR (VMs: {', '.join(vm_names)})"
            )
        vm_name, selector = vm_names[0], spec
    chosen = select_many(devices, [selector])
    out = []
    for dev in chosen:
        if dev.is_hub:
            raise UsageError(f"--device {spec!r}: {dev.port} is a hub; QEMU cannot pass hubs")
        out.append((vm_name, rule_for(dev, by_port=by_port), _label(dev)))
    return out


def _numbers(text: str, count: int, what: str) -> list[int]:
    out = []
    for part in text.replace(",", " ").split():
        if not part.isdigit() or not 1 <= int(part) <= count:
            raise click.BadParameter(f"{part!r} is not one of 1..{count}", param_hint=what)
        out.append(int(part) - 1)
    return list(dict.fromkeys(out))


def _ask(
    discovery: Discovery,
    devices: Sequence[UsbDevice],
    chosen: list[tuple[str, FoundVm]],
    *,
    by_port: bool,
) -> tuple[list[tuple[str, FoundVm]], list[tuple[str, str, str]]]:
    candidates = [v for v in discovery.vms if v.where]
    if candidates:
        click.echo("VMs found:", err=True)
        for i, vm in enumerate(candidates, 1):
            click.echo(f"  {i}. {vm.name}  {vm.where}  ({vm.source}, {vm.state})", err=True)
        picked = click.prompt(
            "VMs to manage (numbers, comma-separated; empty for none)",
            default="",
            show_default=False,
            err=True,
            value_proc=lambda t: _numbers(t, len(candidates), "VMs"),
        )
        for index in picked:
            vm = candidates[index]
            name = click.prompt(
                f"Name for {vm.where} in the config", default=_config_name(vm.name), err=True
            )
            chosen.append((name, vm))
    else:
        click.echo("no VMs found on this host (see `vmplug vms`)", err=True)
    rules: list[tuple[str, str, str]] = []
    usable = [d for d in devices if not d.is_hub]
    if not chosen or not usable:
        return chosen, rules
    click.echo("USB devices:", err=True)
    for i, dev in enumerate(usable, 1):
        click.echo(f"  {i}. {_label(dev)}", err=True)
    picked = click.prompt(
        "Devices to route into a VM (numbers; empty for none)",
        default="",
        show_default=False,
        err=True,
        value_proc=lambda t: _numbers(t, len(usable), "devices"),
    )
    names = [n for n, _ in chosen]
    for index in picked:
        dev = usable[index]
        vm_name = names[0]
        if len(names) > 1:
            vm_name = click.prompt(
                f"VM for {dev.port} ({dev.vidpid})", type=click.Choice(names), err=True
            )
        rules.append((vm_name, rule_for(dev, by_port=by_port), _label(dev)))
    return chosen, rules


def _config_name(name: str) -> str:
    import re  # noqa: PLC0415

    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("-_.")[:64]
    return cleaned or "vm"


__all__ = ["Discovery", "FoundVm", "discover", "init", "vms"]
