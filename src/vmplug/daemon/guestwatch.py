"""The guest-agent probe: every ``[daemon] guest_check_interval`` seconds, ask
each VM's guest (``qemu-ga`` on ``org.qemu.guest_agent.0``) about the devices
vmplug holds for it in QEMU, and journal what it reports as ``guest-problem``
(:attr:`vmplug.history.store.EventKind.GUEST_PROBLEM`; ``vm``, ``identity``,
``port``, ``detail``: ``problem``, ``message``, ``ids``, ``code``), which
:func:`vmplug.daemon.heal.decide` takes as a trigger of the ladder.

The judging is :func:`vmplug.doctor.guest.guest_problems` (the doctor's guest
layer, the same code ``vmplug doctor`` runs).  The agent is blocking
(:class:`vmplug.wire.qga.GuestAgent`), so each probe runs in a worker thread.

Level-triggered like the rest of the daemon: a problem is journaled at every
check while it lasts (the ladder counts triggers since its last rung, so a
problem that outlives a rung must be said again), except ``not-seen``, which
must be seen on two checks in a row (a device just attached is still being
enumerated by the guest).  Off (``0``, the default) unless configured.

The agent's socket is the one on the VM's QEMU command line (``-chardev
socket,…`` + ``virtserialport,name=org.qemu.guest_agent.0``), found through
``/proc`` by the VM's QMP socket; a VM without one is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmplug.history.store import EventKind
from vmplug.wire.errors import AgentError
from vmplug.wire.proc import scan_qemu
from vmplug.wire.qga import GuestAgent

if TYPE_CHECKING:
    from vmplug.daemon.journal import Journal
    from vmplug.doctor.guest import GuestProblem

log = logging.getLogger("vmplug.guestwatch")


@dataclass(frozen=True)
class GuestTarget:
    """One VM to probe: its agent socket and what vmplug holds for it:
    (identity, vendor:product, port) per attachment QEMU has open."""

    vm: str
    qga_path: str
    attached: tuple[tuple[str, str, str], ...]


def probe(target: GuestTarget, timeout: float = 5.0) -> list[GuestProblem]:
    """Ask the guest (blocking): the problems it has with ``target.attached``."""
    # the doctor's guest layer is loaded by the first check, not by every
    # daemon start (most configs never turn guest checks on)
    from vmplug.doctor.guest import guest_problems  # noqa: PLC0415

    with GuestAgent(target.qga_path, timeout=timeout) as agent:
        return guest_problems(agent, [(ident, ids) for ident, ids, _ in target.attached])


def qga_socket_of(qmp: str, proc_root: Path = Path("/proc")) -> str | None:
    """The guest-agent socket on the command line of the QEMU serving ``qmp``."""
    want = os.path.realpath(qmp)
    for proc in scan_qemu(proc_root):
        paths = [proc.reach(p) or p for p in proc.args.qmp_paths]
        if any(os.path.realpath(p) == want for p in paths) and proc.args.qga_path:
            return proc.reach(proc.args.qga_path) or proc.args.qga_path
    return None


def daemon_targets(daemon: Any) -> list[GuestTarget]:
    """What a :class:`vmplug.daemon.reconciler.Daemon` holds, per VM with an agent."""
    out: list[GuestTarget] = []
    for name, held in list(daemon.observed.items()):
        vm = daemon.config.vms.get(name)
        if vm is None or vm.kind != "qmp" or not vm.qmp or vm.is_tcp:
            continue
        rows = []
        for att in held.values():
            dev = daemon.inventory.get(att.port)
            if not att.live or dev is None or dev.vidpid is None:
                continue
            rows.append((att.identity or dev.identity, dev.vidpid, att.port))
        if not rows:
            continue
        path = qga_socket_of(vm.qmp)
        if path is not None:
            out.append(GuestTarget(name, path, tuple(rows)))
    return out


class GuestWatch:
    """The periodic probe of one daemon (started and stopped with it)."""

    def __init__(
        self,
        journal: Journal,
        targets: Callable[[], Sequence[GuestTarget]],
        interval: float,
        *,
        timeout: float = 5.0,
        prober: Callable[[GuestTarget, float], list[GuestProblem]] = probe,
    ) -> None:
        self.journal = journal
        self.targets = targets
        self.interval = interval
        self.timeout = timeout
        self.prober = prober
        self._task: asyncio.Task[None] | None = None
        #: (vm, identity) seen not-seen at the last check
        self._missing: set[tuple[str, str]] = set()
        #: checks finished
        self.checks = 0

    @classmethod
    def for_daemon(cls, daemon: Any) -> GuestWatch:
        # [daemon] guest_check_interval (config.py); 0 or absent: off
        interval = float(getattr(daemon.config.daemon, "guest_check_interval", 0) or 0)
        return cls(daemon.journal, lambda: daemon_targets(daemon), interval)

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:
                log.exception("guest check failed")

    async def check_once(self) -> list[tuple[str, GuestProblem]]:
        """Probe every target once; journal and return what is reported."""
        from vmplug.doctor.guest import NOT_SEEN  # noqa: PLC0415 (see probe)

        reported: list[tuple[str, GuestProblem]] = []
        missing: set[tuple[str, str]] = set()
        for target in self.targets():
            try:
                problems = await asyncio.to_thread(self.prober, target, self.timeout)
            except AgentError as exc:
                log.info("VM %s: guest agent not usable: %s", target.vm, exc)
                continue
            ports = {ident: port for ident, _, port in target.attached}
            for p in problems:
                key = (target.vm, p.identity)
                if p.problem == NOT_SEEN:
                    missing.add(key)
                    if key not in self._missing:
                        continue
                self.journal.event(
                    EventKind.GUEST_PROBLEM,
                    identity=p.identity,
                    vm=target.vm,
                    port=ports.get(p.identity),
                    detail=p.detail(),
                )
                reported.append((target.vm, p))
        self._missing = missing
        self.checks += 1  # checks finished
        return reported


__all__ = ["GuestTarget", "GuestWatch", "daemon_targets", "probe", "qga_socket_of"]
