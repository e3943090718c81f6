"""What a running daemon shows: the one read side of the reconciler's state.

The API (``/v1/status``, ``/v1/devices``...), the metrics and ``vmplug
status`` (through the API) read the daemon here and nowhere else: the
devices present, the VMs and what each holds, the VM a device belongs in
(:func:`vmplug.engine.desired.target`, the reconciler's own decision), the
retries and the counters.  Nothing here changes the state; changes go
through the daemon's commands (``set_route``, ``reload``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmplug.config import Config, RuleConfig
from vmplug.daemon.journal import Listener
from vmplug.engine.desired import Attachment, target
from vmplug.history.store import Store
from vmplug.model import UsbDevice

if TYPE_CHECKING:
    from vmplug.daemon.reconciler import Daemon, Retry

#: called after every reconcile pass with (seconds it took, actions tried)
PassListener = Callable[[float, int], None]


def same_binding(a: Attachment, b: Attachment) -> bool:
    """The same device id bound to the same socket in the same VM."""
    return (a.vm, a.qemu_id, a.binding) == (b.vm, b.qemu_id, b.binding)


@dataclass(frozen=True, slots=True)
class VmView:
    """One VM the daemon manages, as it stands now."""

    name: str
    connected: bool
    #: the backend's state name ("running", ...), None when it has none
    state: str | None
    #: the vmplug devices it holds, by QEMU id
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Where a present device belongs and where it is."""

    #: the VM the override or the rules name for it (None: the host)
    vm: str | None
    #: the VM holding it now, if any
    attached: str | None
    #: "host" | "attached" | "pending" | "retrying" | "elsewhere" | "held" (a remote
    #: device another VM host holds)
    state: str
    override: bool
    #: the last failure of the attach being retried
    error: str | None


class ReadModel:
    """A view of one :class:`~vmplug.daemon.reconciler.Daemon`; cheap to make."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    # -- what the daemon runs with -------------------------------------------

    @property
    def config(self) -> Config:
        return self._d.config

    @property
    def rules(self) -> Sequence[RuleConfig]:
        return self._d.config.rules

    @property
    def store(self) -> Store | None:
        return self._d.journal.store

    @property
    def started(self) -> float:
        """Wall-clock time the daemon started (``time.time()``)."""
        return self._d.stats.started

    # -- devices ----------------------------------------------------------------

    def devices(self) -> list[UsbDevice]:
        """The devices present (no root hubs), in inventory order, then the
        remote ones (``host`` set), device host by device host."""
        return self._d.all_devices()

    def device_count(self) -> int:
        return len(self._d.inventory) + sum(len(s.devices()) for s in self._d.sources)

    def remote_hosts(self) -> list[dict[str, Any]]:
        """Each ``[host.NAME]``'s link state (vmplug.remote.inventory), if any."""
        out: list[dict[str, Any]] = []
        for src in self._d.sources:
            to_json = getattr(src, "to_json", None)
            if to_json is not None:
                out.extend(to_json())
        return out

    def target(self, dev: UsbDevice) -> str | None:
        """The VM ``dev`` belongs in now (override, then the rules), or None."""
        return target(dev, self._d.config, self._d.overrides)

    def is_overridden(self, dev: UsbDevice) -> bool:
        return dev.identity in self._d.overrides

    def held_by(self) -> dict[str, str]:
        """QEMU id -> the VM holding it."""
        return {qid: vm for vm, held in self._d.observed.items() for qid in held}

    def holders(self, qemu_id: str) -> list[str]:
        """The VMs holding the device ``qemu_id`` (normally one at most)."""
        return [vm for vm, held in self._d.observed.items() if qemu_id in held]

    def holds(self, vm: str, qemu_id: str) -> bool:
        return qemu_id in self._d.observed.get(vm, {})

    def retry(self, vm: str, qemu_id: str) -> Retry | None:
        """The retry waiting for the action on ``qemu_id`` in ``vm``, if one failed."""
        return self._d.retries.get((vm, qemu_id))

    def device_state(
        self, dev: UsbDevice, held_by: dict[str, str] | None = None, qemu_id: str | None = None
    ) -> DeviceState:
        """Where ``dev`` belongs and is.  When asking for many: ``held_by`` is
        :meth:`held_by`, ``qemu_id`` the device's (a sha256 each time otherwise)."""
        qemu_id = dev.qemu_id if qemu_id is None else qemu_id
        want = self.target(dev)
        have = (self.held_by() if held_by is None else held_by).get(qemu_id)
        retry = self.retry(want, qemu_id) if want else None
        held = self._d.held_elsewhere(dev) if dev.host is not None and have is None else None
        if held is not None and want is not None:
            state = "held"  # another VM host holds the remote device: first come wins
        elif want is None:
            state = "host" if have is None else "elsewhere"
        elif have == want:
            state = "attached"
        elif retry is not None:
            state = "retrying"
        elif have is not None:
            state = "elsewhere"
        else:
            state = "pending"
        return DeviceState(
            vm=want,
            attached=have,
            state=state,
            override=self.is_overridden(dev),
            error=f"held by {held}" if held is not None else retry.error if retry else None,
        )

    # -- VMs ----------------------------------------------------------------------

    def vm_names(self) -> list[str]:
        """Every VM configured or running, sorted."""
        return sorted(set(self._d.config.vms) | set(self._d.vms))

    def vms(self) -> list[VmView]:
        """The VMs the daemon runs a backend for, by name."""
        out = []
        for name, backend in sorted(self._d.vms.items()):
            state = getattr(backend, "state", None)
            out.append(
                VmView(
                    name=name,
                    connected=backend.connected,
                    state=getattr(state, "name", str(state)).lower() if state else None,
                    devices=tuple(sorted(self._d.observed.get(name, {}))),
                )
            )
        return out

    def running_vms(self) -> list[str]:
        """The VMs the daemon runs a backend for (connected or not), sorted."""
        return sorted(self._d.vms)

    # -- listening ------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """``listener`` gets every event and action as it is recorded."""
        self._d.journal.listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._d.journal.listeners:
            self._d.journal.listeners.remove(listener)

    def subscribe_passes(self, listener: PassListener) -> None:
        """``listener`` gets (seconds, actions tried) after every reconcile pass."""
        self._d.pass_listeners.append(listener)

    def unsubscribe_passes(self, listener: PassListener) -> None:
        if listener in self._d.pass_listeners:
            self._d.pass_listeners.remove(listener)

    # -- the status document ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: the daemon, its VMs, the attachments wanted, the overrides."""
        d = self._d
        vms = {}
        for vm in self.vms():
            conf = d.config.vms.get(vm.name)
            vms[vm.name] = {
                "connected": vm.connected,
                "state": vm.state,
                "qmp": conf.qmp if conf else None,
                "kind": conf.kind if conf else None,
                "where": conf.where if conf else None,
                "devices": list(vm.devices),
            }
        attachments = []
        for att in sorted(d.wanted()):
            held = d.observed.get(att.vm, {}).get(att.qemu_id)
            retry = self.retry(att.vm, att.qemu_id)
            if held is not None and same_binding(held, att):
                state = "attached"
            else:
                state = "retrying" if retry else "pending"
            attachments.append(
                {
                    "port": att.port,
                    "identity": att.identity,
                    "vm": att.vm,
                    "qemu_id": att.qemu_id,
                    "hostbus": att.hostbus,
                    "hostport": att.hostport,
                    "hostaddr": att.hostaddr,
                    # a remote device's port is "HOST:PORT" (and no bus of this host)
                    "host": att.port.partition(":")[0] if not att.hostbus else None,
                    "state": state,
                    "attempts": retry.attempt if retry else 0,
                    "error": retry.error if retry else None,
                }
            )
        stats = d.stats
        return {
            "daemon": {
                "pid": os.getpid(),
                "started": stats.started,
                "uptime_s": round(time.time() - stats.started, 3),
                "events": d.source.description,
                "config": str(d.config_path),
                "devices": len(d.inventory),
                "passes": stats.passes,
                "actions_ok": stats.actions_ok,
                "actions_failed": stats.actions_failed,
            },
            "vms": vms,
            "attachments": attachments,
            "overrides": dict(d.overrides),
            "remote_hosts": self.remote_hosts(),
            "held": [
                {"identity": dev.identity, "host": dev.host, "vm": want, "holder": holder}
                for dev in (x for src in d.sources for x in src.devices())
                if (holder := d.held_elsewhere(dev)) is not None
                and (want := self.target(dev)) is not None
            ],
        }
