"""QEMU over QMP: one long-lived session per VM, events, reconnect with backoff.

A QMP socket serves one client at a time (DESIGN.md, principle 5).  On a
socket of its own vmplug keeps a session open for as long as QEMU lives and
learns from the event stream when something changed or when QEMU went away:
no polling while connected.  On a socket it must share (``shared=True``,
e.g. Proxmox's ``/var/run/qemu-server/VMID.qmp``) it connects per operation
and lets go at once, so other clients never wait on it for long.

Everything vmplug believes about a VM's devices comes from QOM
(``qom-list`` / ``qom-get``), never from HMP text.  Every command has a
timeout; a QEMU that dies or hangs gives a :class:`VmError`, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError, Runstate
from qemu.qmp.message import Message

from vmplug.aio import cancel_and_wait
from vmplug.vms.base import (
    ID_PREFIX,
    AttachSpec,
    Binding,
    Notifier,
    ObservedDevice,
    OnVmEvent,
    UsbBus,
    UsbControllerKind,
    UsbHostSpec,
    UsbRedirSpec,
    VmConfigError,
    VmDisconnected,
    VmError,
    VmEventKind,
    VmState,
    VmTimeout,
    check_device_id,
    pick_usb_bus,
    redir_chardev_id,
)
from vmplug.wire.qmp import IN_FLIGHT, parse_address
from vmplug.wire.qmp import Client as _Client
from vmplug.wire.qmp import close_bounded as _close
from vmplug.wire.qmp import map_bounded as _map_bounded

log = logging.getLogger("vmplug.vms.qmp")

PERIPHERAL = "/machine/peripheral"
PERIPHERAL_ANON = "/machine/peripheral-anon"
UNATTACHED = "/machine/unattached"

#: usb-host properties that cannot change after device_add (cached per session).
STATIC_PROPS = ("hostbus", "hostaddr", "hostport", "vendorid", "productid", "parent_bus")
#: The id vmplug gives a controller it adds itself (add_controller = true).
CONTROLLER_ID = "vmplug-xhci"


async def _sleep_on_grid(delay: float) -> None:
    """Sleep about ``delay`` seconds, waking on a grid of ``delay`` shared by all
    VMs.  A process wake-up costs far more than a stat: 20 VMs waiting for
    their sockets wake once per period together, not 20 times apart.  (The
    peers are local sockets of distinct QEMUs: no herd to spread.)"""
    loop = asyncio.get_running_loop()
    now = loop.time()
    wake = math.ceil((now + delay / 2) / delay) * delay  # between 0.5 and 1.5 x delay
    await asyncio.sleep(wake - now)


@dataclass(frozen=True, slots=True)
class _Static:
    hostbus: int | None
    hostaddr: int | None
    hostport: str | None
    vendorid: int | None
    productid: int | None
    bus: str | None


#: The properties observe_bindings() reads once per session of each device.
BINDING_PROPS = ("hostbus", "hostport", "hostaddr")
_BindingKey = tuple[int | None, str | None, int | None]
#: observe_bindings reads this many unknown devices or more with one HMP
#: ``info qtree`` instead of three qom-gets each (before QEMU 10.1's qom-list-get)
QTREE_MIN = 4
QTREE_COMMAND = {"command-line": "info qtree"}
_QTREE_USB_HOST = re.compile(r'^(?P<indent> *)dev: usb-host, id "(?P<id>[^"]+)"$')
_QTREE_PROP = re.compile(r"^ *(?P<name>hostbus|hostport|hostaddr) = (?P<value>.*)$")


def qtree_bindings(text: str) -> dict[str, _BindingKey]:
    """(hostbus, hostport, hostaddr) of every usb-host with an id, from HMP
    ``info qtree`` (qdev_print_props: ``hostbus = 2 (0x2)``, ``hostport =
    "2.4.2"``, one level deeper than the device's ``dev:`` line).  A device
    whose three values are not all there as expected is left out (the caller
    reads it by qom-get)."""
    out: dict[str, _BindingKey] = {}
    current: str | None = None
    depth = 0
    values: dict[str, str] = {}

    def done() -> None:
        if current is None or len(values) != len(BINDING_PROPS):
            return
        bus, port, addr = (values[p] for p in BINDING_PROPS)
        if not (port.startswith('"') and port.endswith('"') and len(port) >= 2):
            return
        try:
            key = (int(bus.split()[0]), port[1:-1], int(addr.split()[0]))
        except (ValueError, IndexError):
            return
        out[current] = (_int_or_none(key[0]), _str_or_none(key[1]), _int_or_none(key[2]))

    for line in text.splitlines():
        m = _QTREE_USB_HOST.match(line)
        if m is not None:
            done()
            current, depth, values = m["id"], len(m["indent"]), {}
            continue
        if current is None:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent <= depth:
            done()
            current = None
            continue
        prop = _QTREE_PROP.match(line)
        if prop is not None and indent == depth + 2:
            values[prop["name"]] = prop["value"]
    done()
    return out


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _static_from(values: Mapping[str, object]) -> _Static:
    parent = _str_or_none(values.get("parent_bus"))
    return _Static(
        hostbus=_int_or_none(values.get("hostbus")),
        hostaddr=_int_or_none(values.get("hostaddr")),
        hostport=_str_or_none(values.get("hostport")),
        vendorid=_int_or_none(values.get("vendorid")),
        productid=_int_or_none(values.get("productid")),
        bus=parent.rsplit("/", 1)[-1] if parent else None,
    )


def _observed(key: str, path: str, static: _Static, attached: object) -> ObservedDevice:
    return ObservedDevice(
        id=key,
        hostbus=static.hostbus,
        hostaddr=static.hostaddr,
        hostport=static.hostport,
        vendorid=static.vendorid,
        productid=static.productid,
        attached=attached is True,
        bus=static.bus,
        path=path,
    )


def _child_type(entry: object) -> str | None:
    """``child<usb-host>`` -> ``usb-host``; None for non-child properties."""
    if not isinstance(entry, dict):
        return None
    kind = entry.get("type")
    if isinstance(kind, str) and kind.startswith("child<") and kind.endswith(">"):
        return kind[6:-1]
    return None


def _is_controller_type(qom_type: str) -> bool:
    return UsbControllerKind.from_type(qom_type) is not UsbControllerKind.OTHER


class QmpVm(Notifier):
    """One QEMU virtual machine reached over QMP (a :class:`~vmplug.vms.base.VmBackend`).

    ``on_change(event)`` is called (from the event loop) with a
    :class:`~vmplug.vms.base.VmEvent` when the reconciler should look again:
    ``CONNECTED``, ``DISCONNECTED``, ``DEVICE_DELETED`` (with the device's
    id), or the kind of a QMP event: ``SHUTDOWN``, ``RESET``, ``STOP``,
    ``RESUME``, ``GUEST_PANICKED``.  Events say what to look at, never what is true.
    """

    def __init__(
        self,
        name: str,
        address: str,
        *,
        shared: bool = False,
        usb_bus: str | None = None,
        add_controller: bool = False,
        on_change: OnVmEvent | None = None,
        command_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        shared_probe_interval: float = 10.0,
    ) -> None:
        self.name = name
        self.address = address
        self.target = parse_address(address)
        self.shared = shared
        self.usb_bus_config = usb_bus
        self.add_controller = add_controller
        self.on_change = on_change
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.shared_probe_interval = shared_probe_interval

        self._state = VmState.DISCONNECTED
        self._client: _Client | None = None  # the long-lived session, when up
        self._reachable = False  # shared mode: the last contact worked
        self._last_contact = 0.0
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._shared_lock = asyncio.Lock()
        self._deleted: dict[str, list[asyncio.Future[None]]] = {}
        # Per-session caches, kept honest by DEVICE_DELETED (events reach every monitor).
        self._static: dict[str, _Static] = {}
        self._bindings: dict[str, _BindingKey] = {}
        self._generation = 0
        self._bus: str | None = None
        self._bus_lock = asyncio.Lock()
        #: the last /machine/peripheral listing observe_bindings() read, with its
        #: generation: prepare_attach() looks for controllers in it, not again
        self._peripheral: tuple[int, list[Any]] | None = None
        # attaches of several devices of one device host run at once: one makes
        # the host's TLS credentials object, the others wait for it
        self._tls_lock = asyncio.Lock()
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)
        #: QEMU's version from the last greeting, and whether it has qom-list-get (10.1+).
        self.qemu_version: tuple[int, int, int] | None = None
        self._list_get = False
        self._side_tasks: set[asyncio.Task[None]] = set()
        #: usb-redir devices this process added or saw (their chardevs go with them)
        self._redir: set[str] = set()

    # -- public state ---------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def connected(self) -> bool:
        """Long-lived: a session is open.  Shared: the last contact worked."""
        if self.shared:
            return self._reachable
        client = self._client
        return client is not None and client.runstate is Runstate.RUNNING

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "owned"
        return f"<QmpVm {self.name} {self.address} {mode} {self._state.value}>"

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting (and reconnecting) in the background; returns at once."""
        if self._task is not None and not self._task.done():
            return
        loop_fn = self._shared_loop if self.shared else self._owned_loop
        self._task = asyncio.create_task(loop_fn(), name=f"vmplug-qmp-{self.name}")

    async def stop(self) -> None:
        """Stop reconnecting and close the session, if any."""
        task, self._task = self._task, None
        await cancel_and_wait([task, *self._side_tasks])
        client, self._client = self._client, None
        if client is not None:
            await _close(client)
        self._forget_session(VmDisconnected(self.name, "stopped"))
        self._up.clear()
        self._reachable = False
        self._state = VmState.DISCONNECTED

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a session is up (long-lived) or QEMU answers (shared)."""
        if self.shared:
            with contextlib.suppress(VmError):
                async with self._session():
                    pass
            return self._reachable
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- operations ---------------------------------------------------------

    async def observe(self) -> dict[str, ObservedDevice]:
        """vmplug's usb-host devices (id ``vmplug-*``), keyed by id."""
        async with self._session() as client:
            return await self._observe(client, (PERIPHERAL,), managed_only=True)

    async def observe_bindings(self) -> dict[str, Binding]:
        """vmplug's usb-host devices with only what a reconciler compares (:class:`Binding`).

        A fraction of :meth:`observe`'s cost on QEMU before 10.1 (one qom-get
        per property, ~0.45 ms of QEMU CPU each): three qom-gets for a device
        the session has not seen, none for one it added or read before (they
        cannot change after device_add, and DEVICE_DELETED reaches every
        monitor), plus ``attached`` of pinned devices on every call.  A single
        qom-list when nothing is new and nothing is pinned.
        """
        async with self._session() as client:
            generation = self._generation
            children = await self._qom_list(client, PERIPHERAL)
            if not self.shared:
                self._peripheral = (generation, children)
            known: dict[str, _BindingKey] = {}
            todo: list[str] = []
            redirs: list[str] = []
            for child in children:
                name = str(child.get("name", "")) if isinstance(child, dict) else ""
                if not name.startswith(ID_PREFIX):
                    continue
                if _child_type(child) == "usb-redir":
                    redirs.append(name)
                    continue
                if _child_type(child) != "usb-host":
                    continue
                path = f"{PERIPHERAL}/{name}"
                key = self._known_binding(path)
                if key is None:
                    todo.append(path)
                else:
                    known[path] = key
            remote = await self._redir_bindings(client, redirs)
            if len(todo) >= QTREE_MIN and not self._list_get:
                todo = await self._bindings_from_qtree(client, todo, known, generation)
            if todo:
                bulk = await self._qom_list_get(client, todo)
                if bulk is not None:  # QEMU 10.1+: everything at once
                    out: dict[str, Binding] = {}
                    for path, values in zip(todo, bulk, strict=True):
                        name = path.rsplit("/", 1)[1]
                        dev = self._device_from(name, path, values, generation)
                        live = dev.attached if dev.hostaddr is not None else None
                        out[name] = Binding(name, dev.hostbus, dev.hostport, dev.hostaddr, live)
                    return out | await self._complete(client, known) | remote
                read = await _map_bounded(lambda p: self._read_binding(client, p, generation), todo)
                known.update((path, key) for path, key in zip(todo, read, strict=True) if key)
            return await self._complete(client, known) | remote

    async def _bindings_from_qtree(
        self, client: _Client, todo: list[str], known: dict[str, _BindingKey], generation: int
    ) -> list[str]:
        """The bindings of ``todo`` from one ``info qtree`` into ``known`` (QEMU
        spends ~0.45 ms per qom-get; a restarted daemon meets 25 devices a VM);
        returns the paths still to read one by one."""
        try:
            text = await self._exec(client, "human-monitor-command", QTREE_COMMAND)
        except VmError as exc:
            if isinstance(exc, (VmDisconnected, VmTimeout)):
                raise
            return todo
        tree = qtree_bindings(text) if isinstance(text, str) else {}
        rest: list[str] = []
        for path in todo:
            key = tree.get(path.rsplit("/", 1)[1])
            if key is None:
                rest.append(path)
                continue
            known[path] = key
            if not self.shared and generation == self._generation:
                self._bindings[path] = key
        return rest

    async def _redir_bindings(self, client: _Client, names: list[str]) -> dict[str, Binding]:
        """usb-redir devices: no host socket; ``attached`` says the device host streams it."""
        live = await _map_bounded(lambda n: self._attached(client, f"{PERIPHERAL}/{n}"), names)
        out: dict[str, Binding] = {}
        for name, state in zip(names, live, strict=True):
            if state is not None:
                self._redir.add(name)
                out[name] = Binding(name, None, None, None, state)
        return out

    async def _complete(self, client: _Client, keys: dict[str, _BindingKey]) -> dict[str, Binding]:
        """Bindings from their keys, with ``attached`` read for pinned devices."""
        pinned = [path for path, key in keys.items() if key[2] is not None]
        live = await _map_bounded(lambda p: self._attached(client, p), pinned)
        attached = dict(zip(pinned, live, strict=True))
        out: dict[str, Binding] = {}
        for path, key in keys.items():
            name = path.rsplit("/", 1)[1]
            state = attached.get(path)
            if key[2] is not None and state is None:
                continue  # vanished meanwhile
            out[name] = Binding(name, *key, state)
        return out

    async def _attached(self, client: _Client, path: str) -> bool | None:
        """QOM ``attached`` of one device; None when it vanished meanwhile."""
        try:
            return await self._qom_get(client, path, "attached") is True
        except VmError as exc:
            if exc.qmp_class == "DeviceNotFound":
                return None
            raise

    def _known_binding(self, path: str) -> _BindingKey | None:
        if self.shared:
            return None
        static = self._static.get(path)
        if static is not None:
            return (static.hostbus, static.hostport, static.hostaddr)
        return self._bindings.get(path)

    async def _read_binding(
        self, client: _Client, path: str, generation: int
    ) -> _BindingKey | None:
        """The binding properties of one device; None when it vanished meanwhile."""
        try:
            bus, port, addr = await asyncio.gather(
                *(self._qom_get(client, path, p) for p in BINDING_PROPS)
            )
        except VmError as exc:
            if exc.qmp_class == "DeviceNotFound":
                return None
            raise
        key = (_int_or_none(bus), _str_or_none(port), _int_or_none(addr))
        if not self.shared and generation == self._generation:
            self._bindings[path] = key
        return key

    async def observe_all(self) -> dict[str, ObservedDevice]:
        """Every usb-host device, vmplug's and others' (see ``ObservedDevice.managed``).

        Devices without an id (``-device usb-host,...`` with no ``id=``) are
        keyed by their QOM path.
        """
        async with self._session() as client:
            return await self._observe(client, (PERIPHERAL, PERIPHERAL_ANON))

    async def attach(self, dev_id: str, spec: AttachSpec) -> None:
        """``device_add usb-host`` with ``dev_id`` on the VM's USB bus."""
        check_device_id(self.name, dev_id)
        problem = spec.problem()
        if problem is not None:
            raise VmConfigError(self.name, f"{dev_id}: {problem}")
        if isinstance(spec, UsbRedirSpec):
            await self._attach_redir(dev_id, spec)
            return
        if self.shared:
            async with self._session() as client:
                await self._attach_host(client, dev_id, spec)
            return
        # the long-lived session: no context manager per device (500 at start)
        await self._attach_host(self._owned_client(), dev_id, spec)

    async def _attach_host(self, client: _Client, dev_id: str, spec: UsbHostSpec) -> None:
        bus = await self._resolve_bus(client)
        args: dict[str, object] = {"driver": "usb-host", "id": dev_id, "bus": bus}
        args.update(spec.qmp_args())
        generation = self._generation
        await self._exec(client, "device_add", args)
        if not self.shared and generation == self._generation and "/" not in bus:
            # Match properties are what device_add stored; only `attached` moves.
            self._static[f"{PERIPHERAL}/{dev_id}"] = _Static(
                hostbus=spec.hostbus,
                hostaddr=spec.hostaddr,
                hostport=spec.hostport,
                vendorid=spec.vendorid,
                productid=spec.productid,
                bus=bus,
            )

    async def _attach_redir(self, dev_id: str, spec: UsbRedirSpec) -> None:
        """A remote device: the device host's TLS credentials (once per host),
        a socket chardev that connects and reconnects to its endpoint, and a
        ``usb-redir`` on it.  The guest sees the device once the device host
        streams it (QOM ``attached``); a failure leaves nothing behind."""
        chardev = redir_chardev_id(dev_id)
        async with self._session() as client:
            bus = await self._resolve_bus(client)
            if spec.tls_dir is not None:
                await self._ensure_tls_creds(client, spec)
            backend: dict[str, object] = {
                "addr": {"type": "inet", "data": {"host": spec.host, "port": str(spec.port)}},
                "server": False,
                "reconnect": spec.reconnect,
                "nodelay": True,
            }
            if spec.tls_dir is not None:
                backend["tls-creds"] = spec.tls_id
            labels = await self._chardev_labels(client)
            if chardev in labels:  # left by an attach that failed half-way
                await self._remove_chardev(client, chardev)
            await self._exec(
                client,
                "chardev-add",
                {"id": chardev, "backend": {"type": "socket", "data": backend}},
            )
            try:
                await self._exec(
                    client,
                    "device_add",
                    {"driver": "usb-redir", "id": dev_id, "bus": bus, "chardev": chardev},
                )
            except VmError:
                with contextlib.suppress(VmError):
                    await self._remove_chardev(client, chardev)
                raise
            self._redir.add(dev_id)

    async def _ensure_tls_creds(self, client: _Client, spec: UsbRedirSpec) -> None:
        async with self._tls_lock:
            await self._ensure_tls_creds_locked(client, spec)

    async def _has_object(self, client: _Client, object_id: str) -> bool:
        objects = await self._qom_list(client, "/objects")
        return any(isinstance(o, dict) and o.get("name") == object_id for o in objects)

    async def _ensure_tls_creds_locked(self, client: _Client, spec: UsbRedirSpec) -> None:
        if await self._has_object(client, spec.tls_id):
            return
        try:
            await self._exec(
                client,
                "object-add",
                {
                    "qom-type": "tls-creds-x509",
                    "id": spec.tls_id,
                    "dir": spec.tls_dir,
                    "endpoint": "client",
                    "verify-peer": True,
                },
            )
        except VmError as exc:
            # another session of this VM (a second daemon's, the doctor's) made it first
            if await self._has_object(client, spec.tls_id):
                return
            raise VmConfigError(
                self.name,
                f"QEMU cannot load the TLS credentials for {spec.remote} from {spec.tls_dir} "
                f"(ca-cert.pem, client-cert.pem, client-key.pem readable by QEMU?): {exc}",
                qmp_class=exc.qmp_class,
            ) from exc

    async def _chardev_labels(self, client: _Client) -> dict[str, str]:
        """``query-chardev``: label -> filename (``disconnected:...`` while not connected)."""
        found = await self._exec(client, "query-chardev")
        out: dict[str, str] = {}
        if isinstance(found, list):
            for entry in found:
                if isinstance(entry, dict) and isinstance(entry.get("label"), str):
                    out[entry["label"]] = str(entry.get("filename", ""))
        return out

    async def _remove_chardev(self, client: _Client, chardev: str) -> None:
        try:
            await self._exec(client, "chardev-remove", {"id": chardev})
        except VmError as exc:
            if exc.qmp_class == "GenericError" and "not found" in str(exc):
                return  # nothing to remove: no error (only the class decides elsewhere)
            raise

    async def redir_links(self) -> dict[str, bool]:
        """vmplug's usb-redir chardevs: device id -> connected to its device host now."""
        async with self._session() as client:
            labels = await self._chardev_labels(client)
        out: dict[str, bool] = {}
        for label, filename in labels.items():
            if label.startswith(ID_PREFIX) and label.endswith("-chr"):
                out[label.removesuffix("-chr")] = not filename.startswith("disconnected:")
        return out

    async def detach(self, dev_id: str, timeout: float = 5.0) -> None:
        """``device_del`` and wait for DEVICE_DELETED (then, for a usb-redir,
        ``chardev-remove`` its chardev); a missing device is no error."""
        check_device_id(self.name, dev_id)
        path = f"{PERIPHERAL}/{dev_id}"
        host_device = path in self._static or path in self._bindings
        await self._detach_device(dev_id, timeout)
        if host_device and dev_id not in self._redir:
            return  # a usb-host: no chardev of ours
        async with self._session() as client:
            chardev = redir_chardev_id(dev_id)
            if dev_id in self._redir or chardev in await self._chardev_labels(client):
                await self._remove_chardev(client, chardev)
            self._redir.discard(dev_id)

    async def _detach_device(self, dev_id: str, timeout: float) -> None:
        async with self._session() as client:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # Registered before device_del: USB unplug is synchronous and the
            # event may arrive before the command's reply.
            self._deleted.setdefault(dev_id, []).append(done)
            try:
                try:
                    await self._exec(client, "device_del", {"id": dev_id})
                except VmError as exc:
                    if exc.qmp_class == "DeviceNotFound":
                        return
                    raise
                try:
                    await asyncio.wait_for(asyncio.shield(done), timeout)
                except TimeoutError:
                    raise VmTimeout(
                        self.name, f"{dev_id}: no DEVICE_DELETED within {timeout:g} s"
                    ) from None
            finally:
                waiters = self._deleted.get(dev_id, [])
                if done in waiters:
                    waiters.remove(done)
                if not waiters:
                    self._deleted.pop(dev_id, None)
                if not done.done():
                    done.cancel()

    async def usb_bus_info(self) -> list[UsbBus]:
        """Every USB bus of the VM, with its controller."""
        async with self._session() as client:
            return await self._find_buses(client)

    async def usb_buses(self) -> list[str]:
        """Names of every USB bus of the VM (what ``usb_bus`` in the config takes)."""
        return [b.name for b in await self.usb_bus_info()]

    async def usb_bus(self) -> str:
        """The bus attach() uses: the configured one, the single xHCI/EHCI bus,
        or (add_controller) a qemu-xhci added now.  Raises VmConfigError otherwise."""
        async with self._session() as client:
            return await self._resolve_bus(client)

    async def status(self) -> VmState:
        """Ask QEMU (``query-status``) and update :attr:`state`."""
        async with self._session() as client:
            await self._refresh_status(client)
        return self._state

    # -- sessions -----------------------------------------------------------

    def _owned_client(self) -> _Client:
        """The long-lived session's client, or VmDisconnected."""
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            raise VmDisconnected(self.name, f"not connected to {self.address}")
        return client

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_Client]:
        if not self.shared:
            yield self._owned_client()
            return
        async with self._shared_lock:
            client = await self._open_shared()
            try:
                yield client
            finally:
                await _close(client)
                # Nothing seen on a closed session can be trusted later.
                self._forget_session(VmDisconnected(self.name, "session closed"))

    async def _open_shared(self) -> _Client:
        client = _Client(self.name, self._on_event)
        try:
            await asyncio.wait_for(client.connect(self.target), self.connect_timeout)
            self._note_greeting(client)
            await self._refresh_status(client)
        except BaseException as exc:
            await _close(client)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._set_reachable(False)
            if isinstance(exc, VmError):
                raise
            raise VmDisconnected(self.name, f"cannot reach {self.address}: {exc}") from exc
        self._set_reachable(True)
        return client

    def _set_reachable(self, up: bool) -> None:
        """Shared mode: record the outcome of a contact and tell on a change."""
        if up:
            self._last_contact = time.monotonic()
        else:
            self._state = VmState.DISCONNECTED
        if up != self._reachable:
            self._reachable = up
            self._notify(VmEventKind.CONNECTED if up else VmEventKind.DISCONNECTED)

    async def _shared_loop(self) -> None:
        """Shared socket: never hold it.  Notice QEMU coming and going by a
        cheap stat of the socket (a restarted QEMU makes a new inode) and a
        brief probe every ``shared_probe_interval`` seconds."""
        last_sig: tuple[int, int] | None = None
        tick = min(2.0, self.shared_probe_interval)
        while True:
            sig = self._socket_signature()
            changed = sig != last_sig
            if changed and last_sig is not None and self._reachable:
                self._set_reachable(False)  # a new QEMU: look again from scratch
            last_sig = sig
            stale = time.monotonic() - self._last_contact >= self.shared_probe_interval
            if isinstance(self.target, str) and sig is None:
                self._set_reachable(False)
            elif changed or stale or not self._reachable:
                with contextlib.suppress(VmError):
                    async with self._session():
                        pass
            await _sleep_on_grid(tick)

    def _socket_signature(self) -> tuple[int, int] | None:
        if not isinstance(self.target, str):
            return (0, 0)
        try:
            st = Path(self.target).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_ctime_ns)

    async def _owned_loop(self) -> None:
        """Own socket: connect, live on the event stream, reconnect with backoff."""
        attempt = 0
        reported = False
        while True:
            if isinstance(self.target, str) and not Path(self.target).exists():
                await self._backoff(attempt)  # QEMU not started yet: a stat is all it costs
                attempt += 1
                continue
            self._state = VmState.CONNECTING
            client = _Client(self.name, self._on_event)
            try:
                await asyncio.wait_for(client.connect(self.target), self.connect_timeout)
                self._note_greeting(client)
                await self._refresh_status(client)
            except (QMPError, OSError, TimeoutError, VmError) as exc:
                await _close(client)
                self._state = VmState.DISCONNECTED
                if not reported:
                    log.info("vm %s: cannot connect to %s: %s", self.name, self.address, exc)
                    reported = True
                await self._backoff(attempt)
                attempt += 1
                continue
            except BaseException:
                await _close(client)
                self._state = VmState.DISCONNECTED
                raise
            began = time.monotonic()
            reported = False
            self._client = client
            self._up.set()
            log.info("vm %s: connected to %s (%s)", self.name, self.address, self._state.value)
            self._notify(VmEventKind.CONNECTED)
            try:
                while client.runstate is Runstate.RUNNING:
                    await client.runstate_changed()
            finally:
                self._client = None
                self._up.clear()
                await _close(client)
                self._forget_session(VmDisconnected(self.name, "QEMU went away"))
                self._state = VmState.DISCONNECTED
            log.info("vm %s: disconnected from %s", self.name, self.address)
            self._notify(VmEventKind.DISCONNECTED)
            # A session that dies at once (a broken peer) must not spin.
            attempt = 0 if time.monotonic() - began > 1.0 else attempt + 1
            await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 30))
        if isinstance(self.target, tuple):
            # A remote peer: jitter, so many daemons do not knock at once.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (not crypto)
        else:
            await _sleep_on_grid(delay)

    def _forget_session(self, why: VmError) -> None:
        self._static.clear()
        self._bindings.clear()
        self._generation += 1
        self._bus = None
        self._peripheral = None
        for waiters in self._deleted.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(why)
                    fut.exception()  # mark retrieved: a waiter may be gone already
        self._deleted.clear()

    # -- events -------------------------------------------------------------

    def _on_event(self, msg: Message) -> None:
        event = msg.get("event")
        kind = VmEventKind.from_qmp(event) if isinstance(event, str) else None
        if kind is None:
            return
        data = msg.get("data")
        data = data if isinstance(data, dict) else {}
        if event == "DEVICE_DELETED":
            dev_id = data.get("device")
            path = data.get("path")
            self._generation += 1
            paths = [p for p in (path, dev_id and f"{PERIPHERAL}/{dev_id}") if isinstance(p, str)]
            # A usb-host this session added or read cannot have been the
            # controller: keep the bus (a replug's device_add needs it at once).
            if not any(p in self._static or p in self._bindings for p in paths):
                self._bus = None  # it may have been a controller
            for p in paths:
                self._static.pop(p, None)
                self._bindings.pop(p, None)
            if isinstance(dev_id, str) and dev_id:
                for fut in self._deleted.pop(dev_id, []):
                    if not fut.done():
                        fut.set_result(None)
                self._notify(VmEventKind.DEVICE_DELETED, dev_id)
            return
        if event == "STOP":
            self._state = VmState.PAUSED
        elif event == "RESUME":
            self._state = VmState.RUNNING
        elif event == "SHUTDOWN":
            self._state = VmState.SHUTDOWN
        elif event == "GUEST_PANICKED":
            self._state = VmState.CRASHED
        elif event == "RESET" and self._client is not None:
            # A reset of a stopped VM puts it back to prelaunch: ask, do not guess.
            task = asyncio.create_task(self._refresh_after_event(self._client))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        self._notify(kind)

    async def _refresh_after_event(self, client: _Client) -> None:
        with contextlib.suppress(VmError):
            await self._refresh_status(client)

    # -- commands -----------------------------------------------------------

    async def _exec(
        self, client: _Client, cmd: str, args: Mapping[str, object] | None = None
    ) -> object:
        try:
            # asyncio.timeout, not wait_for: no task of its own per command
            async with asyncio.timeout(self.command_timeout):
                return await self._bounded(client, cmd, args)
        except ExecuteError as exc:
            raise VmError(self.name, f"{cmd}: {exc}", qmp_class=exc.error_class) from exc
        except TimeoutError:
            raise VmTimeout(
                self.name, f"{cmd}: no answer within {self.command_timeout:g} s"
            ) from None
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise VmDisconnected(self.name, f"{cmd}: connection lost ({exc})") from exc

    async def _bounded(
        self, client: _Client, cmd: str, args: Mapping[str, object] | None
    ) -> object:
        # the wait for a slot counts in the command's timeout, as QEMU's queue would
        async with self._in_flight:
            return await client.execute(cmd, args)

    def _note_greeting(self, client: _Client) -> None:
        version: object = None
        greeting = client.greeting
        if greeting is not None:
            with contextlib.suppress(KeyError, TypeError):
                version = greeting.QMP.version["qemu"]
        if isinstance(version, dict):
            parts = (version.get("major"), version.get("minor"), version.get("micro"))
            if all(isinstance(v, int) for v in parts):
                self.qemu_version = (int(parts[0] or 0), int(parts[1] or 0), int(parts[2] or 0))
        self._list_get = self.qemu_version is not None and self.qemu_version >= (10, 1, 0)

    async def _refresh_status(self, client: _Client) -> None:
        status = await self._exec(client, "query-status")
        if isinstance(status, dict) and isinstance(status.get("status"), str):
            self._state = VmState.from_run_state(status["status"])

    async def _qom_list(self, client: _Client, path: str) -> list[Any]:
        """Children of a QOM path; a path that does not exist lists as empty."""
        try:
            found = await self._exec(client, "qom-list", {"path": path})
        except VmError as exc:
            if exc.qmp_class == "DeviceNotFound":
                return []
            raise
        return found if isinstance(found, list) else []

    async def _qom_get(self, client: _Client, path: str, prop: str) -> object:
        return await self._exec(client, "qom-get", {"path": path, "property": prop})

    async def _observe(
        self, client: _Client, containers: tuple[str, ...], *, managed_only: bool = False
    ) -> dict[str, ObservedDevice]:
        generation = self._generation
        listings = await asyncio.gather(*(self._qom_list(client, c) for c in containers))
        paths: list[tuple[str, str]] = []  # (key, QOM path)
        redirs: list[tuple[str, str]] = []
        for container, children in zip(containers, listings, strict=True):
            for child in children:
                kind = _child_type(child)
                if kind not in ("usb-host", "usb-redir"):
                    continue
                name = str(child["name"])
                if managed_only and not name.startswith(ID_PREFIX):
                    continue  # others' devices cost nothing unless asked for (observe_all)
                path = f"{container}/{name}"
                key = name if container == PERIPHERAL else path
                (paths if kind == "usb-host" else redirs).append((key, path))
        found_redirs: dict[str, ObservedDevice] = {}
        if redirs:
            read = await _map_bounded(lambda kp: self._read_redir(client, kp[0], kp[1]), redirs)
            found_redirs = {dev.id: dev for dev in read if dev is not None}
        if not paths:
            return found_redirs
        bulk = await self._qom_list_get(client, [path for _, path in paths])
        results: list[ObservedDevice | None]
        if bulk is not None:
            results = [
                self._device_from(key, path, values, generation)
                for (key, path), values in zip(paths, bulk, strict=True)
            ]
        else:
            results = await _map_bounded(
                lambda kp: self._read_device(client, kp[0], kp[1], generation), paths
            )
        return {dev.id: dev for dev in results if dev is not None} | found_redirs

    async def _read_redir(self, client: _Client, key: str, path: str) -> ObservedDevice | None:
        """A usb-redir's ``attached`` (the device host streams it now), its
        chardev and bus; None when it vanished meanwhile."""
        try:
            attached, chardev, parent = await asyncio.gather(
                self._qom_get(client, path, "attached"),
                self._qom_get(client, path, "chardev"),
                self._qom_get(client, path, "parent_bus"),
            )
        except VmError as exc:
            if exc.qmp_class == "DeviceNotFound":
                return None
            raise
        if key.startswith(ID_PREFIX):
            self._redir.add(key)
        bus = _str_or_none(parent)
        return ObservedDevice(
            id=key,
            hostbus=None,
            hostaddr=None,
            hostport=None,
            vendorid=None,
            productid=None,
            attached=attached is True,
            bus=bus.rsplit("/", 1)[-1] if bus else None,
            path=path,
            driver="usb-redir",
            chardev=_str_or_none(chardev),
        )

    async def _qom_list_get(
        self, client: _Client, paths: list[str]
    ) -> list[dict[str, object]] | None:
        """Every property of every path in one command (QEMU 10.1+); None when
        QEMU lacks it or a device vanished meanwhile (then read one by one)."""
        if not self._list_get:
            return None
        try:
            found = await self._exec(client, "qom-list-get", {"paths": paths})
        except VmError as exc:
            if exc.qmp_class == "CommandNotFound":
                self._list_get = False
                return None
            if exc.qmp_class == "DeviceNotFound":
                return None
            raise
        if not isinstance(found, list) or len(found) != len(paths):
            return None
        out: list[dict[str, object]] = []
        for entry in found:
            props = entry.get("properties") if isinstance(entry, dict) else None
            if not isinstance(props, list):
                return None
            out.append(
                {
                    str(p["name"]): p.get("value")
                    for p in props
                    if isinstance(p, dict) and "name" in p
                }
            )
        return out

    def _device_from(
        self, key: str, path: str, values: Mapping[str, object], generation: int
    ) -> ObservedDevice:
        static = _static_from(values)
        if not self.shared and generation == self._generation:
            self._static[path] = static
        return _observed(key, path, static, values.get("attached"))

    async def _read_device(
        self, client: _Client, key: str, path: str, generation: int
    ) -> ObservedDevice | None:
        """Read one usb-host's properties; None when it vanished meanwhile."""
        # The match properties are fixed at device_add: read them once per
        # session (long-lived sessions only: there DEVICE_DELETED keeps the
        # cache honest).  `attached` changes: read it every time.
        static = self._static.get(path) if not self.shared else None
        try:
            if static is None:
                values = await asyncio.gather(
                    self._qom_get(client, path, "attached"),
                    *(self._qom_get(client, path, p) for p in STATIC_PROPS),
                )
                attached = values[0]
                static = _static_from(dict(zip(STATIC_PROPS, values[1:], strict=True)))
                if not self.shared and generation == self._generation:
                    self._static[path] = static
            else:
                attached = await self._qom_get(client, path, "attached")
        except VmError as exc:
            if exc.qmp_class == "DeviceNotFound":
                return None
            raise
        return _observed(key, path, static, attached)

    async def _find_buses(
        self, client: _Client, peripheral: list[Any] | None = None
    ) -> list[UsbBus]:
        """Every USB bus; ``peripheral``: /machine/peripheral's children, when
        they were just listed."""
        containers = (PERIPHERAL, PERIPHERAL_ANON, UNATTACHED)
        listings = await asyncio.gather(
            *(
                self._listed(peripheral) if c == PERIPHERAL and peripheral is not None
                else self._qom_list(client, c)
                for c in containers
            )
        )  # fmt: skip
        controllers: list[tuple[str, str]] = []
        for container, children in zip(containers, listings, strict=True):
            for child in children:
                qom_type = _child_type(child)
                if qom_type is not None and _is_controller_type(qom_type):
                    controllers.append((f"{container}/{child['name']}", qom_type))
        inner = await asyncio.gather(*(self._qom_list(client, p) for p, _ in controllers))
        buses: list[UsbBus] = []
        for (path, qom_type), children in zip(controllers, inner, strict=True):
            buses.extend(
                UsbBus(name=str(child["name"]), controller=path, controller_type=qom_type)
                for child in children
                if _child_type(child) == "usb-bus"
            )
        return sorted(buses, key=lambda b: b.name)

    @staticmethod
    async def _listed(children: list[Any]) -> list[Any]:
        return children

    async def prepare_attach(self) -> None:
        """Look up the USB bus :meth:`attach` uses now, once per session, so the
        first attach does not wait for it (the daemon calls this while it reads
        the host's devices: QEMU's work then overlaps the read).  Reuses the
        /machine/peripheral listing :meth:`observe_bindings` just read.  Adds no
        controller and raises nothing: an attach that needs the bus looks again
        and says what is wrong."""
        if self.shared or self.usb_bus_config or self._bus is not None:
            return
        with contextlib.suppress(VmError):
            async with self._bus_lock:
                if self._bus is not None:
                    return
                client = self._owned_client()
                generation = self._generation
                listed = self._peripheral
                peripheral = listed[1] if listed and listed[0] == generation else None
                buses = await self._find_buses(client, peripheral)
                if buses and generation == self._generation:
                    self._bus = pick_usb_bus(self.name, buses).name

    async def _resolve_bus(self, client: _Client) -> str:
        if self.usb_bus_config:
            return self.usb_bus_config
        if self._bus is not None:
            return self._bus
        # One lookup at a time: 25 attaches issued together would otherwise
        # each list the QOM tree (4 qom-lists apiece, /machine/unattached
        # among them), and with add_controller each add a controller.
        async with self._bus_lock:
            if self._bus is not None:
                return self._bus
            return await self._lookup_bus(client)

    async def _lookup_bus(self, client: _Client) -> str:
        generation = self._generation
        buses = await self._find_buses(client)
        if not buses and self.add_controller:
            bus = await self._add_controller(client)
        else:
            bus = pick_usb_bus(self.name, buses).name
        if generation == self._generation and not self.shared:
            self._bus = bus
        return bus

    async def _add_controller(self, client: _Client) -> str:
        """Hot-add a qemu-xhci.  On q35 the root bus takes no hot-plug: then
        try each PCIe root port / PCI bridge in turn."""
        args: dict[str, object] = {"driver": "qemu-xhci", "id": CONTROLLER_ID}
        try:
            await self._exec(client, "device_add", args)
        except VmError as exc:
            if exc.qmp_class != "GenericError":
                raise
            first = exc
            for bus in await self._hotplug_buses(client):
                try:
                    await self._exec(client, "device_add", args | {"bus": bus})
                except VmError as again:
                    if again.qmp_class != "GenericError":
                        raise
                    continue
                break
            else:
                raise VmConfigError(
                    self.name,
                    f"the VM has no USB controller and adding one failed ({first}); "
                    "add -device qemu-xhci to its command line (on q35, or give it a free "
                    "-device pcie-root-port for vmplug to use)",
                    qmp_class=first.qmp_class,
                ) from first
        log.info("vm %s: added USB controller %s", self.name, CONTROLLER_ID)
        return f"{CONTROLLER_ID}.0"

    async def _hotplug_buses(self, client: _Client) -> list[str]:
        """Buses of PCIe root ports and PCI bridges, where a controller may go."""
        containers = (PERIPHERAL, PERIPHERAL_ANON)
        listings = await asyncio.gather(*(self._qom_list(client, c) for c in containers))
        ports: list[str] = []
        for container, children in zip(containers, listings, strict=True):
            for child in children:
                qom_type = _child_type(child) or ""
                if "root-port" in qom_type or "bridge" in qom_type:
                    ports.append(f"{container}/{child['name']}")
        inner = await asyncio.gather(*(self._qom_list(client, p) for p in ports))
        return [
            str(child["name"])
            for children in inner
            for child in children
            if _child_type(child) in ("PCIE", "PCI")
        ]


__all__ = ["ID_PREFIX", "Binding", "QmpVm", "parse_address"]
