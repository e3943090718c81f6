# ruff: noqa: PTH110
# (/proc, /dev and sysfs walks use plain os calls on string paths, like host/sysfs.py)
"""Containers that run QEMU (dockurr/windows and the like), from three sources.

* The Docker or Podman Engine API (``GET /containers/json`` then
  ``GET /containers/{id}/json``: the ``ContainerInspect`` document), through
  :mod:`vmplug.wire.engine`;
* ``docker inspect`` output saved to a file (``--inspect FILE``);
* a compose file (``--compose FILE``).

All three become one :class:`ContainerSpec`: what the checks need, in the
terms of the Docker Engine API's ``HostConfig``/``Config``/``Mounts``.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.vms.container import mount_path
from vmplug.wire._sync import run_sync
from vmplug.wire.engine import Engine
from vmplug.wire.errors import EngineError
from vmplug.wire.proc import split_arguments


@dataclass
class ContainerSpec:
    name: str
    source: str
    image: str = ""
    #: host paths passed as devices (HostConfig.Devices[].PathOnHost / compose devices:)
    devices: list[str] = field(default_factory=list)
    #: (host path, container path) bind mounts
    binds: list[tuple[str, str]] = field(default_factory=list)
    cgroup_rules: list[str] = field(default_factory=list)
    privileged: bool = False
    security_opt: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    running: bool | None = None
    pid: int | None = None
    #: the engine's State.ExitCode (a QEMU that did not start exits 1)
    exit_code: int | None = None
    #: run by a rootless Podman (its device_cgroup_rules do nothing)
    rootless_podman: bool = False
    #: run by Podman (its Docker-compatible inspect says DeviceCgroupRules: null
    #: even for a container made with --device-cgroup-rule: Podman 4.3.1)
    podman: bool = False
    #: the document said nothing of the cgroup rules (null, not [])
    cgroup_rules_unknown: bool = False

    def uses_usb(self) -> bool:
        return (
            "dockur" in self.image
            or "qemux" in self.image
            or "usb-host" in self.env.get("ARGUMENTS", "")
            or any(d.startswith("/dev/bus/usb") for d in self.devices)
            or any(s.startswith("/dev/bus/usb") for s, _ in self.binds)
        )


@dataclass
class EngineInfo:
    """What kind of engine answers on a socket: Docker or Podman, rootful or rootless."""

    address: str
    podman: bool = False
    rootless: bool = False
    version: str = ""
    #: what the answer rests on ("GET /version: Podman Engine 4.3.1", ...)
    evidence: tuple[str, ...] = ()

    @property
    def rootless_podman(self) -> bool:
        return self.podman and self.rootless


@dataclass
class ContainerScan:
    containers: list[ContainerSpec] = field(default_factory=list)
    #: the engines that answered, and what they are
    engines: list[EngineInfo] = field(default_factory=list)
    #: what was tried and what came of it ("socket /var/run/docker.sock: no such file")
    notes: list[str] = field(default_factory=list)
    api_reached: bool = False


def qmp_socket(spec: ContainerSpec) -> tuple[str, str] | None:
    """(where it was set, container path) of a QMP unix socket for vmplug.

    The same reading as the container backend's (``-qmp``, ``-qmp-pretty``,
    ``-chardev socket,path=`` + ``-mon mode=control`` in ``ARGUMENTS``, or the
    ``QMP`` variable of newer dockurr images), so the doctor finds exactly
    the socket ``vmplug run`` would use.
    """
    from vmplug.vms.container import IMAGE_MONITOR, qmp_paths_in_args  # noqa: PLC0415

    paths = qmp_paths_in_args(split_arguments(spec.env.get("ARGUMENTS", "")))
    if paths:
        return ("ARGUMENTS", paths[0])
    qmp = spec.env.get("QMP", "")
    found = qmp_paths_in_args(["-qmp", qmp]) if qmp else []
    if not found and qmp.startswith("/") and qmp != IMAGE_MONITOR:
        found = [qmp]
    return ("QMP", found[0]) if found else None


def host_path(spec: ContainerSpec, path: str) -> str | None:
    """Where a container path is on the host, through the longest bind mount over it."""
    return mount_path(spec.binds, path)


# ---------------------------------------------------------------- inspect documents


def from_inspect(doc: dict[str, Any], source: str) -> ContainerSpec:
    """A ``ContainerInspect`` document (``docker inspect`` prints a list of them)."""
    host = doc.get("HostConfig") or {}
    config = doc.get("Config") or {}
    spec = ContainerSpec(
        name=str(doc.get("Name", doc.get("Id", "?"))).lstrip("/"),
        source=source,
        image=str(config.get("Image") or doc.get("Image") or ""),
        privileged=bool(host.get("Privileged")),
        cgroup_rules=list(host.get("DeviceCgroupRules") or []),
        security_opt=list(host.get("SecurityOpt") or []),
    )
    # Podman's compat documents: runtime "oci" (Docker's: "runc"), images "localhost/..."
    spec.podman = host.get("Runtime") == "oci" or str(config.get("Image", "")).startswith(
        "localhost/"
    )
    spec.cgroup_rules_unknown = host.get("DeviceCgroupRules") is None
    for dev in host.get("Devices") or []:
        spec.devices.append(str(dev.get("PathOnHost", "")))
    seen: set[tuple[str, str]] = set()
    for mount in doc.get("Mounts") or []:
        if mount.get("Type") == "bind":
            pair = (str(mount.get("Source", "")), str(mount.get("Destination", "")))
            seen.add(pair)
            spec.binds.append(pair)
    for bind in host.get("Binds") or []:
        parts = str(bind).split(":")
        if len(parts) >= 2:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                spec.binds.append(pair)
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        spec.env[key] = value
    state = doc.get("State") or {}
    if state:
        spec.running = bool(state.get("Running"))
        pid = state.get("Pid")
        spec.pid = int(pid) if pid else None
        code = state.get("ExitCode")
        spec.exit_code = int(code) if isinstance(code, int) else None
    return spec


def load_inspect_file(path: Path) -> list[ContainerSpec]:
    data = json.loads(path.read_text())
    docs = data if isinstance(data, list) else [data]
    return [from_inspect(d, f"{path}") for d in docs if isinstance(d, dict)]


# ---------------------------------------------------------------- compose


def load_compose_file(path: Path) -> list[ContainerSpec]:
    """Each service of a compose file (relative bind sources resolved against its folder)."""
    from ruamel.yaml import YAML  # noqa: PLC0415

    doc = YAML(typ="safe", pure=True).load(path.read_text())
    base = str(path.resolve().parent)
    out: list[ContainerSpec] = []
    services = (doc or {}).get("services") or {}
    for name, raw in services.items():
        svc = raw or {}
        spec = ContainerSpec(
            name=str(svc.get("container_name") or name),
            source=f"{path} (service {name})",
            image=str(svc.get("image") or ""),
            privileged=bool(svc.get("privileged")),
            cgroup_rules=[str(r) for r in svc.get("device_cgroup_rules") or []],
            security_opt=[str(s) for s in svc.get("security_opt") or []],
        )
        for dev in svc.get("devices") or []:
            if isinstance(dev, dict):
                spec.devices.append(str(dev.get("source", "")))
            else:
                spec.devices.append(str(dev).split(":", 1)[0])
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                if vol.get("type", "volume") != "bind":
                    continue
                src, dst = str(vol.get("source", "")), str(vol.get("target", ""))
            else:
                parts = str(vol).split(":")
                if len(parts) < 2:
                    continue
                src, dst = parts[0], parts[1]
                if not (src.startswith(("/", ".", "~"))):
                    continue  # a named volume
            if src.startswith("."):
                src = posixpath.normpath(posixpath.join(base, src))
            spec.binds.append((src, dst))
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            spec.env = {str(k): "" if v is None else str(v) for k, v in env.items()}
        else:
            for item in env:
                key, _, value = str(item).partition("=")
                spec.env[key] = value
        out.append(spec)
    return out


# ---------------------------------------------------------------- Engine API


async def _engine_info(engine: Engine, address: str) -> EngineInfo:
    """Podman's ``/version`` names a "Podman Engine" component; whether it runs
    rootless is libpod's ``host.security.rootless`` (Podman 4.3's compat ``/info``
    does not say), or ``name=rootless`` among ``/info``'s SecurityOptions (Docker
    rootless, newer Podman)."""
    evidence: list[str] = []
    version_doc = await engine.version()
    components = version_doc.get("Components") or []
    names = [str(c.get("Name", "")) for c in components if isinstance(c, dict)]
    podman = any("podman" in n.lower() for n in names)
    version = str(version_doc.get("Version", ""))
    for c in components:
        if isinstance(c, dict) and "podman" in str(c.get("Name", "")).lower():
            version = str(c.get("Version", version))
    evidence.append(f"{address} GET /version: {', '.join(names) or 'no Components'} {version}")
    rootless = False
    info = await engine.get_json("/info") or {}
    options = [str(o) for o in info.get("SecurityOptions") or []]
    if any("name=rootless" in o.split(",") for o in options):
        rootless = True
        evidence.append(f"{address} GET /info: SecurityOptions {options}")
    if podman and not rootless:
        # libpod's own API, not the compat one the client's paths are prefixed for
        status, libpod = await engine._raw("GET", "/v4.0.0/libpod/info")
        if status != 200 or not isinstance(libpod, dict):
            libpod = {}
        security = (libpod.get("host") or {}).get("security") or {}
        if security.get("rootless") is True:
            rootless = True
            evidence.append(f"{address} GET /v4.0.0/libpod/info: host.security.rootless = true")
    return EngineInfo(address, podman, rootless, version, tuple(evidence))


def engine_info(sock_path: str, timeout: float) -> EngineInfo:
    """Docker or Podman, rootful or rootless, at ``sock_path``; raises
    :class:`~vmplug.wire.errors.EngineError`."""
    engine = Engine(sock_path, timeout)
    try:
        return run_sync(lambda: _engine_info(engine, sock_path), None)
    except TimeoutError:
        raise EngineError(f"{sock_path}: timed out", address=sock_path) from None


def list_via_api(sock_path: str, timeout: float) -> list[ContainerSpec]:
    """Every container of the engine at ``sock_path`` (running or not), inspected
    (:func:`vmplug.vms.discover.scan_containers`, the one lister); raises
    :class:`~vmplug.wire.errors.EngineError`."""
    from vmplug.vms.discover import scan_containers  # noqa: PLC0415

    try:
        scan = run_sync(lambda: scan_containers(sock_path, timeout), None)
    except TimeoutError:
        raise EngineError(f"{sock_path}: timed out", address=sock_path) from None
    if scan.error is not None:
        raise EngineError(scan.error, address=sock_path)
    address = scan.address or sock_path
    return [
        from_inspect(d, f"{address} GET /containers/{str(d.get('Id', ''))[:12]}/json")
        for d in scan.docs
    ]


def gather_containers(
    *,
    inspect_files: Sequence[Path] = (),
    compose_files: Sequence[Path] = (),
    sockets: Sequence[str] = (),
    timeout: float = 5.0,
) -> ContainerScan:
    """Containers from saved inspect documents, compose files and the engines at ``sockets``."""
    scan = ContainerScan()
    for path in inspect_files:
        scan.containers += load_inspect_file(path)
        scan.notes.append(f"read {path}")
    for path in compose_files:
        scan.containers += load_compose_file(path)
        scan.notes.append(f"read {path}")
    for sock in sockets:
        if not os.path.exists(sock):
            scan.notes.append(f"{sock}: no such socket")
            continue
        try:
            found = list_via_api(sock, timeout)
        except Exception as exc:  # any failure is this engine's note
            why = str(exc)
            if isinstance(exc, EngineError) and exc.address:
                why = why.removeprefix(f"{exc.address}: ")
            scan.notes.append(f"{sock}: {why}")
            continue
        scan.api_reached = True
        scan.notes.append(f"{sock}: {len(found)} containers")
        try:
            info = engine_info(sock, timeout)
        except Exception as exc:  # the containers are known; what engine it is stays open
            scan.notes.append(f"{sock}: engine kind unknown: {exc}")
        else:
            scan.engines.append(info)
            for spec in found:
                spec.rootless_podman = info.rootless_podman
        scan.containers += found
    return scan
