"""QEMU inside a container (dockurr/windows and other QEMU images).

vmplug finds the container through the Docker (or Podman) API on its unix
socket (plain HTTP, ``GET /containers/NAME/json``: what ``docker inspect``
prints), reads where QEMU's QMP socket is inside the container (``-qmp`` or
``-chardev socket`` + ``-mon mode=control`` in the image's ``ARGUMENTS``, or
its ``QMP`` variable), and follows the container's bind mounts to the same
socket on the host.  From there on the VM is a plain QMP VM
(:class:`~vmplug.vms.qmp.QmpVm`): a container restart is a QEMU restart (the
socket goes away and comes back) and vmplug reconnects and attaches again.

When the container has no QMP socket a host process can reach, the error
says how to fix the compose file (the same pieces ``vmplug generate
compose`` writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vmplug.aio import cancel_and_wait
from vmplug.vms.base import (
    AttachSpec,
    Binding,
    Notifier,
    ObservedDevice,
    OnVmEvent,
    VmConfigError,
    VmDisconnected,
    VmEvent,
    VmEventKind,
    VmState,
)
from vmplug.vms.qmp import QmpVm

log = logging.getLogger("vmplug.vms.container")

#: Where the Docker and Podman API sockets usually are (DOCKER_HOST comes first).
DEFAULT_SOCKETS = (
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
)
#: The dockurr/windows image's private HMP monitor: never vmplug's.
IMAGE_MONITOR = "/run/shm/monitor.sock"


class ContainerError(VmConfigError):
    """The container is missing, or has no QMP socket vmplug can reach."""


class DockerApiError(VmDisconnected):
    """The Docker/Podman API socket is missing or did not answer."""


def api_sockets(uri: str | None = None) -> list[str]:
    """Candidate API sockets: ``uri``, else ``$DOCKER_HOST``, else the usual places
    (Docker's, rootful Podman's, the user's rootless Podman's)."""
    if uri:
        return [uri.removeprefix("unix://")]
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return [host.removeprefix("unix://")]
    found = list(DEFAULT_SOCKETS)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        found.append(posixpath.join(runtime, "podman", "podman.sock"))
    return found


class DockerApi:
    """The few calls of the Docker Engine API vmplug needs, over a unix socket.

    Podman serves the same paths (its Docker-compatible API).  Each call
    opens its own connection and closes it.
    """

    def __init__(self, socket: str, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def _get(self, path: str) -> tuple[int, Any]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise DockerApiError("docker", f"cannot reach the API at {self.socket}: {exc}") from exc
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise DockerApiError("docker", f"{self.socket}: GET {path}: {exc}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return _parse_response(self.socket, path, raw)

    async def inspect(self, name: str) -> dict[str, Any] | None:
        """``docker inspect NAME``; None when there is no such container."""
        status, body = await self._get(f"/containers/{quote(name, safe='')}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise DockerApiError("docker", f"{self.socket}: inspect {name}: HTTP {status}: {body}")
        return body

    async def containers(self) -> list[dict[str, Any]]:
        """``docker ps -a``: summaries (Id, Names, Image, State)."""
        status, body = await self._get("/containers/json?all=1")
        if status != 200 or not isinstance(body, list):
            raise DockerApiError("docker", f"{self.socket}: list containers: HTTP {status}")
        return [c for c in body if isinstance(c, dict)]


def _parse_response(socket: str, path: str, raw: bytes) -> tuple[int, Any]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2) if lines else []
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise DockerApiError("docker", f"{socket}: GET {path}: not an HTTP answer")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    try:
        return int(parts[1]), json.loads(body) if body.strip() else None
    except ValueError:
        return int(parts[1]), body.decode("utf-8", "replace")


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


# ---------------------------------------------------------------------------
# Reading an inspect document (pure)


def _env(doc: Mapping[str, Any]) -> dict[str, str]:
    config = doc.get("Config") or {}
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _chardev_path(value: str) -> str | None:
    """The unix path of a ``-qmp``/``-chardev`` value, or None (tcp, stdio...)."""
    # QEMU escapes a ',' in a value as ',,'
    fields = value.replace(",,", "\0").split(",")
    first = fields[0].replace("\0", ",")
    if first.startswith("unix:"):
        return first[5:] or None
    if first == "socket":
        for f in fields[1:]:
            key, _, v = f.partition("=")
            if key == "path":
                return v.replace("\0", ",") or None
    return None


def qmp_paths_in_args(words: Sequence[str]) -> list[str]:
    """Unix QMP socket paths on a QEMU command line (``-qmp``, ``-qmp-pretty``,
    ``-chardev socket,id=X,path=P`` used by ``-mon chardev=X,mode=control``)."""
    paths: list[str] = []
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        opt, eq, inline = word.partition("=")
        value = inline if eq else (words[i + 1] if i + 1 < len(words) else "")
        step = 1 if eq else 2
        if opt.lstrip("-") in ("qmp", "qmp-pretty") and opt.startswith("-"):
            path = _chardev_path(value)
            if path:
                paths.append(path)
            i += step
            continue
        if opt.lstrip("-") == "chardev" and opt.startswith("-"):
            fields = dict(f.partition("=")[::2] for f in value.split(",")[1:])
            path = _chardev_path(value)
            if path and fields.get("id"):
                chardevs[fields["id"]] = path
            i += step
            continue
        if opt.lstrip("-") == "mon" and opt.startswith("-"):
            fields = dict(f.partition("=")[::2] for f in value.split(","))
            if fields.get("mode") == "control" and fields.get("chardev"):
                monitors.append(fields["chardev"])
            i += step
            continue
        i += 1
    paths.extend(chardevs[m] for m in monitors if m in chardevs)
    return [p for p in dict.fromkeys(paths) if p != IMAGE_MONITOR]


def qmp_paths_in_container(doc: Mapping[str, Any]) -> list[str]:
    """QMP socket paths inside the container, from its command and environment.

    dockurr/windows takes ``-qmp`` in ``ARGUMENTS`` (split on white space by
    its entry script) and, on newer images, a ``QMP`` variable whose value
    is ``-qmp``'s.  Other QEMU images carry the options in their command.
    """
    env = _env(doc)
    words: list[str] = []
    config = doc.get("Config") or {}
    for part in (config.get("Entrypoint"), config.get("Cmd")):
        if isinstance(part, list):
            words += [w for w in part if isinstance(w, str)]
    args = doc.get("Args")
    if isinstance(args, list) and not words:
        words += [w for w in args if isinstance(w, str)]
    if "ARGUMENTS" in env:
        words += env["ARGUMENTS"].split()
    for key in ("QEMU_ARGS", "EXTRA_ARGS"):
        if key in env:
            with contextlib.suppress(ValueError):
                words += shlex.split(env[key])
    paths = qmp_paths_in_args(words)
    if env.get("QMP"):
        qmp = env["QMP"]
        path = _chardev_path(qmp) or (qmp if qmp.startswith("/") else None)
        if path and path not in paths and path != IMAGE_MONITOR:
            paths.insert(0, path)
    return paths


def host_path(doc: Mapping[str, Any], inside: str) -> str | None:
    """The host path of a container path, through its bind mounts and volumes
    (the mount with the longest matching destination); None when it is not on
    a mount (then only the container sees it)."""
    best: tuple[int, str] | None = None
    inside = posixpath.normpath(inside)
    for mount in doc.get("Mounts") or []:
        if not isinstance(mount, dict):
            continue
        dest = mount.get("Destination")
        source = mount.get("Source")
        if not isinstance(dest, str) or not isinstance(source, str) or not source:
            continue
        dest = posixpath.normpath(dest)
        if inside == dest or inside.startswith(dest.rstrip("/") + "/"):
            rest = posixpath.relpath(inside, dest)
            mapped = source if rest == "." else posixpath.join(source, rest)
            if best is None or len(dest) > best[0]:
                best = (len(dest), mapped)
    return best[1] if best else None


@dataclass(frozen=True, slots=True)
class ContainerQmp:
    """What vmplug learned of a container: its QMP socket on the host, or why not."""

    name: str
    id: str
    image: str
    running: bool
    restarting: bool
    inside: tuple[str, ...]  # QMP paths inside the container
    socket: str | None  # on the host
    problem: str | None

    @property
    def is_qemu(self) -> bool:
        return bool(self.inside) or "qemu" in self.image or "windows" in self.image

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "image": self.image,
            "running": self.running,
            "qmp_inside": list(self.inside),
            "qmp": self.socket,
            "problem": self.problem,
        }


def read_container(doc: Mapping[str, Any]) -> ContainerQmp:
    """Judge an inspect document (pure): where the QMP socket is on the host."""
    name = str(doc.get("Name") or "").lstrip("/") or str(doc.get("Id", ""))[:12]
    state = doc.get("State") or {}
    config = doc.get("Config") or {}
    image = str(config.get("Image") or doc.get("Image") or "")
    inside = qmp_paths_in_container(doc)
    socket: str | None = None
    problem: str | None = None
    if not inside:
        problem = "QEMU in it has no QMP socket (no -qmp unix:... in ARGUMENTS, no QMP variable)"
    else:
        for path in inside:
            socket = host_path(doc, path)
            if socket is not None:
                break
        if socket is None:
            problem = (
                f"its QMP socket {inside[0]} is not on a bind mount, so no host process can "
                "reach it"
            )
    return ContainerQmp(
        name=name,
        id=str(doc.get("Id", "")),
        image=image,
        running=bool(state.get("Running")),
        restarting=bool(state.get("Restarting")),
        inside=tuple(inside),
        socket=socket,
        problem=problem,
    )


def compose_fix(service: str) -> str:
    """What to add to the compose file (the pieces ``vmplug generate compose`` writes)."""
    from vmplug.generate.compose import QMP_CONTAINER_DIR, QMP_CONTAINER_SOCKET  # noqa: PLC0415
    from vmplug.generate.qemu import qmp_chardev  # noqa: PLC0415

    qmp = qmp_chardev(QMP_CONTAINER_SOCKET)
    return (
        f"add to service {service!r} in docker-compose.yml:\n"
        f"    environment:\n"
        f'      ARGUMENTS: "-qmp {qmp}"   # appended to what is there\n'
        f"    volumes:\n"
        f"      - ./qmp:{QMP_CONTAINER_DIR}\n"
        f"then `docker compose up -d` (or let `vmplug generate compose --merge "
        f"docker-compose.yml` write it)"
    )


async def find_api(uri: str | None = None) -> DockerApi | None:
    """The first API socket that exists (None: no Docker or Podman here)."""
    for path in api_sockets(uri):
        if Path(path).exists():
            return DockerApi(path)
    return None


async def locate(name: str, uri: str | None = None) -> ContainerQmp:
    """Find container ``name`` and its QMP socket on the host; raises
    :class:`ContainerError` (with the compose fix) or :class:`DockerApiError`."""
    api = await find_api(uri)
    if api is None:
        raise DockerApiError(
            name,
            "no Docker or Podman API socket (tried "
            + ", ".join(api_sockets(uri))
            + '); set uri = "unix:///PATH" for this VM or DOCKER_HOST',
        )
    doc = await api.inspect(name)
    if doc is None:
        raise ContainerError(name, f"no container {name!r} at {api.socket}")
    found = read_container(doc)
    if found.socket is None:
        raise ContainerError(name, f"container {found.name}: {found.problem}; {compose_fix(name)}")
    return found


class ContainerVm(Notifier):
    """A QEMU in a container, driven through its QMP socket on the host.

    A :class:`~vmplug.vms.base.VmBackend`: the inner :class:`QmpVm`'s events
    are passed on as this VM's, plus ``DISCONNECTED`` when the container moved
    its socket.

    The container is looked up at start and again whenever QEMU goes away (a
    container that was re-created may have moved its socket); everything else
    is :class:`QmpVm`'s.  :attr:`error` says why the VM is not reachable
    (no API, no container, no reachable QMP socket) while it is not.
    """

    def __init__(
        self,
        name: str,
        container: str,
        *,
        uri: str | None = None,
        shared: bool = False,
        usb_bus: str | None = None,
        add_controller: bool = False,
        on_change: OnVmEvent | None = None,
        lookup_interval: float = 2.0,
    ) -> None:
        self.name = name
        self.container = container
        self.uri = uri
        self.shared = shared
        self.usb_bus_config = usb_bus
        self.add_controller = add_controller
        self.on_change = on_change
        self.lookup_interval = lookup_interval
        self.inner: QmpVm | None = None
        self.found: ContainerQmp | None = None
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._relook = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.inner is not None and self.inner.connected

    @property
    def state(self) -> VmState:
        return self.inner.state if self.inner is not None else VmState.DISCONNECTED

    @property
    def address(self) -> str | None:
        return self.inner.address if self.inner is not None else None

    def __repr__(self) -> str:
        return f"<ContainerVm {self.name} container={self.container} {self.state.value}>"

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"vmplug-container-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])
        inner, self.inner = self.inner, None
        if inner is not None:
            await inner.stop()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            inner = self.inner
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if inner is not None and await inner.wait_connected(
                min(0.2, left) if left is not None else 0.2
            ):
                return True
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        reported: str | None = None
        while True:
            try:
                found = await locate(self.container, self.uri)
            except (ContainerError, DockerApiError) as exc:
                self.error = str(exc)
                if self.error != reported:
                    log.warning("%s", exc)
                    reported = self.error
                await self._wait_relook(self.lookup_interval)
                continue
            self.error = None
            reported = None
            self.found = found
            socket = found.socket or ""
            if self.inner is None or self.inner.address != socket:
                old, self.inner = self.inner, None
                if old is not None:
                    await old.stop()
                    self._notify(VmEventKind.DISCONNECTED)
                log.info("vm %s: container %s, QMP at %s", self.name, found.name, socket)
                self.inner = QmpVm(
                    self.name,
                    socket,
                    shared=self.shared,
                    usb_bus=self.usb_bus_config,
                    add_controller=self.add_controller,
                    on_change=self._inner_change,
                )
                await self.inner.start()
            # Look again when QEMU goes away (restart, re-create), and now and
            # then while it is away.
            await self._wait_relook(None if self.connected else self.lookup_interval * 5)

    async def _wait_relook(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._relook.wait(), timeout)
        self._relook.clear()

    def _inner_change(self, event: VmEvent) -> None:
        if event.kind is VmEventKind.DISCONNECTED:
            self._relook.set()
        self._notify(event.kind, event.device_id)

    def _vm(self) -> QmpVm:
        if self.inner is None:
            raise VmDisconnected(
                self.name, self.error or f"container {self.container} not found yet"
            )
        return self.inner

    async def observe(self) -> dict[str, ObservedDevice]:
        return await self._vm().observe()

    async def observe_bindings(self) -> dict[str, Binding]:
        return await self._vm().observe_bindings()

    async def observe_all(self) -> dict[str, ObservedDevice]:
        return await self._vm().observe_all()

    async def attach(self, dev_id: str, spec: AttachSpec) -> None:
        await self._vm().attach(dev_id, spec)

    async def detach(self, dev_id: str, timeout: float = 5.0) -> None:
        await self._vm().detach(dev_id, timeout)

    async def usb_buses(self) -> list[str]:
        return await self._vm().usb_buses()

    async def usb_bus(self) -> str:
        """The bus attach() uses (as :meth:`QmpVm.usb_bus`)."""
        return await self._vm().usb_bus()


__all__ = [
    "ContainerError",
    "ContainerQmp",
    "ContainerVm",
    "DockerApi",
    "DockerApiError",
    "api_sockets",
    "compose_fix",
    "host_path",
    "locate",
    "qmp_paths_in_args",
    "qmp_paths_in_container",
    "read_container",
]
