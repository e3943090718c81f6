"""What a cold start asks of each QEMU (issue 16): QMP's handshake, the
session's status, one read of vmplug's devices, the USB bus lookup once
(overlapping the tree read, reusing that read's /machine/peripheral listing)
and then only device_add.  QEMU 7.2 spends ~3.5-8 us of CPU per byte a
monitor reads, so every command beyond the device_adds is QEMU CPU the
2-core benchmark machine does not have.

Real QEMU processes, the daemon in-process; the commands are counted at the
wire (vmplug.wire.qmp.Client's outbound hook), by the VM they went to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from qemu.qmp.message import Message

from tests.qemu.test_daemon import RULES_BY_PORT
from tests.support.fakekernel import FakeKernel
from tests.support.qemurig import QemuRig
from vmplug.config import parse_config
from vmplug.daemon import reconciler
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import ReplayEventSource
from vmplug.host.inventory import read_devices
from vmplug.wire import qmp as wire_qmp

pytestmark = pytest.mark.qemu


@pytest.fixture
async def vms(tmp_path: Path) -> AsyncIterator[QemuRig]:
    rig = QemuRig(tmp_path, "vmplug-cs")
    try:
        yield rig
    finally:
        await rig.close_vms()


Sent = dict[str, list[str]]


def count_commands(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Every command vmplug's QMP clients send from now on, by client (VM) name."""
    sent: Sent = {}
    original = wire_qmp.Client._cb_outbound

    def counted(client: wire_qmp.Client, msg: Message) -> Message:
        args = msg.get("arguments")
        path = args.get("path") if isinstance(args, dict) else None
        sent.setdefault(str(client.name), []).append(f"{msg['execute']} {path or ''}".strip())
        return original(client, msg)

    monkeypatch.setattr(wire_qmp.Client, "_cb_outbound", counted)
    return sent


async def start_daemon(
    vms: QemuRig,
    kernel: FakeKernel,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    read_after: Callable[[Daemon], bool],
    attaches: int,
) -> None:
    """A daemon started and stopped once converged; its tree read (~80 ms for
    a big tree) waits until ``read_after(daemon)`` and 0.2 s more, 10 s at most:
    the VMs are observed while it reads, as at a real start."""
    daemon: list[Daemon] = []
    done = threading.Event()

    def slow_read(root: Path) -> object:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not done.is_set():
            if daemon and len(daemon[0].vms) == 2 and read_after(daemon[0]):
                time.sleep(0.2)
                break
            time.sleep(0.01)
        return read_devices(root)

    monkeypatch.setattr(reconciler, "read_devices", slow_read)
    config = parse_config(vms.config_path.read_text(), vms.config_path)
    d = Daemon(
        config,
        sysfs_root=kernel.root,
        source=ReplayEventSource(kernel.fifo),
        store=store,
        config_path=vms.config_path,
    )
    daemon.append(d)
    try:
        await d.start()
        deadline = time.monotonic() + 20
        while not (d._converged.is_set() and len(d.observed) == 2):
            assert time.monotonic() < deadline, d.stats
            await asyncio.sleep(0.02)
        assert d.stats.actions_ok == attaches
    finally:
        done.set()
        await d.stop()


async def test_cold_start_sends_each_vm_the_bus_lookup_once_then_only_device_add(
    vms: QemuRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(tmp_path, "mixed")
    vms.config_path.write_text(vms.vm_tables(("a", "b")) + RULES_BY_PORT)
    for name in ("a", "b"):
        vms.qemu(name).start()
    store = Store(tmp_path / "vmplug.db")
    try:
        sent = count_commands(monkeypatch)

        def bus_known(d: Daemon) -> bool:
            return all(getattr(vm, "_bus", None) for vm in d.vms.values())

        await start_daemon(vms, kernel, store, monkeypatch, bus_known, attaches=2)
        for name in ("a", "b"):
            got = sent[name]
            assert got[:2] == ["qmp_capabilities", "query-status"], got
            # one listing of /machine/peripheral: the observation's and the bus lookup's
            assert got[2:] == [
                "qom-list /machine/peripheral",
                "qom-list /machine/peripheral-anon",
                "qom-list /machine/unattached",
                "qom-list /machine/peripheral/xhci",
                "device_add",
            ], got
        # a restarted daemon adopts what the VMs hold: no bus lookup, nothing added
        sent.clear()

        def connected(d: Daemon) -> bool:
            return all(vm.connected for vm in d.vms.values())

        await start_daemon(vms, kernel, store, monkeypatch, connected, attaches=0)
        for name in ("a", "b"):
            got = sent[name]
            assert got[:3] == ["qmp_capabilities", "query-status", "qom-list /machine/peripheral"]
            assert not [c for c in got if c.startswith(("device_add", "qom-list /machine/un"))], got
    finally:
        store.close()
        kernel.close()
