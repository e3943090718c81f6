"""The guest-reported trigger (issue 15's seam): the daemon's probe
(vmplug.daemon.guestwatch) asks the real qemu-ga, journals ``guest-problem``
in a real SQLite journal, and the healing ladder's decide() takes it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmplug.config import ConfigError, VmConfig, parse_config
from vmplug.daemon.guestwatch import GuestTarget, GuestWatch, daemon_targets, qga_socket_of
from vmplug.daemon.heal import Rung, decide
from vmplug.daemon.journal import Journal
from vmplug.doctor.guest import NOT_SEEN, guest_problems
from vmplug.engine.desired import Attachment
from vmplug.engine.remedy import HealPolicy
from vmplug.history.store import EventKind, Store
from vmplug.model import UsbDevice
from vmplug.wire.qga import GuestAgent

from .conftest import XHCI
from .test_guest_additions import AgentFactory, real_agent

__all__ = ["real_agent"]  # the fixture, used by name

IDENT = "1235:821a:S1"
POLICY = HealPolicy(interval_s=1.0, settle_s=5.0, attach_refusals=2)


def test_guest_problems_from_the_real_agent(real_agent: AgentFactory) -> None:
    """This machine has no USB (no /sys/bus/usb): the agent, asked about a device
    vmplug holds, truthfully finds it absent from the guest's sysfs."""
    sock = real_agent()
    with GuestAgent(sock) as agent:
        assert guest_problems(agent, []) == []
        (p,) = guest_problems(agent, [(IDENT, "1235:821a")])
    assert p.problem == NOT_SEEN and p.identity == IDENT
    assert p.detail() == {
        "problem": "not-seen",
        "message": "1235:821a is not in the guest's sysfs",
        "ids": "1235:821a",
    }


def test_guestwatch_journals_and_the_ladder_reacts(
    real_agent: AgentFactory, tmp_path: Path
) -> None:
    sock = real_agent()
    store = Store(tmp_path / "j.db")
    try:
        store.record_action("attach", identity=IDENT, qemu_id="vmplug-x", vm="win", result="ok")
        target = GuestTarget("win", str(sock), ((IDENT, "1235:821a", "1-1"),))
        watch = GuestWatch(Journal(store), lambda: [target], interval=0.05)

        async def run() -> tuple[list[Any], list[Any]]:
            first = await watch.check_once()  # not-seen once: the guest may still enumerate
            second = await watch.check_once()
            return first, second

        first, second = asyncio.run(run())
        assert first == [] and [p.problem for _, p in second] == ["not-seen"]
        events = [e for e in store.history(None, limit=None) if e.kind == EventKind.GUEST_PROBLEM]
        (ev,) = events
        assert (ev.vm, ev.identity, ev.port) == ("win", IDENT, "1-1")
        assert ev.detail is not None and ev.detail["problem"] == "not-seen"
        status = decide(store.history(None, limit=None), IDENT, "1-1", POLICY, ev.ts + 1)
        assert status.decision is not None and status.decision.rung is Rung.REATTACH
        assert "guest win: 1235:821a is not in the guest's sysfs" in status.decision.reason
    finally:
        store.close()


def test_guestwatch_runs_periodically_and_stops(real_agent: AgentFactory, tmp_path: Path) -> None:
    sock = real_agent()
    store = Store(tmp_path / "j.db")
    try:
        target = GuestTarget("win", str(sock), ((IDENT, "1235:821a", "1-1"),))
        watch = GuestWatch(Journal(store), lambda: [target], interval=0.05)
        off = GuestWatch(Journal(store), lambda: [target], interval=0)

        async def run() -> None:
            watch.start()
            off.start()  # interval 0: off
            for _ in range(400):
                if watch.checks >= 3:
                    break
                await asyncio.sleep(0.02)
            await watch.stop()
            await off.stop()

        asyncio.run(run())
        assert watch.checks >= 3 and off.checks == 0
        kinds = [e.kind for e in store.history(None, limit=None)]
        assert kinds.count(EventKind.GUEST_PROBLEM) >= 2
    finally:
        store.close()


@pytest.mark.qemu
def test_daemon_targets_find_the_agent_socket_on_the_vm_command_line(
    qemu: Any, tmp_path: Path
) -> None:
    """A real QEMU with a guest-agent channel: the probe finds its socket through
    /proc by the VM's QMP socket, and takes only live attachments it knows."""
    name = f"gw-{uuid.uuid4().hex[:6]}"
    proc = qemu([*XHCI], name=name)
    qga = proc.sock_dir / "qga.sock"
    proc.extra_args += [
        "-chardev", f"socket,id=qga0,path={qga},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    proc.start()
    assert qga_socket_of(proc.qmp_path) == str(qga)
    dev = UsbDevice(port="1-1", busnum=1, devnum=2, vendor_id=0x1235, product_id=0x821A)
    live = Attachment(name, "vmplug-a", 1, "1", identity=IDENT, port="1-1")
    dead = Attachment(name, "vmplug-b", 1, "2", identity="x", port="1-2", live=False)
    daemon = SimpleNamespace(
        observed={name: {"vmplug-a": live, "vmplug-b": dead}},
        config=SimpleNamespace(vms={name: VmConfig(name, qmp=proc.qmp_path)}),
        inventory={"1-1": dev, "1-2": dev},
    )
    (t,) = daemon_targets(daemon)
    assert t == GuestTarget(name, str(qga), ((IDENT, "1235:821a", "1-1"),))


def test_the_interval_comes_from_the_config_and_bad_values_are_refused() -> None:
    cfg = parse_config("[daemon]\nguest_check_interval = 30\n")
    watch = GuestWatch.for_daemon(SimpleNamespace(config=cfg, journal=Journal(None)))
    assert watch.interval == 30.0
    assert parse_config("").daemon.guest_check_interval == 0.0  # off by default
    for bad in ("-1", '"30s"', "true"):
        with pytest.raises(ConfigError, match="guest_check_interval must be seconds >= 0"):
            parse_config(f"[daemon]\nguest_check_interval = {bad}\n")
