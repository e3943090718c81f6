"""The daemon as a ``Type=notify`` systemd service (see :mod:`vmplug.wire.systemd`).

* ``READY=1`` once the API socket is up and the first reconcile pass is done;
* ``WATCHDOG=1`` from the event loop at half of ``WATCHDOG_USEC``: a loop that
  is stuck (or a process that is stopped) sends none, and systemd restarts it;
* ``STATUS=`` one line, "2/2 VMs connected, 3/4 devices attached", after passes
  (at most once a second) and with each watchdog tick;
* ``RELOADING=1`` (+ ``MONOTONIC_USEC``) on SIGHUP, ``READY=1`` when the reload
  is done (refused or not: the daemon runs on), ``STOPPING=1`` on shutdown.

Without ``$NOTIFY_SOCKET`` all of this costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from vmplug.wire.systemd import Notifier

if TYPE_CHECKING:
    from vmplug.daemon.reconciler import Daemon

#: STATUS= after a pass at most this often
STATUS_EVERY_S = 1.0


def summary(daemon: Daemon) -> str:
    """One line for ``STATUS=``: VMs connected and devices attached of those wanted."""
    view = daemon.view
    vms = view.vms()
    held = view.held_by()
    wanted = attached = 0
    for dev in view.devices():
        state = view.device_state(dev, held)
        if state.vm is not None:
            wanted += 1
            attached += state.state == "attached"
    connected = sum(vm.connected for vm in vms)
    return f"{connected}/{len(vms)} VMs connected, {attached}/{wanted} devices attached"


class ServiceNotifier:
    """Ties a :class:`Daemon` to systemd through a :class:`Notifier`."""

    def __init__(self, daemon: Daemon, notifier: Notifier) -> None:
        self.daemon = daemon
        self.notifier = notifier
        self.ready = False
        self._last_status = ""
        self._status_at = 0.0
        self._watchdog: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Listen to the daemon's passes and life cycle (before ``run_forever``)."""
        if not self.notifier.enabled:
            return
        self.daemon.view.subscribe_passes(self.on_pass)
        self.daemon.lifecycle_listeners.append(self.on_lifecycle)

    def on_pass(self, seconds: float, actions: int) -> None:
        if not self.ready:
            self.ready = True
            self._last_status = summary(self.daemon)
            self._status_at = time.monotonic()
            self.notifier.ready(self._last_status)
            if self.notifier.watchdog_interval is not None and self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().create_task(self._watchdog_loop())
            return
        if time.monotonic() - self._status_at >= STATUS_EVERY_S:
            self.update_status()

    def update_status(self) -> None:
        self._status_at = time.monotonic()
        text = summary(self.daemon)
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def on_lifecycle(self, what: str) -> None:
        if what == "reloading":
            self.notifier.reloading()
        elif what == "reloaded":
            self.notifier.ready(summary(self.daemon))
        elif what == "stopping":
            # the watchdog goes on while stop() detaches: TimeoutStopSec= bounds it
            self.notifier.stopping("stopping")

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            self.notifier.watchdog()
            with contextlib.suppress(Exception):
                self.update_status()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self.notifier.enabled:
            self.daemon.view.unsubscribe_passes(self.on_pass)
        self.notifier.close()
