"""Per-device health figures from the journal: uptime, failures, MTBF, recovery, errors.

Pure functions over :class:`vmplug.history.store.HistoryEntry` lists (journal order,
as :meth:`Store.history` returns them) and a window ``[start, end)`` in unix
time.  Entries before ``start`` are replayed only to know the state at
``start``; entries after ``end`` are ignored.  Pass the history from at least
the last ``daemon-start`` before ``start`` (or all of it): before the first
entry the replay knows nothing, so nothing is present, running or attached.

State, at every instant, replayed from the vocabulary in :mod:`vmplug.history.store`
-------------------------------------------------------------------------------
* **observed** -- the daemon is running: false from ``daemon-stop`` to the
  next ``daemon-start``.  ``daemon-start`` also forgets everything (devices,
  running VMs, attachments): the daemon records a fresh snapshot after it.  A
  daemon that died without ``daemon-stop`` leaves the last known state in
  force until it starts again.
* **present(d)** -- from ``device-add``/``device-bind`` of ``d`` to its
  ``device-remove``.
* **target(d)** -- the ``vm`` of the last ``device-add``/``device-bind``/
  ``device-route`` of ``d``: the VM the rules name (``None``: none).
* **running(v)** -- from ``vm-up`` of ``v`` to its ``vm-down``.
* **attached(d)** -- the VM holding ``d``: set by a successful ``attach`` or
  ``adopt`` action; cleared by a successful ``detach`` from that VM,
  ``attachment-lost`` in it, ``vm-down`` of it and ``device-remove`` of ``d``.
  ``vm-reset`` changes nothing (QEMU keeps ``usb-host`` devices across a reset).

Derived sets of time, per device ``d``:

* **wanted(d)** = observed AND present(d) AND target(d) is not None AND
  running(target(d)).
* **up(d)** = wanted(d) AND attached(d) == target(d).

Figures (all in seconds unless named otherwise)
-----------------------------------------------
* ``wanted_s`` = |wanted ∩ window|; ``up_s`` = |up ∩ window|.
* ``uptime`` = up_s / wanted_s; ``None`` when the device was never wanted.
  Time the device is unplugged, its VM is down or the daemon is stopped is not
  wanted, so it neither helps nor hurts.
* ``failures`` = number of instants in the window at which ``d`` stops being
  up because of the device or its attachment while the rest holds: it is
  unplugged (``device-remove``), the VM loses it (``attachment-lost``), a
  ``detach`` or an ``attach`` elsewhere takes it out.  Leaving ``up`` because
  the VM stops, the daemon stops or the rules send the device elsewhere is
  *not* a failure.  An unplug while not up (VM down, never attached, already
  in an outage) is not one either.
* ``mtbf_s`` = wanted_s / failures; ``None`` with no failure.
* **outage**: opens when ``d`` leaves ``up`` through a failure or a
  ``vm-down`` of its VM (a VM restart), or, when no outage is open, at an
  action error while ``d`` is wanted and not up (a first attach that fails).
  It closes when ``d`` is up again.  Its **recovery time** is the wanted-but-
  not-up time inside it: the time vmplug had to bring the device back, not
  the time it was unplugged or its VM was booting.  ``recoveries`` holds the
  recovery times of outages that close inside the window (counting their
  whole length, even the part before ``start``); ``median_recovery_s`` and
  ``worst_recovery_s`` summarise them (``None`` when there is none).
* ``ongoing_recovery_s``: at ``end``, if an outage is open and ``d`` is
  wanted, its recovery time so far; else ``None``.
* ``errors`` = action entries with result ``error`` in the window;
  ``errors_per_hour`` = errors / window hours (``None`` for an empty window).

Time: entries are taken in journal order and their wall-clock ``ts`` is made
monotonic by a running maximum, so a clock stepping back adds no negative
time (it adds none at all until the clock catches up).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmplug.history.store import ActionKind, EventKind, HistoryEntry, Result
from vmplug.model import UsbDevice


@dataclass(frozen=True, slots=True)
class Health:
    """Health of one device over ``[window_start, window_end]``."""

    identity: str
    window_start: float
    window_end: float
    wanted_s: float = 0.0
    up_s: float = 0.0
    uptime: float | None = None
    failures: int = 0
    mtbf_s: float | None = None
    recoveries: tuple[float, ...] = ()
    median_recovery_s: float | None = None
    worst_recovery_s: float | None = None
    ongoing_recovery_s: float | None = None
    errors: int = 0
    errors_per_hour: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "wanted_s": self.wanted_s,
            "up_s": self.up_s,
            "uptime": self.uptime,
            "failures": self.failures,
            "mtbf_s": self.mtbf_s,
            "recoveries": len(self.recoveries),
            "median_recovery_s": self.median_recovery_s,
            "worst_recovery_s": self.worst_recovery_s,
            "ongoing_recovery_s": self.ongoing_recovery_s,
            "errors": self.errors,
            "errors_per_hour": self.errors_per_hour,
        }


@dataclass(slots=True)
class _Dev:
    last: float
    present: bool = False
    target: str | None = None
    attached: str | None = None
    wanted_s: float = 0.0
    up_s: float = 0.0
    failures: int = 0
    errors: int = 0
    outage: float | None = None  # wanted-not-up seconds of the open outage
    recoveries: list[float] = field(default_factory=list)


_DEV_EVENTS = frozenset(
    {
        EventKind.DEVICE_ADD,
        EventKind.DEVICE_BIND,
        EventKind.DEVICE_REMOVE,
        EventKind.DEVICE_ROUTE,
        EventKind.ATTACHMENT_LOST,
    }
)


class _Replay:
    def __init__(self, start: float, end: float, only: frozenset[str] | None) -> None:
        self.start = start
        self.end = end
        self.only = only
        self.observed = True
        self.running: set[str] = set()
        self.devs: dict[str, _Dev] = {}
        self.now = float("-inf")

    def dev(self, identity: str) -> _Dev:
        d = self.devs.get(identity)
        if d is None:
            d = self.devs[identity] = _Dev(last=self.now)
        return d

    def wanted(self, d: _Dev) -> bool:
        return self.observed and d.present and d.target is not None and d.target in self.running

    def is_up(self, d: _Dev) -> bool:
        return self.wanted(d) and d.attached == d.target

    def advance(self, d: _Dev, t: float) -> None:
        a, b = d.last, t
        if b <= a:
            return
        d.last = b
        if not self.wanted(d):
            return
        overlap = min(b, self.end) - max(a, self.start)
        up = d.attached == d.target
        if overlap > 0:
            d.wanted_s += overlap
            if up:
                d.up_s += overlap
        if not up and d.outage is not None:
            d.outage += b - a

    def in_window(self, t: float) -> bool:
        return self.start <= t < self.end

    def device_change(self, d: _Dev, t: float, was_up: bool, *, failure: bool) -> None:
        """Book-keeping after ``d`` changed at ``t``; ``failure``: cause is the device's."""
        now_up = self.is_up(d)
        if was_up and not now_up:
            if failure:
                if self.in_window(t):
                    d.failures += 1
                d.outage = 0.0
        elif now_up and not was_up and d.outage is not None:
            if self.in_window(t):
                d.recoveries.append(d.outage)
            d.outage = None

    def apply(self, e: HistoryEntry, t: float) -> None:
        kind = e.kind
        ident = e.identity
        if e.entry == "action":
            if ident is None or (self.only is not None and ident not in self.only):
                return
            d = self.dev(ident)
            self.advance(d, t)
            was_up = self.is_up(d)
            if e.result != Result.OK:
                if self.in_window(t):
                    d.errors += 1
                if self.wanted(d) and not was_up and d.outage is None:
                    d.outage = 0.0
                return
            if kind in (ActionKind.ATTACH, ActionKind.ADOPT):
                d.attached = e.vm
            elif kind == ActionKind.DETACH and d.attached == e.vm:
                d.attached = None
            self.device_change(d, t, was_up, failure=True)
            return
        if kind in _DEV_EVENTS:
            if ident is None or (self.only is not None and ident not in self.only):
                return
            d = self.dev(ident)
            self.advance(d, t)
            was_up = self.is_up(d)
            failure = False
            if kind in (EventKind.DEVICE_ADD, EventKind.DEVICE_BIND):
                d.present = True
                d.target = e.vm
            elif kind == EventKind.DEVICE_ROUTE:
                d.target = e.vm
            elif kind == EventKind.DEVICE_REMOVE:
                d.present = False
                d.attached = None
                failure = True
            elif e.vm is None or d.attached == e.vm:  # ATTACHMENT_LOST
                d.attached = None
                failure = True
            self.device_change(d, t, was_up, failure=failure)
            return
        if kind == EventKind.VM_UP and e.vm is not None:
            vm_up = e.vm

            def up() -> None:
                self.running.add(vm_up)

            self._global(t, up, outage=False, vm=vm_up)
        elif kind == EventKind.VM_DOWN and e.vm is not None:
            vm = e.vm

            def down() -> None:
                self.running.discard(vm)
                for d in self.devs.values():
                    if d.attached == vm:
                        d.attached = None

            self._global(t, down, outage=True, vm=vm)
        elif kind == EventKind.DAEMON_START:

            def forget() -> None:
                self.observed = True
                self.running.clear()
                for d in self.devs.values():
                    d.present = False
                    d.target = None
                    d.attached = None

            self._global(t, forget, outage=False)
        elif kind == EventKind.DAEMON_STOP:

            def stop() -> None:
                self.observed = False

            self._global(t, stop, outage=False)
        # vm-reset, rescan, config-reload and unknown kinds change no state.

    def _global(
        self, t: float, change: Callable[[], None], *, outage: bool, vm: str | None = None
    ) -> None:
        """Apply a change that may touch many devices (all, or those of ``vm``)."""
        if vm is None:
            devs = list(self.devs.values())
        else:
            devs = [d for d in self.devs.values() if vm in (d.target, d.attached)]
        before = []
        for d in devs:
            self.advance(d, t)
            before.append(self.is_up(d))
        change()
        for d, was_up in zip(devs, before, strict=True):
            now_up = self.is_up(d)
            if was_up and not now_up:
                if outage:
                    d.outage = 0.0
            elif now_up and not was_up and d.outage is not None:
                if self.in_window(t):
                    d.recoveries.append(d.outage)
                d.outage = None

    def result(self, identity: str) -> Health:
        d = self.devs.get(identity)
        hours = (self.end - self.start) / 3600.0
        if d is None:
            return Health(
                identity=identity,
                window_start=self.start,
                window_end=self.end,
                errors_per_hour=0.0 if hours > 0 else None,
            )
        self.advance(d, self.end)
        ongoing = d.outage if d.outage is not None and self.wanted(d) else None
        rec = tuple(d.recoveries)
        return Health(
            identity=identity,
            window_start=self.start,
            window_end=self.end,
            wanted_s=d.wanted_s,
            up_s=d.up_s,
            uptime=d.up_s / d.wanted_s if d.wanted_s > 0 else None,
            failures=d.failures,
            mtbf_s=d.wanted_s / d.failures if d.failures else None,
            recoveries=rec,
            median_recovery_s=statistics.median(rec) if rec else None,
            worst_recovery_s=max(rec) if rec else None,
            ongoing_recovery_s=ongoing,
            errors=d.errors,
            errors_per_hour=d.errors / hours if hours > 0 else None,
        )


def _replay(
    entries: Iterable[HistoryEntry], start: float, end: float, only: frozenset[str] | None
) -> _Replay:
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    r = _Replay(start, end, only)
    for e in entries:
        t = e.ts if e.ts > r.now else r.now
        if t > end:
            break
        r.now = t
        r.apply(e, t)
    r.now = max(r.now, end)
    return r


def health_by_device(
    entries: Sequence[HistoryEntry] | Iterable[HistoryEntry],
    start: float,
    end: float,
    identities: Iterable[str] | None = None,
) -> dict[str, Health]:
    """Health of every device in one pass over ``entries``.

    ``identities``: compute only these (each gets a result, even with no
    entry); ``None``: every device named in the entries.
    """
    only = frozenset(identities) if identities is not None else None
    r = _replay(entries, start, end, only)
    names = sorted(only) if only is not None else sorted(r.devs)
    return {name: r.result(name) for name in names}


def device_health(
    entries: Sequence[HistoryEntry] | Iterable[HistoryEntry],
    identity: str,
    start: float,
    end: float,
) -> Health:
    """Health of one device (entries of other devices are skipped)."""
    return health_by_device(entries, start, end, (identity,))[identity]


def health_rows(
    figures: Mapping[str, Health], store: Any = None, present: Iterable[UsbDevice] = ()
) -> list[dict[str, Any]]:
    """Health JSON for people and scripts: each device's figures plus its port and
    name (as present now, else as the store last saw it) and whether it is present."""
    by_identity = {d.identity: d for d in present}
    rows = []
    for identity, h in figures.items():
        row = h.to_json()
        dev = by_identity.get(identity)
        port: str | None
        if dev is not None:
            port, name = dev.port, dev.display_name
        else:
            known = (store.known_device(identity) if store is not None else None) or {}
            maker, product = known.get("manufacturer"), known.get("product")
            if maker and product and str(product).casefold().startswith(str(maker).casefold()):
                maker = None  # "QEMU USB Audio", not "QEMU QEMU USB Audio"
            port, name = known.get("port"), " ".join(str(p) for p in (maker, product) if p)
        row.update(
            port=port,
            name=name or None,
            present=dev is not None,
        )
        rows.append(row)
    return rows
