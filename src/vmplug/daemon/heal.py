"""Self-healing: the ladder vmplug climbs for a device a rule sends to a VM.

Two halves:

* :func:`decide` is pure: from the journal (the same
  :class:`~vmplug.history.store.HistoryEntry` rows the history, the API and
  the health figures read), the device's identity and port, a
  :class:`HealPolicy` and the time, it says which rung to try next and why,
  or nothing.  The tests feed it journals a real daemon wrote.
* :class:`Healer` is the edge: a journal listener that notices triggers,
  asks :func:`decide`, carries the rung out (:mod:`vmplug.host.usbctl`, the
  VM backend) and journals it as ``heal`` / ``heal-failed`` with the reason.

The ladder (one rung at a time, the next only when the last did not help):

1. ``reattach`` -- detach the device from its VM (when QEMU holds it) and let
   the reconciler attach it again now, without waiting for its backoff;
2. ``reset`` -- ``USBDEVFS_RESET`` on its node; when QEMU holds the device it
   is detached first (QEMU's claim would be broken under it) and re-attached by
   the reconciler after the reset;
3. ``port-cycle`` -- its hub port's ``disable`` set and cleared (a real
   power cut only on hubs with per-port power switching, see
   :mod:`vmplug.host.usbctl`).  Skipped, and the skip journaled with the
   next rung, when the hub's descriptor says it has no per-port power
   switching (:class:`HubPower`): there the port keeps its power, and on
   some hubs the device never comes back (measured in the lab guest, Linux
   6.1 under QEMU 7.2: on EHCI's root hub the kernel disconnects the device,
   clears the connect change, and nothing enumerates it again until the hub
   is rebound -- which takes every device on it; on QEMU's usb-hub, which
   claims no switching too, it came back with a new address; on a usb-hub
   with ``port-power=on``, which claims per-port switching, the port's
   power was read off and the device came back);
4. ``reauthorize`` -- its ``authorized`` set to 0 and back to 1.

5. ``controller`` -- the host controller unbound from its driver and bound
   again: never, unless ``[heal] controllers`` names that controller's PCI
   address; otherwise the ladder ends after rung 4 (``Status.refused`` says so).

Triggers (counted since the last rung, so each rung is given its chance):
``attach_refusals`` attach errors in a row, any ``kernel-error`` on its port,
``drops`` removals or losses within ``drops_window_s``, a ``guest-problem``
(the guest agent's probe: a Linux guest whose driver did not bind, a Windows
problem code).  A rung is judged after ``settle_s``: when the device is
attached again and no new trigger came, the episode ends (the next trouble
starts at rung 1 again).  Rungs of one device are spaced by ``interval_s``
doubling per rung (capped at ``max_interval_s``) and at most ``max_per_hour``
of them.  ``heal = false`` on a rule or a VM turns it off for its devices,
``dry_run`` journals what it would do and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmplug.engine.desired import target
from vmplug.engine.remedy import LADDER, HealPolicy, Rung, parse_policy
from vmplug.history.store import ActionKind, EventKind, HistoryEntry, Result
from vmplug.host import usbctl

if TYPE_CHECKING:
    from vmplug.daemon.reconciler import Daemon

log = logging.getLogger("vmplug")


@dataclass(frozen=True, slots=True)
class Decision:
    identity: str
    rung: Rung
    reason: str
    #: which attempt of the ladder this is in the episode (1 = first rung)
    step: int
    #: rungs of the ladder passed over to reach this one: (rung, why)
    skipped: tuple[tuple[Rung, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HubPower:
    """What the hub a device hangs from says of its ports' power: its kernel
    name (``usb1``, ``2-2.4``) and ``wHubCharacteristics``' claim
    (:func:`vmplug.host.usbctl.power_switching`: ``per-port``, ``ganged``,
    ``none``).  Read by the edge, given to :func:`decide` as data."""

    hub: str
    switching: str


@dataclass(frozen=True, slots=True)
class Status:
    """What :func:`decide` found, also when it decides nothing."""

    decision: Decision | None
    #: why nothing: "healthy", "waiting", "rate-limited", "exhausted", "no-trigger"
    why: str
    trigger: str | None = None
    #: a rung the ladder would climb to and may not (the controller, not allowed)
    refused: str | None = None


#: journal kind the guest-agent probe writes (vmplug.history.store.EventKind.GUEST_PROBLEM)
GUEST_PROBLEM = "guest-problem"


def controller_rung(policy: HealPolicy, controller: str | None) -> str | None:
    """None when the controller rung may follow the ladder for a device on
    ``controller`` (a PCI address); else why not."""
    if controller is None:
        return "its controller is not on PCI (or not known): never reset"
    if controller not in policy.controllers:
        return f"controller {controller} is not in [heal] controllers: never reset"
    return None


def port_cycle_rung(hub: HubPower | None) -> str | None:
    """None when the port-cycle rung may be used on a port of ``hub`` (its
    power is switched per port, or it is not known); else why not."""
    if hub is None or hub.switching == "per-port":
        return None
    return (
        f"hub {hub.hub} has no per-port power switching ({hub.switching}): port-cycle cuts "
        "no power there and may strand the device"
    )


def _is_heal(e: HistoryEntry) -> bool:
    return not e.is_action and e.kind in (EventKind.HEAL, EventKind.HEAL_FAILED)


def decide(
    entries: Iterable[HistoryEntry],
    identity: str,
    port: str | None,
    policy: HealPolicy,
    now: float,
    controller: str | None = None,
    hub: HubPower | None = None,
) -> Status:
    """The next rung for ``identity`` (on ``port``, its host controller at PCI
    address ``controller``, its hub's power switching ``hub``), from the
    journal up to ``now``."""
    mine: list[HistoryEntry] = []
    for e in entries:
        if e.ts > now:  # held writes: the id order may differ a little from ts order
            continue
        if e.identity == identity or (
            e.kind == EventKind.KERNEL_ERROR and port is not None and e.port == port
        ):
            mine.append(e)
    heals = [e for e in mine if _is_heal(e)]
    # the episode: heals since the last one that was followed by a settled recovery
    episode: list[HistoryEntry] = []
    for h in heals:
        if episode and _recovered_after(mine, episode[-1], policy, h.ts):
            episode = []
        episode.append(h)
    if episode and _recovered_after(mine, episode[-1], policy, now):
        episode = []
    # a trigger is answered by the rung after it: only what came since the last rung counts
    since = heals[-1].ts if heals else float("-inf")
    trigger = _trigger(mine, since, policy, now)
    if trigger is None:
        return Status(None, "healthy" if not episode else "no-trigger")
    step = len(episode)
    ladder = policy.rungs
    refused = controller_rung(policy, controller)
    if refused is None:
        ladder = (*ladder, Rung.CONTROLLER)
    left_out = {Rung.PORT_CYCLE: why} if (why := port_cycle_rung(hub)) else {}
    rungs = tuple(r for r in ladder if r not in left_out)
    if step >= len(rungs):
        return Status(None, "exhausted", trigger, refused)
    if episode:
        wait = min(policy.interval_s * 2 ** (step - 1), policy.max_interval_s)
        if now - episode[-1].ts < wait:
            return Status(None, "waiting", trigger)
    if sum(1 for h in heals if now - h.ts < 3600.0) >= policy.max_per_hour:
        return Status(None, "rate-limited", trigger)
    rung = rungs[step]
    # the rungs left out between the last one climbed and this one
    lo = ladder.index(rungs[step - 1]) + 1 if step else 0
    skipped = tuple((r, left_out[r]) for r in ladder[lo : ladder.index(rung)] if r in left_out)
    return Status(Decision(identity, rung, trigger, step + 1, skipped), "act", trigger)


def _recovered_after(
    mine: Sequence[HistoryEntry], heal: HistoryEntry, policy: HealPolicy, until: float
) -> bool:
    """After ``heal`` (and before ``until``: the next rung, or now) the device
    was attached and stayed so, with no trigger, for ``settle_s``: the rung
    worked.  Trouble that comes later is a new episode, from rung 1."""
    up_at: float | None = None
    for e in mine:
        if e.ts <= heal.ts or _is_heal(e):
            continue
        if e.ts > until:
            break
        if e.is_action and e.kind in (ActionKind.ATTACH, ActionKind.ADOPT):
            if e.result == Result.OK and up_at is None:
                up_at = e.ts
            elif e.result == Result.ERROR:
                if up_at is not None and e.ts - up_at >= policy.settle_s:
                    return True
                up_at = None
        elif e.kind in (
            EventKind.DEVICE_REMOVE, EventKind.ATTACHMENT_LOST, EventKind.KERNEL_ERROR,
            GUEST_PROBLEM,
        ):  # fmt: skip
            if up_at is not None and e.ts - up_at >= policy.settle_s:
                return True
            up_at = None
    return up_at is not None and until - up_at >= policy.settle_s


def _trigger(
    mine: Sequence[HistoryEntry], since: float, policy: HealPolicy, now: float
) -> str | None:
    refusals = 0
    drops: list[float] = []
    kernel: str | None = None
    guest: str | None = None
    attached = False
    for e in mine:
        if e.ts <= since or _is_heal(e):
            continue
        if e.is_action and e.kind == ActionKind.ATTACH:
            if e.result == Result.ERROR:
                refusals += 1
                attached = False
            else:
                refusals, attached = 0, True
        elif e.is_action and e.kind == ActionKind.ADOPT and e.result == Result.OK:
            refusals, attached = 0, True
        elif e.kind in (EventKind.DEVICE_REMOVE, EventKind.ATTACHMENT_LOST):
            attached = False
            if now - e.ts <= policy.drops_window_s:
                drops.append(e.ts)
        elif e.kind == EventKind.KERNEL_ERROR:
            msg = (e.detail or {}).get("message", "")
            kernel = f"kernel: {msg}" if msg else "kernel error on its port"
        elif e.kind == GUEST_PROBLEM:
            d = e.detail or {}
            what = d.get("message") or d.get("problem") or "a problem"
            guest = f"guest {e.vm or '?'}: {what}"
        elif e.kind in (EventKind.DEVICE_ADD, EventKind.DEVICE_BIND):
            kernel = None if attached else kernel
    if refusals >= policy.attach_refusals:
        return f"attach refused {refusals} times in a row"
    if len(drops) >= policy.drops:
        return f"dropped {len(drops)} times in {policy.drops_window_s / 60:g} min"
    return kernel or guest


# ---------------------------------------------------------------- kernel log

#: (pattern name, regex with the kernel's device name as group 1)
KERNEL_ERRORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("descriptor-read", re.compile(r"usb (\S+): device descriptor read/\S+, error -\d+")),
    ("not-accepting-address", re.compile(r"usb (\S+): device not accepting address")),
    ("cannot-enumerate", re.compile(r"usb (\S+): unable to enumerate USB device")),
    ("over-current", re.compile(r"usb (\S+): over-current condition")),
    ("error-71", re.compile(r"usb (\S+): .*error -71\b")),
    ("error-110", re.compile(r"usb (\S+): .*error -110\b")),
)
_ROOT_PORT = re.compile(r"^usb(\d+)-port(\d+)$")


def parse_kernel_line(line: str) -> tuple[str, str, str] | None:
    """A kernel log line (``/dev/kmsg`` record or ``dmesg`` line) to (port,
    pattern, message), or None when it is no USB error vmplug acts on."""
    text = line.split(";", 1)[1] if ";" in line.split(" ", 1)[0] else line
    text = text.strip()
    for name, pat in KERNEL_ERRORS:
        m = pat.search(text)
        if m:
            port = m.group(1)
            root = _ROOT_PORT.match(port)
            if root:  # "usb2-port1": the port of a root hub
                port = f"{root.group(1)}-{root.group(2)}"
            return port, name, text[m.start() :]
    return None


class KernelLog:
    """Reads kernel log records from ``path`` (``/dev/kmsg``, from its end; a
    FIFO in the tests) without blocking the loop, and calls ``on_line``.

    Read when the healer ticks (:meth:`read`), not whenever a record arrives:
    a replug logs several records while the kernel probes the device (~5 reads
    per replug in the lab guest), and waking
    for each (a loop pass and a read each) took CPU from the replug's
    device_add on a one-CPU machine; the ladder acts in seconds, so a record
    read up to a tick later changes nothing.  The kernel keeps them (an
    overrun is EPIPE, skipped)."""

    def __init__(self, path: Path, on_line: Callable[[str], None]) -> None:
        self.path = path
        self.on_line = on_line
        self._fd: int | None = None
        self._buf = b""

    def start(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("heal: cannot read the kernel log %s: %s", self.path, exc.strerror)
            return
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_END)  # /dev/kmsg: only records from now on
        self._fd = fd

    def read(self) -> None:
        """Every record logged since the last read."""
        if self._fd is None:
            return
        while True:
            try:
                chunk = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # /dev/kmsg records overwritten before we read them
                    continue
                log.warning(
                    "heal: cannot read the kernel log %s: %s; no longer reading it",
                    self.path, exc.strerror,
                )  # fmt: skip
                self.stop()  # warned once, not at every tick
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for raw in lines:
                self.on_line(raw.decode("utf-8", "replace"))

    def stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- the edge


#: entries that start watching a device (with any action error)
_WATCH = frozenset(
    {EventKind.DEVICE_REMOVE, EventKind.ATTACHMENT_LOST, EventKind.KERNEL_ERROR,
     EventKind.HEAL, EventKind.HEAL_FAILED, GUEST_PROBLEM}
)  # fmt: skip


def _entry(n: int, item: Mapping[str, Any]) -> HistoryEntry:
    """A journal listener's item as the store would give it back."""
    return HistoryEntry(
        id=n,
        ts=float(item.get("ts", time.time())),
        entry=str(item.get("type", "event")),
        kind=str(item.get("kind", "")),
        identity=item.get("identity"),
        vm=item.get("vm"),
        port=item.get("port"),
        qemu_id=item.get("qemu_id"),
        result=item.get("result"),
        error_class=item.get("error_class"),
        error_message=item.get("error_message"),
        attempt=item.get("attempt"),
        detail=item.get("detail"),
    )


class Healer:
    """Listens to the daemon's journal and climbs the ladder for its devices."""

    def __init__(
        self,
        daemon: Daemon,
        policy: HealPolicy,
        *,
        kernel_log: Path | None = None,
        dev_root: Path = Path("/dev"),
        tick_s: float = 0.5,
    ) -> None:
        self.daemon = daemon
        self.policy = policy
        self.dev_root = dev_root
        self.tick_s = tick_s
        #: each device's recent journal entries (the listener's copy, 2,000 a device)
        self.recent: dict[str, deque[HistoryEntry]] = {}
        #: devices with a trigger or an open episode: the only ones each tick looks at
        self.watch: set[str] = set()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._busy: set[str] = set()
        self.kernel = KernelLog(kernel_log, self._kernel_line) if kernel_log else None
        #: rungs carried out (or said, in dry-run), for tests and status
        self.done: list[tuple[Decision, bool, str | None]] = []
        #: hub kernel name -> its power switching (None: not readable), read once
        self._hubs: dict[str, HubPower | None] = {}
        #: port -> the identity of the device last journaled there (a kernel error
        #: on a port whose device has left, or is not read yet, is its)
        self._last_at: dict[str, str] = {}

    # -- journal in ---------------------------------------------------------

    def on_item(self, item: Mapping[str, Any]) -> None:
        identity = item.get("identity")
        if not identity:
            return
        rows = self.recent.get(identity)
        if rows is None:
            if len(self.recent) > 4096:  # forget devices long gone, not watched
                present = {d.identity for d in self.daemon.inventory.values()}
                for old in [k for k in self.recent if k not in present and k not in self.watch]:
                    del self.recent[old]
            rows = self.recent[identity] = deque(maxlen=2000)
        entry = _entry(next(self._ids), item)
        rows.append(entry)
        if entry.port:
            self._last_at[entry.port] = identity
        if entry.kind == EventKind.DEVICE_REMOVE and entry.port in self._hubs:
            del self._hubs[entry.port]  # a hub that left: the next one there is read anew
        if entry.kind in _WATCH or entry.result == Result.ERROR:
            self.watch.add(identity)

    def _kernel_line(self, line: str) -> None:
        hit = parse_kernel_line(line)
        if hit is None:
            return
        port, pattern, message = hit
        dev = self.daemon.inventory.get(port)
        # the kernel logs most of these while the device is being (re-)enumerated:
        # it is not in the inventory then, the device last seen on the port is meant
        identity = dev.identity if dev else self._last_at.get(port)
        log.warning("heal: kernel error on %s (%s): %s", port, identity or "no device", message)
        self.daemon.journal.event(
            EventKind.KERNEL_ERROR,
            identity=identity,
            port=port,
            detail={"pattern": pattern, "message": message, "present": dev is not None},
        )

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self.daemon.listeners.append(self.on_item)
        if self.kernel is not None:
            self.kernel.start()
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self.on_item in self.daemon.listeners:
            self.daemon.listeners.remove(self.on_item)
        if self.kernel is not None:
            self.kernel.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                if self.kernel is not None:
                    self.kernel.read()
                await self.tick()
            except Exception:
                log.exception("heal: pass failed")

    # -- deciding -----------------------------------------------------------

    def allowed(self, identity: str) -> tuple[bool, str]:
        """A device may be touched only while a rule sends it to a VM that does
        not say ``heal = false`` (nor its rule)."""
        d = self.daemon
        dev = next((x for x in d.inventory.values() if x.identity == identity), None)
        if dev is None:
            return False, "not present"
        vm = target(dev, d.config, d.overrides)
        if vm is None:
            return False, "no rule sends it to a VM"
        rule = d.config.decide(dev)
        if rule is not None and not getattr(rule, "heal", True):
            return False, "heal = false on its rule"
        vmc = d.config.vms.get(vm)
        if vmc is not None and not getattr(vmc, "heal", True):
            return False, f"heal = false on VM {vm}"
        return True, vm

    async def tick(self) -> list[Decision]:
        if not self.policy.enabled:
            return []
        now = time.time()
        made: list[Decision] = []
        by_identity = {d.identity: d for d in self.daemon.inventory.values()}
        for identity in list(self.watch):
            dev = by_identity.get(identity)
            if dev is None or dev.identity in self._busy:
                continue
            ok, _ = self.allowed(dev.identity)
            if not ok:
                continue
            rows = self.recent.get(identity, ())
            hub = await self.hub_power(dev.port)
            status = decide(rows, dev.identity, dev.port, self.policy, now, dev.controller, hub)
            if status.why == "healthy":
                self.watch.discard(identity)
            if status.decision is not None:
                made.append(status.decision)
                self._busy.add(dev.identity)
                try:
                    await self.carry_out(status.decision)
                finally:
                    self._busy.discard(dev.identity)
        return made

    async def hub_power(self, port: str) -> HubPower | None:
        """What the hub of ``port`` claims of its power switching (its class
        descriptor, read over usbfs once per hub), or None: not known (no live
        /dev, the hub not readable, the ladder has no port-cycle)."""
        d = self.daemon
        if not d.devnodes or Rung.PORT_CYCLE not in self.policy.rungs:
            return None
        try:
            hub = usbctl.port_of(port).hub
        except usbctl.UsbCtlError:
            return None
        if hub not in self._hubs:
            try:
                claim = await asyncio.to_thread(
                    usbctl.hub_power, Path(d.sysfs_root), hub, self.dev_root
                )
            except usbctl.UsbCtlError as exc:
                log.info("heal: hub %s: its power switching not known: %s", hub, exc)
                self._hubs[hub] = None
            else:
                self._hubs[hub] = HubPower(hub, claim)
        return self._hubs[hub]

    # -- acting -------------------------------------------------------------

    async def carry_out(self, decision: Decision) -> bool:
        d = self.daemon
        dev = next((x for x in d.inventory.values() if x.identity == decision.identity), None)
        allowed, vm = self.allowed(decision.identity)
        detail: dict[str, Any] = {
            "rung": decision.rung.value,
            "reason": decision.reason,
            "step": decision.step,
            "dry_run": self.policy.dry_run,
        }
        if dev is None or not allowed:
            return False
        if decision.skipped:
            detail["skipped"] = [{"rung": r.value, "why": why} for r, why in decision.skipped]
        for r, why in decision.skipped:
            log.warning("heal %s (%s): %s skipped: %s", dev.port, decision.identity, r.value, why)
        log.warning(
            "heal %s (%s): %s%s because %s",
            dev.port, decision.identity, decision.rung.value,
            " (dry run: nothing done)" if self.policy.dry_run else "", decision.reason,
        )  # fmt: skip
        error: str | None = None
        if decision.rung is Rung.CONTROLLER:
            detail["controller"] = dev.controller
        if not self.policy.dry_run:
            try:
                note = await self._do(
                    decision.rung, dev.port, dev.busnum, dev.devnum, dev.qemu_id, vm,
                    dev.controller,
                )  # fmt: skip
                detail.update(note)
            except Exception as exc:  # a rung that fails is journaled, never fatal
                error = str(exc) or type(exc).__name__
        kind = EventKind.HEAL if error is None else EventKind.HEAL_FAILED
        if error is not None:
            detail["error"] = error
            log.warning("heal %s: %s failed: %s", dev.port, decision.rung.value, error)
        d.journal.event(kind, identity=dev.identity, port=dev.port, vm=vm, detail=detail)
        self.done.append((decision, error is None, error))
        d.mark_dirty()
        return error is None

    async def _detach_if_held(self, qemu_id: str, vm: str) -> bool:
        d = self.daemon
        if qemu_id not in d.observed.get(vm, {}):
            return False
        backend = d.vms.get(vm)
        if backend is None:
            return False
        identity = d._identity_of(qemu_id)
        d._detaching.add((vm, qemu_id))  # vmplug asked: no loss
        t0 = time.perf_counter()
        try:
            await backend.detach(qemu_id)
        except Exception as exc:
            d.journal.action(
                ActionKind.DETACH, identity=identity, qemu_id=qemu_id, vm=vm,
                result=Result.ERROR, error_class=type(exc).__name__, error_message=str(exc),
                duration_s=time.perf_counter() - t0,
            )  # fmt: skip
            raise
        finally:
            d._detaching.discard((vm, qemu_id))
        d.observed.get(vm, {}).pop(qemu_id, None)
        d.journal.action(
            ActionKind.DETACH, identity=identity, qemu_id=qemu_id, vm=vm, result=Result.OK,
            duration_s=time.perf_counter() - t0,
        )  # fmt: skip
        return True

    async def _do(
        self, rung: Rung, port: str, busnum: int | None, devnum: int | None, qemu_id: str,
        vm: str, controller: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Carry a rung out; what it found for the journal's ``detail``."""
        d = self.daemon
        # attach at once afterwards, not after the backoff of earlier failures
        d.retries.pop((vm, qemu_id), None)
        if rung is Rung.REATTACH:
            await self._detach_if_held(qemu_id, vm)
        elif rung is Rung.RESET:
            if busnum is None or devnum is None:
                raise usbctl.UsbCtlError(f"{port}: no bus/device number to find its node")
            await self._detach_if_held(qemu_id, vm)
            node = usbctl.devnode(busnum, devnum, self.dev_root)
            await asyncio.to_thread(usbctl.reset_device, node)
        elif rung is Rung.PORT_CYCLE:
            # the port's power read from its hub while off: only on the live /dev
            dev_root = self.dev_root if d.devnodes else None
            cycled = await asyncio.to_thread(usbctl.cycle_port, d.sysfs_root, port, 0.5, dev_root)
            log.warning("heal %s: port-cycle: %s", port, cycled.note)
            return {"power": cycled.note, "hub_power_switching": cycled.switching}
        elif rung is Rung.REAUTHORIZE:
            await asyncio.to_thread(usbctl.reauthorize, d.sysfs_root, port)
        elif rung is Rung.CONTROLLER:
            # decide() offers it only for an allowed controller; refused again here
            refused = controller_rung(self.policy, controller)
            if refused is not None or controller is None:
                raise usbctl.UsbCtlError(refused or "no controller")
            await asyncio.to_thread(
                usbctl.rebind_controller, Path(d.sysfs_root), controller, self.policy.controllers
            )
            self._hubs.clear()  # its root hubs are new
        return {}


__all__ = [
    "GUEST_PROBLEM", "LADDER", "Decision", "HealPolicy", "Healer", "HubPower", "Rung", "Status",
    "controller_rung", "decide", "parse_policy", "port_cycle_rung",
]  # fmt: skip


class Remedies:
    """The healer and the alerter of one daemon (started and stopped with it)."""

    def __init__(self, daemon: Daemon, kernel_log: Path | None = None) -> None:
        from vmplug.daemon.alerts import Alerter  # noqa: PLC0415 (alerts imports this module)

        config = daemon.config
        self.healer = Healer(daemon, config.heal, kernel_log=kernel_log)
        self.alerter = Alerter(daemon, config.alerts) if config.alerts else None
        # the guest-agent probe ([daemon] guest_check_interval; engineer G's
        # daemon/guestwatch.py): it journals guest-problem, a trigger above
        from vmplug.daemon.guestwatch import GuestWatch  # noqa: PLC0415

        self.guestwatch = GuestWatch.for_daemon(daemon)

    def start(self) -> None:
        self.healer.start()
        if self.alerter is not None:
            self.alerter.start()
        self.guestwatch.start()

    async def stop(self) -> None:
        await self.guestwatch.stop()
        await self.healer.stop()
        if self.alerter is not None:
            await self.alerter.stop()
