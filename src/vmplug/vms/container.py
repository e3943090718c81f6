"""QEMU inside a container (dockurr/windows and other QEMU images).

vmplug finds the container through the Docker (or Podman) Engine API
(:mod:`vmplug.wire.engine`; ``GET /containers/NAME/json``: what ``docker
inspect`` prints), reads where QEMU's QMP socket is inside the container (``-qmp`` or
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
import logging
import posixpath
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
from vmplug.wire.engine import Engine, candidates, find_engine
from vmplug.wire.errors import EngineError
from vmplug.wire.proc import parse_args, split_arguments, unix_path

log = logging.getLogger("vmplug.vms.container")

#: The dockurr/windows image's private HMP monitor: never vmplug's.
IMAGE_MONITOR = "/run/shm/monitor.sock"


class ContainerError(VmConfigError):
    """The container is missing, or has no QMP socket vmplug can reach."""


class DockerApiError(VmDisconnected):
    """The Docker/Podman API socket is missing or did not answer."""


def api_sockets(uri: str | None = None) -> list[str]:
    """Candidate API sockets (:func:`vmplug.wire.engine.candidates`): ``uri``,
    else ``$DOCKER_HOST``, else Docker's, rootful Podman's, the user's rootless
    Podman's."""
    return candidates(uri)


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


def qmp_paths_in_args(words: Sequence[str]) -> list[str]:
    """Unix QMP socket paths on a QEMU command line (``-qmp``, ``-qmp-pretty``,
    ``-chardev socket,id=X,path=P`` used by ``-mon chardev=X,mode=control``),
    read by :func:`vmplug.wire.proc.parse_args`; never the image's own monitor."""
    return [p for p in parse_args(list(words)).qmp_paths if p != IMAGE_MONITOR]


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
        words += split_arguments(env["ARGUMENTS"])
    for key in ("QEMU_ARGS", "EXTRA_ARGS"):
        if key in env:
            with contextlib.suppress(ValueError):
                words += shlex.split(env[key])
    paths = qmp_paths_in_args(words)
    if env.get("QMP"):
        qmp = env["QMP"]
        path = unix_path(qmp) or (qmp if qmp.startswith("/") else None)
        if path and path not in paths and path != IMAGE_MONITOR:
            paths.insert(0, path)
    return paths


def mount_path(mounts: Iterable[tuple[str, str]], inside: str) -> str | None:
    """The host path of a container path through ``(source, destination)`` mounts
    (the one with the longest matching destination); None when it is not on one
    (then only the container sees it)."""
    best: tuple[int, str] | None = None
    inside = posixpath.normpath(inside)
    for source, destination in mounts:
        if not source:
            continue
        dest = posixpath.normpath(destination)
        if inside == dest or inside.startswith(dest.rstrip("/") + "/"):
            rest = posixpath.relpath(inside, dest)
            mapped = source if rest == "." else posixpath.join(source, rest)
            if best is None or len(dest) > best[0]:
                best = (len(dest), mapped)
    return best[1] if best else None


def host_path(doc: Mapping[str, Any], inside: str) -> str | None:
    """The host path of a container path, through an inspect document's bind
    mounts and volumes (see :func:`mount_path`)."""
    mounts = [
        (m["Source"], m["Destination"])
        for m in doc.get("Mounts") or []
        if isinstance(m, dict)
        and isinstance(m.get("Source"), str)
        and isinstance(m.get("Destination"), str)
    ]
    return mount_path(mounts, inside)


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


#: Seconds one Engine API call may take.  Generous: a busy engine (Podman's
#: service under TCG answered in 7-10 s; dockerd while it restarts a
#: container, more than 5 s) is slow, not gone, and a lookup is rare.
API_TIMEOUT = 30.0

#: Container events after which the container's QMP socket may have moved or
#: come back: look the container up again at once.
RELOOK_EVENTS = frozenset({"create", "start", "restart", "die", "destroy", "rename", "kill"})


async def find_api(uri: str | None = None, timeout: float = API_TIMEOUT) -> Engine | None:
    """The Engine API on the first socket that exists (None: no Docker or Podman here)."""
    return find_engine(uri, timeout)


async def locate(name: str, uri: str | None = None, timeout: float = API_TIMEOUT) -> ContainerQmp:
    """Find container ``name`` and its QMP socket on the host; raises
    :class:`ContainerError` (with the compose fix) or :class:`DockerApiError`."""
    api = await find_api(uri, timeout)
    if api is None:
        raise DockerApiError(
            name,
            "no Docker or Podman API socket (tried "
            + ", ".join(api_sockets(uri))
            + '); set uri = "unix:///PATH" for this VM or DOCKER_HOST',
        )
    try:
        doc = await api.inspect(name)
    except EngineError as exc:
        raise DockerApiError(name, str(exc)) from exc
    if doc is None:
        raise ContainerError(name, f"no container {name!r} at {api.address}")
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
        self._events_task: asyncio.Task[None] | None = None
        self._relook = asyncio.Event()
        #: the engine's last event for this container (``start``, ``die``...), if any
        self.last_event: str | None = None

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
        if self._events_task is None or self._events_task.done():
            self._events_task = asyncio.create_task(
                self._follow_events(), name=f"vmplug-container-events-{self.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        events, self._events_task = self._events_task, None
        await cancel_and_wait([task, events])
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

    async def _follow_events(self) -> None:
        """Follow the engine's ``/events`` for this container: a re-created,
        restarted or removed container is looked up again at once, not when its
        QMP socket's fate is noticed.  The stream is opened again when it ends
        (an engine restart), with a pause that grows to ``lookup_interval * 5``."""
        pause = self.lookup_interval
        while True:
            api = await find_api(self.uri)
            if api is None:
                await asyncio.sleep(pause)
                continue
            try:
                async for event in api.events(
                    {"type": ["container"], "container": [self.container]}
                ):
                    action = str(event.get("Action") or event.get("status") or "")
                    action = action.split(":", 1)[0]  # "exec_start: sh" and the like
                    if action in RELOOK_EVENTS:
                        self.last_event = action
                        log.debug("vm %s: container %s: %s", self.name, self.container, action)
                        self._relook.set()
                    pause = self.lookup_interval
            except EngineError as exc:
                log.debug("vm %s: engine events: %s", self.name, exc)
            # the stream ended: the engine went away or restarted; look again
            self._relook.set()
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.lookup_interval * 5)

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
    "DockerApiError",
    "api_sockets",
    "compose_fix",
    "host_path",
    "locate",
    "qmp_paths_in_args",
    "qmp_paths_in_container",
    "read_container",
]
