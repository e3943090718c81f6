"""The reconciler: the queue of host events, the passes, the retries.

One uevent reads straight down: :mod:`vmplug.host.events` queues it
(:meth:`Daemon.on_host_event`), :meth:`Daemon._pump` takes it in order, the
device is read by :func:`vmplug.host.inventory.read_one`, its VM decided by
:func:`vmplug.engine.desired.target` (overrides, then the first matching rule,
:meth:`vmplug.config.Config.decide`), and the pass diffs
:func:`~vmplug.engine.desired.desired` against what each VM holds
(:func:`~vmplug.engine.desired.plan`) and calls the VM's backend
(:class:`vmplug.vms.base.VmBackend`).  What happened is written by the
:class:`~vmplug.daemon.journal.Journal`; what it shows is read through the
:class:`~vmplug.daemon.readmodel.ReadModel`.

The daemon keeps three pieces of state, each owned by one edge:

* ``inventory`` — the devices present, by port path: filled by a full rescan
  at start and on overflow, then updated one device at a time on ``bind``
  (re-read from sysfs) and ``remove`` (forgotten; sysfs is gone by then);
* ``observed`` — per connected VM, the ``vmplug-`` devices QEMU holds: read
  from QOM when the connection (re)opens or QEMU says something changed,
  and kept up to date by vmplug's own successful actions;
* ``overrides`` — one-shot ``attach``/``detach`` decisions taken while running.

Every change only sets ``dirty``; one loop computes ``desired`` and ``plan``
and carries the plan out.  A failed action is retried with exponential
backoff until the states agree, and a failure makes vmplug re-read that VM,
because its picture of the VM may be what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmplug.aio import cancel_and_wait
from vmplug.config import Config, VmConfig, load_config
from vmplug.daemon.heal import Remedies
from vmplug.daemon.journal import Journal, Listener
from vmplug.daemon.readmodel import PassListener, ReadModel, same_binding
from vmplug.engine.desired import (
    Action,
    Attachment,
    EarlyRules,
    desired,
    host_port,
    plan,
    target,
)
from vmplug.errors import VmplugError
from vmplug.history.store import ActionKind, EventKind, Result, Store
from vmplug.host.events import EventSource, HostEvent
from vmplug.host.inventory import device_dir, mark_shared_serials, read_devices, read_one
from vmplug.model import UsbDevice
from vmplug.vms.base import (
    ID_PREFIX,
    AttachSpec,
    UsbHostSpec,
    VmBackend,
    VmDisconnected,
    VmEvent,
    VmEventKind,
    VmTimeout,
)
from vmplug.vms.factory import VmFactory, default_vm_factory

log = logging.getLogger("vmplug")

RETRY_FIRST = 0.1
RETRY_MAX = 30.0
#: A device read while it changed is read again after 0.05, 0.1, 0.2, 0.4, 0.8 s.
UNSETTLED_FIRST = 0.05
UNSETTLED_TRIES = 5


@dataclass
class Retry:
    attempt: int
    due: float  # monotonic time
    error: str


@dataclass
class Stats:
    """Counters and timings the API, metrics and benchmarks read."""

    started: float = field(default_factory=time.time)
    passes: int = 0
    actions_ok: int = 0
    actions_failed: int = 0
    events: int = 0
    rescans: int = 0
    #: (port, seconds from the bind event to device_add sent), the latest 1,000
    event_to_add: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=1000))
    #: (port, seconds from the bind event to device_add answered), the latest 1,000
    event_to_attached: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=1000))


class DeviceSource(Protocol):
    """Devices beside this host's kernel: the device hosts' exports
    (:class:`vmplug.remote.inventory.RemoteInventory`).  They are matched and
    planned like the kernel's; only the attach spec differs (``usb-redir``).
    The source calls :meth:`Daemon.devices_changed` when devices come and go."""

    def devices(self) -> list[UsbDevice]: ...

    def attach_spec(self, qemu_id: str) -> AttachSpec | None: ...

    def held_elsewhere(self, dev: UsbDevice) -> str | None: ...

    def settled(self) -> bool:
        """Every device host has answered (or been found down) at least once."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        sysfs_root: Path,
        source: EventSource,
        store: Store | None = None,
        vm_factory: VmFactory = default_vm_factory,
        detach_on_exit: bool = False,
        config_path: Path | None = None,
        devnodes: bool | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path or Path(config.path)
        self.sysfs_root = sysfs_root
        self.source = source
        #: the journal: the history database and the listeners
        self.journal = Journal(store)
        #: what the API, the metrics and ``vmplug status`` read
        self.view = ReadModel(self)
        self.vm_factory = vm_factory
        self.detach_on_exit = detach_on_exit
        #: give QEMU the device's /dev/bus/usb node (opened at once) rather than
        #: only its port (found by QEMU's 2 s scan); by default only when the
        #: devices come from the live kernel's /sys
        self.devnodes = Path(sysfs_root).resolve() == Path("/sys") if devnodes is None else devnodes
        self.inventory: dict[str, UsbDevice] = {}
        #: more devices than the kernel's (remote ones: vmplug.remote.inventory)
        self.sources: list[DeviceSource] = []
        self.vms: dict[str, VmBackend] = {}
        self.observed: dict[str, dict[str, Attachment]] = {}
        self.overrides: dict[str, str | None] = {}
        self.retries: dict[tuple[str, str], Retry] = {}
        self.stats = Stats()
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self._bind_times: dict[str, float] = {}
        #: host events waiting for _pump (None: an overflow, rescan)
        self._host_queue: deque[HostEvent | None] = deque()
        self._host_ready = asyncio.Event()
        self._wanted_now = False
        #: one reconcile pass at a time (the loop's and the pump's)
        self._pass_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._converged = asyncio.Event()
        #: qemu id -> identity of devices that left, so their detach names them
        self._gone: dict[str, str] = {}
        #: ports read while in flux (sysfs.read_device said None) -> tries so far
        self._unsettled: dict[str, int] = {}
        #: detaches vmplug asked for, so a DEVICE_DELETED for them is no loss
        self._detaching: set[tuple[str, str]] = set()
        #: called after every reconcile pass with (seconds it took, actions tried)
        self.pass_listeners: list[PassListener] = []
        #: called with "reloading"/"reloaded" around a SIGHUP reload and "stopping"
        #: when stop() begins (vmplug.daemon.notify tells systemd)
        self.lifecycle_listeners: list[Callable[[str], None]] = []
        self._last_pass_actions = 0
        #: wanted(): id(device) -> (device, its attachment), valid for _wanted_key
        self._wanted_memo: dict[int, tuple[UsbDevice, Attachment | None]] = {}
        self._wanted_key: tuple[Config, tuple[tuple[str, str | None], ...]] | None = None
        #: VM name -> observe() failures in a row (the retry backs off)
        self._observe_failures: dict[str, int] = {}
        #: the kernel log the healer reads for port errors (None: none)
        self.kernel_log: Path | None = Path("/dev/kmsg") if self.devnodes else None
        #: the healing ladder and the alerts (vmplug.daemon.heal), while running
        self.remedies: Remedies | None = None
        #: port -> the device last read there before it left: a replug's guess
        #: of which device (identity, QEMU id) comes back (see _attach_early)
        self._left: dict[str, UsbDevice] = {}
        #: the rules as far as a uevent answers them, for self.config
        self._early_rules: EarlyRules | None = None
        #: set once start() has read the tree (observations wait for it)
        self._inventory_ready = asyncio.Event()

    # -- small helpers ------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def store(self) -> Store | None:
        """The history database, or None."""
        return self.journal.store

    @property
    def listeners(self) -> list[Listener]:
        """Called with every event and action as it is recorded (the API's event
        stream, the metrics); a listener that raises is logged and kept."""
        return self.journal.listeners

    def _identity_of(self, qemu_id: str) -> str | None:
        # A QEMU id is a digest of one identity: a device that left names it
        # as well as a present one, without hashing the whole inventory again
        # (a detach after a remove, 500 devices: ~2-3 ms a time).
        gone = self._gone.get(qemu_id)
        if gone is not None:
            return gone
        for dev in self.all_devices():
            if dev.qemu_id == qemu_id:
                return dev.identity
        return self._gone.get(qemu_id)

    def all_devices(self) -> list[UsbDevice]:
        """The kernel's devices, then every source's (remote devices)."""
        out = list(self.inventory.values())
        for src in self.sources:
            out.extend(src.devices())
        return out

    def held_elsewhere(self, dev: UsbDevice) -> str | None:
        """The other VM host holding remote ``dev`` (first come wins), or None."""
        for src in self.sources if dev.host is not None else ():
            holder = src.held_elsewhere(dev)
            if holder is not None:
                return holder
        return None

    def _remote_detach(self, action: Action) -> bool:
        have = self.observed.get(action.vm, {}).get(action.qemu_id)
        return action.kind == "detach" and have is not None and not have.hostbus

    def devices_changed(self, changes: list[tuple[EventKind, UsbDevice]]) -> None:
        """A source's devices came (``device-add``), changed (``device-bind``) or
        went (``device-remove``)."""
        for kind, dev in changes:
            if kind is EventKind.DEVICE_REMOVE:
                self._gone[dev.qemu_id] = dev.identity
                self.journal.event(
                    kind, identity=dev.identity, port=dev.port, detail={"host": dev.host}
                )
                continue
            self._saw(dev, kind, {"host": dev.host})
            vm = target(dev, self.config, self.overrides)
            if kind is EventKind.DEVICE_ADD and vm and dev.qemu_id in self.observed.get(vm, {}):
                # a device host's device already in its VM (vmplug restarted): adopted
                self.journal.action(
                    ActionKind.ADOPT,
                    identity=dev.identity,
                    qemu_id=dev.qemu_id,
                    vm=vm,
                    result=Result.OK,
                )
        self.mark_dirty()

    def mark_dirty(self) -> None:
        self._converged.clear()
        self._dirty.set()

    # -- host side ----------------------------------------------------------

    def rescan(self) -> None:
        self._snapshot(read_devices(self.sysfs_root))

    def _snapshot(self, devices: list[UsbDevice]) -> None:
        """Take a full read of the tree as the inventory, and journal it."""
        self.inventory = {d.port: d for d in devices if not d.is_root_hub}
        self.stats.rescans += 1
        # one transaction for the whole snapshot, not one commit per device
        with self.journal.batch():
            self.journal.event(EventKind.RESCAN, detail={"devices": len(self.inventory)})
            self.journal.seen(
                EventKind.DEVICE_ADD,
                [(d, target(d, self.config, self.overrides)) for d in self.inventory.values()],
            )
        log.info("rescan: %d USB devices", len(self.inventory))
        self._inventory_ready.set()
        self.mark_dirty()

    def _saw(self, dev: UsbDevice, kind: EventKind, detail: dict[str, Any] | None = None) -> None:
        """Remember a present device and record the event, with the VM it is meant for."""
        self.journal.remember(dev)
        self.journal.event(
            kind,
            identity=dev.identity,
            port=dev.port,
            vm=target(dev, self.config, self.overrides),
            detail=detail,
        )

    def on_host_event(self, event: HostEvent) -> None:
        """Queue a uevent; :meth:`_pump` handles them in order."""
        self._host_queue.append(event)
        self._host_ready.set()

    def on_overflow(self) -> None:
        self._host_queue.append(None)  # in order with the events before it
        self._host_ready.set()

    async def _pump(self) -> None:
        """Handle host events in order.  When one makes a device wanted, the
        reconciler acts on it before the next is handled: a device's ``add`` is
        followed by a burst of events (its interfaces, their drivers, its
        ``bind``) whose handling would otherwise come before the device_add.
        Journal writes made meanwhile are held and written after the pass."""
        while True:
            await self._host_ready.wait()
            self._host_ready.clear()
            while self._host_queue:
                item = self._host_queue.popleft()
                self._wanted_now = False
                if item is not None:
                    # the journal is written after the attach, in the same order
                    self.journal.hold()
                try:
                    if item is None:
                        self.journal.event(EventKind.OVERFLOW)
                        self.rescan()
                    else:
                        early = await self._attach_early(item)
                        self._handle_host_event(item, early)
                    if self._wanted_now:
                        async with self._pass_lock:
                            await self.reconcile_once()
                except Exception:
                    log.exception("cannot handle %s", item or "overflow")
                finally:
                    self.journal.release()

    def _handle_host_event(self, event: HostEvent, early: Early | None = None) -> None:
        """Read the device an event names (or forget it) and journal it.  ``early``:
        what :meth:`_attach_early` attached already on this ``add``; journaled
        here, after the device's event, under the identity it was added as."""
        self.stats.events += 1
        try:
            self._handle_read(event, early)
        finally:
            if early is not None:
                self._journal_early(early)
                self.mark_dirty()  # a pass checks it against the device read (or not)

    def _handle_read(self, event: HostEvent, early: Early | None) -> None:
        if event.action in ("add", "bind"):
            dev = read_one(self.sysfs_root, event.devpath or "", event.port)
            if dev is None:
                # Gone again before we looked, or read while the kernel removed
                # it (or had not finished setting it up): a half-read device
                # gives a wrong identity and rule decision, so none at all.
                if event.action == "add":
                    self.journal.event(
                        EventKind.DEVICE_ADD, port=event.port, detail=_event_detail(event)
                    )
                self._look_again(event, device_dir(self.sysfs_root, event.devpath or ""))
                return
            self._unsettled.pop(event.port, None)
            if event.action == "add" and not dev.interfaces and early is None:
                # Several configurations and none chosen yet: the interfaces a
                # rule may ask about are not known before the kernel picks one.
                self.journal.event(
                    EventKind.DEVICE_ADD, port=event.port, detail=_event_detail(event)
                )
                return
            # The kernel announces a device ("add") once it is addressed and
            # described, and its /dev/bus/usb node exists.  Reading its string
            # attributes (serial, names) waits for the device lock the kernel
            # holds while it probes drivers; so does QEMU's open() of the node.
            # Acting on "add" therefore decides the moment the probe lets go,
            # not after the burst of interface events and "bind" behind it has
            # gone through the queue (~0.1-0.5 s under TCG).  "bind" re-reads
            # the device with its drivers.
            known = self.inventory.get(event.port)
            self.inventory[event.port] = dev
            self.inventory = {d.port: d for d in mark_shared_serials(list(self.inventory.values()))}
            dev = self.inventory[event.port]
            if target(dev, self.config, self.overrides) is not None and (
                event.action == "add" or known is None or known.devnum != dev.devnum
            ):
                # only a device that will be attached pops its entry again
                if early is None or early.att.qemu_id != dev.qemu_id:
                    self._bind_times[dev.identity] = time.perf_counter()
                self._wanted_now = True
            if early is not None and (
                early.att.qemu_id != dev.qemu_id
                or target(dev, self.config, self.overrides) != early.att.vm
            ):
                # the guess was wrong (another device of the same kind in the
                # same socket): the pass replaces what was added
                log.warning(
                    "device %s: added early as %s (%s), read as %s: replacing",
                    dev.port, early.att.qemu_id, early.att.identity, dev.identity,
                )  # fmt: skip
                self._wanted_now = True
            log.info(
                "device %s %s %s: %s",
                dev.port, dev.vidpid, _VERB[event.action], _log_name(dev),
                extra={"VMPLUG_PORT": dev.port, "VMPLUG_DEVICE": dev.identity,
                       "VMPLUG_ACTION": event.action},
            )  # fmt: skip
            self._saw(dev, _SAW[event.action], _event_detail(event))
            self.mark_dirty()
        elif event.action == "remove":
            self._unsettled.pop(event.port, None)
            gone = self.inventory.pop(event.port, None)
            if gone is not None:
                self._gone[gone.qemu_id] = gone.identity
                self._left[event.port] = gone
            log.info(
                "device %s removed", event.port,
                extra={"VMPLUG_PORT": event.port, "VMPLUG_ACTION": "remove",
                       "VMPLUG_DEVICE": gone.identity if gone is not None else None},
            )  # fmt: skip
            self.journal.event(
                EventKind.DEVICE_REMOVE,
                identity=gone.identity if gone else None,
                port=event.port,
                detail=_event_detail(event),
            )
            self.mark_dirty()

    # -- the replug fast path -------------------------------------------------

    def early_attachment(self, event: HostEvent) -> Attachment | None:
        """The attachment an ``add`` uevent decides by itself, or None.

        The rules are asked with only what the uevent says (vid:pid from
        PRODUCT, the port from DEVPATH; :class:`~vmplug.engine.desired.EarlyRules`):
        a rule that needs a serial, interfaces or strings leaves it undecided.
        The QEMU id is named after the device's identity, which needs its
        serial: the uevent does not carry it, and sysfs gives it only once the
        kernel's probe lets go of the device.  So the id is the one of the
        device that last left this port, when the new one has the same
        vid:pid:bcdDevice (a replug); it is checked once the device is read,
        and a wrong guess is replaced by the pass.  No guess (a first plug, a
        restarted daemon), an override, or a VM not ready: None, and the
        device is read first as before.
        """
        if event.action != "add" or self.overrides:
            return None
        if event.busnum is None or event.devnum is None or not event.product:
            return None
        prev = self._left.get(event.port)
        if prev is None or prev.is_hub or _product_ids(event.product) != (
            prev.vendor_id, prev.product_id, prev.bcd_device,
        ):  # fmt: skip
            return None
        rules = self._early_rules
        if rules is None or rules.config is not self.config:
            rules = self._early_rules = EarlyRules(self.config)
        assert prev.vendor_id is not None and prev.product_id is not None
        vm = rules.target(prev.vendor_id, prev.product_id, event.port)
        if not isinstance(vm, str):
            return None
        backend = self.vms.get(vm)
        if backend is None or not backend.connected or vm not in self.observed:
            return None
        if any(prev.qemu_id in held for held in self.observed.values()):
            return None  # its old attachment is not gone yet: the pass goes in order
        return Attachment(
            vm=vm,
            qemu_id=prev.qemu_id,
            hostbus=event.busnum,
            hostport=host_port(event.port),
            hostaddr=event.devnum,
            identity=prev.identity,
            port=event.port,
        )

    async def _attach_early(self, event: HostEvent) -> Early | None:
        """device_add at once on a replug's ``add``, as a bare attacher does,
        when :meth:`early_attachment` decides it; the device is read and the
        journal written afterwards.  None: not decided, or QEMU refused (the
        read path then goes on as for any device)."""
        if event.action != "add":
            return None
        t0 = time.perf_counter()
        async with self._pass_lock:
            att = self.early_attachment(event)
            if att is None:
                return None
            if self.devnodes:
                node = _usbfs_node(att.hostbus, att.hostaddr)
                if node is None:
                    return None  # gone again (or not this device): read it first
                spec = UsbHostSpec(
                    hostbus=att.hostbus, hostport=att.hostport, hostaddr=att.hostaddr,
                    hostdevice=node,
                )  # fmt: skip
            else:
                spec = UsbHostSpec(hostbus=att.hostbus, hostport=att.hostport)
                att = dataclasses.replace(att, hostaddr=None)
            t1 = time.perf_counter()
            # the device's burst of uevents waits in the socket meanwhile (see
            # host.events._Reader): the pump would only queue it behind this
            self.source.pause()
            try:
                await self.vms[att.vm].attach(att.qemu_id, spec)
            except VmplugError as exc:
                log.info("%s: early device_add refused (%s); reading the device", att.qemu_id, exc)
                if isinstance(exc, (VmDisconnected, VmTimeout)):
                    self._spawn(self._observe(att.vm))
                return None
            finally:
                self.source.resume()
            t2 = time.perf_counter()
            self.observed.setdefault(att.vm, {})[att.qemu_id] = att
        self.stats.event_to_add.append((att.port, t1 - t0))
        self.stats.event_to_attached.append((att.port, t2 - t0))
        self.stats.actions_ok += 1
        self.retries.pop((att.vm, att.qemu_id), None)
        return Early(att, t2 - t1, t1 - t0, t2 - t0)

    def _journal_early(self, early: Early) -> None:
        att = early.att
        action = Action("attach", att.vm, att.qemu_id, att, reason=f"replug ({att.port}), early")
        log.info(
            "attach %s %s ok in %.1f ms (%s; %.0f ms after the device appeared, "
            "device_add sent after %.1f ms)",
            att.qemu_id, att.vm, early.duration * 1000, action.reason,
            early.latency * 1000, early.decided * 1000,
            extra=_fields(action, att.identity),
        )  # fmt: skip
        self.journal.action(
            ActionKind.ATTACH,
            identity=att.identity,
            qemu_id=att.qemu_id,
            vm=att.vm,
            result=Result.OK,
            duration_s=early.duration,
            attempt=1,
            latency_s=early.latency,
        )

    def _look_again(self, event: HostEvent, path: str) -> None:
        """A device not read as one consistent set: when its directory is still
        there (the read met its setting up or tearing down), read it again a
        little later, a few times; when it is gone, its ``remove`` says the rest."""
        if not os.path.isdir(path):  # noqa: PTH112
            self._unsettled.pop(event.port, None)
            return
        tries = self._unsettled.get(event.port, 0) + 1
        if tries > UNSETTLED_TRIES:
            self._unsettled.pop(event.port, None)
            log.warning("device %s: never read whole in %d tries", event.port, tries - 1)
            return
        self._unsettled[event.port] = tries
        log.info("device %s: changing while read (removed or set up); reading again", event.port)
        # a re-read is no uevent: an "add" journaled its seqnum already (once)
        seqnum = None if event.action == "add" else event.seqnum
        again = dataclasses.replace(event, action="bind", seqnum=seqnum)
        with contextlib.suppress(RuntimeError):  # no loop: a direct call, nothing to come back to
            loop = asyncio.get_running_loop()
            loop.call_later(UNSETTLED_FIRST * 2 ** (tries - 1), self.on_host_event, again)

    # -- VM side ------------------------------------------------------------

    def on_vm_change(self, event: VmEvent) -> None:
        """A backend's :class:`VmEvent`: what to look at again in VM ``event.vm``."""
        vm, kind = event.vm, event.kind
        log.info("vm %s: %s", vm, event, extra={"VMPLUG_VM": vm})
        if kind in (VmEventKind.DISCONNECTED, VmEventKind.SHUTDOWN):
            self.observed.pop(vm, None)
            self.journal.event(EventKind.VM_DOWN, vm=vm, detail={"reason": kind.value})
            self.mark_dirty()
            return
        if kind is VmEventKind.DEVICE_DELETED:
            # one we did not ask to remove is a loss
            dev_id = event.device_id
            if dev_id and (vm, dev_id) not in self._detaching:
                if self.observed.get(vm, {}).pop(dev_id, None) is not None:
                    self.journal.event(
                        EventKind.ATTACHMENT_LOST, identity=self._identity_of(dev_id), vm=vm
                    )
                self.mark_dirty()
            return
        if kind in (VmEventKind.CONNECTED, VmEventKind.RESET):
            up = kind is VmEventKind.CONNECTED
            self.journal.event(EventKind.VM_UP if up else EventKind.VM_RESET, vm=vm)
        self._spawn(self._observe(vm))

    async def _observe(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is None or not vm.connected:
            self.observed.pop(name, None)
            return
        try:
            # only what plan() compares (QmpVm reads it once per session)
            raw = await vm.observe_bindings()
        except VmplugError as exc:
            # nothing else reads this VM again until it sends an event: retry
            attempt = self._observe_failures.get(name, 0) + 1
            self._observe_failures[name] = attempt
            delay = min(RETRY_FIRST * 2 ** (attempt - 1), RETRY_MAX)
            log.warning(
                "vm %s: cannot read its devices (retry in %.1fs): %s", name, delay, exc,
                extra={"VMPLUG_VM": name},
            )  # fmt: skip
            self.observed.pop(name, None)
            self.mark_dirty()
            self._spawn(self._observe_later(name, delay))
            return
        self._observe_failures.pop(name, None)
        if not raw and not self._inventory_ready.is_set() and self._may_attach_to(name):
            # At start, while the tree is read, a VM that holds none of our
            # devices (a fresh QEMU: whatever the rules send it is attached
            # next): the USB bus lookup the first attach needs (3 qom-lists,
            # QEMU CPU) overlaps the read instead of coming after it; the
            # attaches wait for it if it is not done.  A VM holding some is
            # most likely adopted (a restarted daemon): no lookup before an
            # attach needs it.
            prepare = getattr(vm, "prepare_attach", None)
            if prepare is not None:
                self._spawn(prepare())
        await self._inventory_ready.wait()  # at start: adoption needs the devices
        held: dict[str, Attachment] = {}
        for dev_id, obs in raw.items():
            if not dev_id.startswith(ID_PREFIX):
                continue
            held[dev_id] = Attachment(
                vm=name,
                qemu_id=dev_id,
                hostbus=obs.hostbus or 0,
                hostport=obs.hostport or "",
                hostaddr=obs.hostaddr,
                live=obs.attached is not False,  # None: not read
            )
        previous = self.observed.get(name)
        self.observed[name] = held
        if previous is None and held:  # (re)connected: adopt what is already in place
            wanted = {a.qemu_id: a for a in self.wanted() if a.vm == name}
            for dev_id, have in held.items():
                want = wanted.get(dev_id)
                if want is not None and same_binding(have, want):
                    self.journal.action(
                        ActionKind.ADOPT,
                        identity=want.identity,
                        qemu_id=dev_id,
                        vm=name,
                        result=Result.OK,
                    )
        self.mark_dirty()

    def _may_attach_to(self, vm: str) -> bool:
        """A rule or an override can send a device to ``vm``."""
        return any(r.attach == vm for r in self.config.rules) or vm in self.overrides.values()

    async def _start_vm(self, vm: VmConfig) -> None:
        backend = self.vm_factory(vm, self.on_vm_change)
        self.vms[vm.name] = backend
        await backend.start()

    # -- reconciler ---------------------------------------------------------

    def set_route(
        self, config: Config | None = None, overrides: dict[str, str | None] | None = None
    ) -> None:
        """Change the config or overrides; record ``device-route`` for every device whose
        target VM changes, before the reconciler acts on it (health counts no failure)."""
        before = {
            d.identity: target(d, self.config, self.overrides) for d in self.inventory.values()
        }
        if config is not None:
            self.config = config
        if overrides is not None:
            self.overrides = overrides
        for dev in self.inventory.values():
            now = target(dev, self.config, self.overrides)
            if now != before[dev.identity]:
                self.journal.event(
                    EventKind.DEVICE_ROUTE, identity=dev.identity, port=dev.port, vm=now
                )
        self.mark_dirty()

    def override(self, identity: str, vm: str | None) -> None:
        """``vmplug attach``/``detach`` while running: the device ``identity`` goes
        to ``vm`` (None: stays on the host) whatever the rules say, until the
        daemon stops."""
        self.set_route(overrides={**self.overrides, identity: vm})

    async def _observe_later(self, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if name not in self.observed:  # an event may have read it meanwhile
            await self._observe(name)

    def wanted(self) -> frozenset[Attachment]:
        """desired() of the inventory, matching the rules again only for devices
        that changed since the last pass (a UsbDevice is immutable: a device read
        again is a new object).  500 devices x 20 rules cost ~6 ms a pass."""
        key = (self.config, tuple(self.overrides.items()))
        if self._wanted_key is None or (
            self._wanted_key[0] is not key[0] or self._wanted_key[1] != key[1]
        ):
            self._wanted_memo.clear()
            self._wanted_key = key
        memo = self._wanted_memo
        out: list[Attachment] = []
        devices = self.all_devices() if self.sources else self.inventory.values()
        for dev in devices:
            if dev.host is not None and self.held_elsewhere(dev) is not None:
                continue  # another VM host holds it: first come wins
            hit = memo.get(id(dev))
            if hit is None or hit[0] is not dev:
                hit = (dev, next(iter(desired((dev,), self.config, self.overrides)), None))
                memo[id(dev)] = hit
            if hit[1] is not None:
                out.append(hit[1])
        if len(memo) > 2 * len(self.inventory) + 64:
            live = {id(d) for d in devices}
            for stale in [k for k in memo if k not in live]:
                del memo[stale]
        return frozenset(out)

    async def reconcile_once(self) -> list[Action]:
        """One pass: diff and act.  Returns the actions it tried."""
        self.stats.passes += 1
        t0 = time.perf_counter()
        try:
            return await self._reconcile_pass()
        finally:
            if self.pass_listeners:
                elapsed = time.perf_counter() - t0
                for listener in list(self.pass_listeners):
                    try:
                        listener(elapsed, self._last_pass_actions)
                    except Exception:
                        log.exception("pass listener failed")

    async def _reconcile_pass(self) -> list[Action]:
        reachable = [n for n, vm in self.vms.items() if vm.connected and n in self.observed]
        actions = plan(self.wanted(), self.observed, reachable)
        if any(not src.settled() for src in self.sources):
            # a source that has not answered yet (a device host at start): its
            # usb-redir devices in the VMs are kept until it has said what it has
            actions = [a for a in actions if not self._remote_detach(a)]
        self._last_pass_actions = 0
        keys = {(a.vm, a.qemu_id) for a in actions}
        for stale in [k for k in self.retries if k not in keys]:
            del self.retries[stale]
        now = time.monotonic()
        due = [
            a for a in actions if self.retries.get((a.vm, a.qemu_id), Retry(0, 0, "")).due <= now
        ]
        detaches = [a for a in due if a.kind == "detach"]
        attaches = [a for a in due if a.kind == "attach"]
        # a pass of many actions journals them in one transaction, after them
        # (500 commits are ~0.15-0.5 s of SQLite); the pump holds already
        own = len(due) > 1 and not self.journal.holding
        if own:
            self.journal.hold()
        try:
            if detaches:
                await asyncio.gather(*(self._act(a) for a in detaches))
            if attaches:
                await asyncio.gather(*(self._act(a) for a in attaches))
        finally:
            if own:
                self._release_batched()
        self._last_pass_actions = len(due)
        if due:
            self.mark_dirty()  # look again: only a pass with nothing to do proves convergence
        elif not actions and all(n in self.observed for n in self.config.vms):
            # converged: every VM of the config read, and nothing left to do
            self._converged.set()
        return due

    def _release_batched(self) -> None:
        try:
            with self.journal.batch():
                self.journal.release()
        except Exception:
            log.exception("cannot write the journal in one transaction")
            self.journal.release()  # what is still held, one by one

    async def _act(self, action: Action) -> None:
        vm = self.vms[action.vm]
        key = (action.vm, action.qemu_id)
        att = action.attachment
        identity = att.identity if att else self._identity_of(action.qemu_id)
        attempt = self.retries[key].attempt + 1 if key in self.retries else 1
        t0 = time.perf_counter()
        bound_at: float | None = None
        try:
            if action.kind == "attach" and att is not None:
                bound = bound_at = self._bind_times.pop(att.identity, None)
                if bound is not None:
                    self.stats.event_to_add.append((att.port, t0 - bound))
                att = await self._attach(vm, action.qemu_id, att)
                if bound is not None:
                    self.stats.event_to_attached.append((att.port, time.perf_counter() - bound))
                self.observed.setdefault(action.vm, {})[action.qemu_id] = att
            else:
                self._detaching.add(key)
                try:
                    await vm.detach(action.qemu_id)
                finally:
                    self._detaching.discard(key)
                self.observed.get(action.vm, {}).pop(action.qemu_id, None)
        except VmplugError as exc:
            delay = min(RETRY_FIRST * 2 ** (attempt - 1), RETRY_MAX) * random.uniform(0.8, 1.2)  # noqa: S311
            self.retries[key] = Retry(attempt, time.monotonic() + delay, str(exc))
            self.stats.actions_failed += 1
            log.warning(
                "%s %s %s failed (attempt %d, retry in %.1fs): %s",
                action.kind, action.qemu_id, action.vm, attempt, delay, exc,
                extra=_fields(action, identity),
            )  # fmt: skip
            self.journal.action(
                ActionKind(action.kind),
                identity=identity,
                qemu_id=action.qemu_id,
                vm=action.vm,
                result=Result.ERROR,
                error_class=getattr(exc, "qmp_class", None) or type(exc).__name__,
                error_message=str(exc),
                duration_s=time.perf_counter() - t0,
                attempt=attempt,
            )
            self._spawn(self._observe(action.vm))
            return
        self.retries.pop(key, None)
        self.stats.actions_ok += 1
        elapsed = time.perf_counter() - t0
        latency = (
            self.stats.event_to_attached[-1][1]
            if bound_at is not None and self.stats.event_to_attached
            else None
        )
        since = (
            f"; {latency * 1000:.0f} ms after the device appeared, "
            f"device_add sent after {(t0 - bound_at) * 1000:.0f} ms"
            if latency is not None and bound_at is not None
            else ""
        )
        log.info(
            "%s %s %s ok in %.1f ms (%s%s)",
            action.kind, action.qemu_id, action.vm, elapsed * 1000, action.reason, since,
            extra=_fields(action, identity),
        )  # fmt: skip
        self.journal.action(
            ActionKind(action.kind),
            identity=identity,
            qemu_id=action.qemu_id,
            vm=action.vm,
            result=Result.OK,
            duration_s=elapsed,
            attempt=attempt,
            latency_s=latency,
        )

    def devnode(self, att: Attachment) -> str | None:
        """The usbfs node of the device ``att`` wants, when QEMU can be given it:
        only for the live kernel's devices (a captured or replayed tree has no
        nodes) and only when the node is that device (its dev_t is the one sysfs
        shows for the port now)."""
        if not self.devnodes or att.hostaddr is None:
            return None
        dev = self.inventory.get(att.port)
        if dev is None or dev.sysfs_path is None:
            return None
        path = f"/dev/bus/usb/{att.hostbus:03d}/{att.hostaddr:03d}"
        try:
            with open(os.path.join(dev.sysfs_path, "dev")) as f:  # noqa: PTH118
                major, _, minor = f.read().strip().partition(":")
            st = os.stat(path)  # noqa: PTH116
        except (OSError, ValueError):
            return None
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(int(major), int(minor)):
            return None
        return path

    async def _attach(self, vm: VmBackend, dev_id: str, att: Attachment) -> Attachment:
        """device_add the device; return what QEMU holds now.

        A present device goes by its node: QEMU opens it at once (see
        :mod:`vmplug.engine.desired`).  When QEMU refuses the node (gone again
        in between, no permission, a QEMU without ``hostdevice``), the port
        form follows at once, and QEMU's own scan takes the device when it can.
        A remote device is a ``usb-redir`` to its device host's endpoint.
        """
        for src in self.sources:
            remote = src.attach_spec(dev_id)
            if remote is not None:
                await vm.attach(dev_id, remote)
                return att
        by_port = UsbHostSpec(hostbus=att.hostbus, hostport=att.hostport)
        node = self.devnode(att)
        if node is not None:
            spec = dataclasses.replace(by_port, hostaddr=att.hostaddr, hostdevice=node)
            try:
                await vm.attach(dev_id, spec)
            except VmplugError as exc:
                # Only a refusal QEMU answered: a lost or silent QEMU is retried as usual.
                if isinstance(exc, (VmDisconnected, VmTimeout)) or not getattr(
                    exc, "qmp_class", None
                ):
                    raise
                log.info("%s: QEMU refused %s (%s); attaching by port", dev_id, node, exc)
            else:
                return att
        await vm.attach(dev_id, by_port)
        return dataclasses.replace(att, hostaddr=None)

    def _next_timeout(self) -> float | None:
        if not self.retries:
            return None
        return max(0.0, min(r.due for r in self.retries.values()) - time.monotonic())

    async def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            timeout = self._next_timeout()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            if self._stopping.is_set():
                return
            self._dirty.clear()
            try:
                async with self._pass_lock:
                    await self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed")
                await asyncio.sleep(RETRY_FIRST)
                self.mark_dirty()

    async def wait_converged(self, timeout: float) -> bool:
        """Until a pass found nothing to do (for tests, benchmarks and the API)."""
        try:
            await asyncio.wait_for(self._converged.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- config -------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config file; an invalid one is refused and the old one stays."""
        try:
            new = load_config(self.config_path)
        except VmplugError as exc:
            message = exc.render()
            log.error(
                "reload refused, keeping the running config: %s", message,
                extra={"VMPLUG_ACTION": "reload"},
            )  # fmt: skip
            self.journal.event(EventKind.CONFIG_RELOAD, detail={"ok": False, "error": message})
            return False, message
        old = self.config
        self.journal.event(EventKind.CONFIG_RELOAD, detail={"ok": True, "rules": len(new.rules)})
        self.set_route(config=new)
        for name in sorted(set(old.vms) - set(new.vms)):
            backend = self.vms.pop(name)
            self.observed.pop(name, None)
            await backend.stop()
        for name in sorted(new.vms):
            if name not in old.vms:
                await self._start_vm(new.vms[name])
            elif old.vms[name] != new.vms[name]:
                await self.vms.pop(name).stop()
                self.observed.pop(name, None)
                await self._start_vm(new.vms[name])
        log.info(
            "config reloaded: %d VMs, %d rules", len(new.vms), len(new.rules),
            extra={"VMPLUG_ACTION": "reload"},
        )  # fmt: skip
        self.mark_dirty()
        return True, f"reloaded: {len(new.vms)} VMs, {len(new.rules)} rules"

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        self.journal.event(EventKind.DAEMON_START, detail={"pid": os.getpid()})
        log.info(
            "vmplug daemon starting (pid %d), events: %s", os.getpid(), self.source.description
        )
        # Events queue from here on; the pump handles them after the first read.
        self.source.start(self.on_host_event, self.on_overflow)
        # The VMs connect and are observed (QEMU's work, in QEMU) while the
        # tree is read in a thread; what they hold is compared after the read.
        for vm in self.config.vms.values():
            await self._start_vm(vm)
        self._snapshot(await asyncio.to_thread(read_devices, self.sysfs_root))
        self._spawn(self._pump())
        for src in self.sources:
            await src.start()
        self._spawn(self._reconcile_loop())
        self.remedies = Remedies(self, self.kernel_log)
        self.remedies.start()

    def _tell(self, what: str) -> None:
        for listener in list(self.lifecycle_listeners):
            try:
                listener(what)
            except Exception:
                log.exception("life cycle listener failed")

    async def _sighup(self) -> None:
        self._tell("reloading")
        try:
            await self.reload()
        finally:
            self._tell("reloaded")

    async def stop(self) -> None:
        self._tell("stopping")
        self._stopping.set()
        self._dirty.set()
        self.source.stop()
        for src in self.sources:
            await src.stop()
        if self.remedies is not None:
            await self.remedies.stop()
            self.remedies = None
        if self.detach_on_exit:
            for name, held in list(self.observed.items()):
                for dev_id in list(held):
                    with contextlib.suppress(VmplugError):
                        await self.vms[name].detach(dev_id)
        for backend in list(self.vms.values()):
            with contextlib.suppress(Exception):
                await backend.stop()
        await cancel_and_wait(list(self._tasks))
        self.journal.event(EventKind.DAEMON_STOP)
        log.info("vmplug daemon stopped")

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._sighup()))
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    # -- views --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` (:meth:`ReadModel.status`)."""
        return self.view.status()


@dataclass(frozen=True, slots=True)
class Early:
    """A device_add sent on a replug's ``add`` before the device was read."""

    att: Attachment
    duration: float  # device_add sent -> answered
    decided: float  # event -> device_add sent
    latency: float  # event -> answered


#: the kernel's char major of usb_device nodes (include/linux/usb.h USB_DEVICE_MAJOR)
USB_DEVICE_MAJOR = 189


def _usbfs_node(bus: int, devnum: int | None) -> str | None:
    """/dev/bus/usb/BBB/DDD when it is that device's node: its dev_t is the
    one the kernel gives bus ``bus`` device ``devnum`` (drivers/usb/core/usb.c:
    minor = (busnum - 1) * 128 + devnum - 1), no sysfs read needed."""
    if devnum is None:
        return None
    path = f"/dev/bus/usb/{bus:03d}/{devnum:03d}"
    try:
        st = os.stat(path)  # noqa: PTH116
    except OSError:
        return None
    want = os.makedev(USB_DEVICE_MAJOR, (bus - 1) * 128 + devnum - 1)
    return path if stat.S_ISCHR(st.st_mode) and st.st_rdev == want else None


def _product_ids(product: str) -> tuple[int, int, int] | None:
    """The uevent's PRODUCT ("627/1/0", hex, no padding) as (vid, pid, bcdDevice)."""
    try:
        vid, pid, bcd = (int(x, 16) for x in product.split("/"))
    except ValueError:
        return None
    return vid, pid, bcd


_VERB = {"add": "added", "bind": "bound"}
_SAW = {"add": EventKind.DEVICE_ADD, "bind": EventKind.DEVICE_BIND}


def _log_name(dev: UsbDevice) -> str:
    """Maker and product as the device gives them, for the log ("?": none)."""
    return " ".join(p for p in (dev.display_manufacturer, dev.display_product) if p) or "?"


def _fields(action: Action, identity: str | None) -> dict[str, Any]:
    """journald fields of a log line about an action (``journalctl VMPLUG_VM=...``)."""
    port = action.attachment.port if action.attachment else None
    return {
        "VMPLUG_VM": action.vm,
        "VMPLUG_ACTION": action.kind,
        "VMPLUG_DEVICE": identity,
        "VMPLUG_PORT": port,
    }


def _event_detail(event: HostEvent) -> dict[str, Any]:
    return {
        k: v
        for k, v in dataclasses.asdict(event).items()
        if v is not None and k in ("busnum", "devnum", "product", "seqnum")
    }
