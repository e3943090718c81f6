"""The daemon's journal: what happened and what it did, for the store and the listeners.

Every write names a :class:`~vmplug.history.store.EventKind` or
:class:`~vmplug.history.store.ActionKind`; nothing here knows the reconciler's
state.  Two things besides writing:

* **holding**: while a device that just appeared is being attached, journal
  writes wait (:meth:`Journal.hold`) and are written after the attach, in
  their order (:meth:`Journal.release`): the SQLite commit is not on the path
  from uevent to ``device_add``;
* **publishing**: every event and action goes at once, held or not, to the
  listeners (the API's event stream, the metrics).  A listener that raises is
  logged and kept; so is a write the store refuses (a full disk must not
  stop the routing of devices).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmplug.history.store import ActionKind, EventKind, Result, Store
from vmplug.model import UsbDevice

log = logging.getLogger("vmplug")

#: what a listener is given: {"type": "event"|"action", "kind": ..., "ts": ..., ...}
Item = dict[str, Any]
Listener = Callable[[Item], None]


class Journal:
    def __init__(self, store: Store | None = None) -> None:
        #: the history database, or None (no history kept)
        self.store = store
        #: called with every event and action as it is recorded
        self.listeners: list[Listener] = []
        #: writes held back while a device that just appeared is attached
        self._held: list[tuple[str, Callable[[], object]]] | None = None

    # -- writing ------------------------------------------------------------

    def _write(self, what: str, write: Callable[[], object]) -> None:
        """Run a store write now, or after the attach in progress (in order)."""
        if self._held is not None:
            self._held.append((what, write))
            return
        try:
            write()
        except Exception:  # a full disk must not stop the routing of devices
            log.exception("cannot record %s", what)

    @property
    def holding(self) -> bool:
        """True between :meth:`hold` and :meth:`release`."""
        return self._held is not None

    def hold(self) -> None:
        """Keep store writes from now on until :meth:`release` (a second hold
        keeps what the first holds: nothing held is ever dropped)."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write what was held, in order, and write at once from now on."""
        held, self._held = self._held or [], None
        for what, write in held:
            self._write(what, write)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """One store transaction for several writes (a rescan snapshot)."""
        return self.store.batch() if self.store is not None else contextlib.nullcontext()

    def _publish(self, item: Item) -> None:
        for listener in list(self.listeners):
            try:
                listener(item)
            except Exception:
                log.exception("event listener failed")

    # -- what the reconciler records -------------------------------------------

    def event(self, kind: EventKind, **fields: Any) -> None:
        """Record that something happened (fields: identity, port, vm, detail)."""
        ts = time.time()
        if self.listeners:
            self._publish({"type": "event", "kind": kind.value, "ts": ts, **fields})
        if self.store is not None:
            store = self.store
            self._write(
                f"event {kind.value}", lambda: store.record_event(kind.value, ts=ts, **fields)
            )

    def action(
        self,
        kind: ActionKind,
        *,
        identity: str | None,
        qemu_id: str,
        vm: str,
        result: Result,
        latency_s: float | None = None,
        **fields: Any,
    ) -> None:
        """Record what the reconciler did to a VM.  ``latency_s`` (seconds from
        the device's uevent to attached) goes to the listeners, not the store."""
        ts = time.time()
        base = {"qemu_id": qemu_id, "vm": vm, "result": result.value, **fields}
        if self.listeners:
            item = {"type": "action", "kind": kind.value, "ts": ts, "identity": identity}
            self._publish({**item, **base, "latency_s": latency_s})
        if self.store is not None:
            store, who = self.store, identity or qemu_id
            self._write(
                f"action {kind.value}",
                lambda: store.record_action(kind.value, identity=who, ts=ts, **base),
            )

    def seen(self, kind: EventKind, devices: Sequence[tuple[UsbDevice, str | None]]) -> None:
        """:meth:`remember` and :meth:`event` (``identity``, ``port``, ``vm``) for
        each ``(device, vm)``, in order: a rescan's snapshot, written as two
        statements instead of two per device (500 devices at start)."""
        ts = time.time()
        rows = [(dev.identity, dev.port, vm) for dev, vm in devices]
        if self.listeners:
            for identity, port, vm in rows:
                fields = {"identity": identity, "port": port, "vm": vm, "detail": None}
                self._publish({"type": "event", "kind": kind.value, "ts": ts, **fields})
        if self.store is not None and rows:
            store, devs = self.store, [dev for dev, _ in devices]
            self._write("devices", lambda: store.remember_devices(devs, ts=ts))
            self._write(f"event {kind.value}", lambda: store.record_events(kind.value, rows, ts=ts))

    def remember(self, dev: UsbDevice) -> None:
        """Keep the device's summary under its identity (the history's names)."""
        if self.store is not None:
            store, ts = self.store, time.time()
            self._write("device", lambda: store.remember_device(dev, ts=ts))
