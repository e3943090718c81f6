"""The replug fast path against real QEMU: device_add on the ``add`` uevent,
before the device is read (issue 16).

On a real kernel, a device's string attributes (``serial``, names) wait for
the device lock the kernel holds while it probes drivers, so reading the
device first puts that probe on the path to ``device_add``.  Here the
captured tree's ``serial`` file of the replugged keyboard is a FIFO: reading
it blocks until the test writes the serial, as a read during the probe
blocks until the probe ends.  A thread (the daemon's event loop is blocked
in that read) watches QEMU through the test's own QMP socket and only then
lets the read go on.  With the fast path, QEMU holds the device before its
serial could be read; without it, not until after.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakekernel import FakeKernel, until
from tests.support.qemu_proc import QemuFactory
from tests.support.qemurig import QemuRig
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import ReplayEventSource
from vmplug.vms.base import UsbHostSpec
from vmplug.vms.qmp import QTREE_MIN, QmpVm
from vmplug.wire.qmp import SyncQmp

pytestmark = pytest.mark.qemu

KBD = "2-2.4.2"  # 0627:0001 with a serial, in tests/fixtures/sysfs/mixed
TABLET = "2-2.4.1"  # on the same hub, no rule sends it anywhere
BY_ID = 'id 0627:0001 via-port "2-2.4.2"'
BY_SERIAL = 'serial "68284-0000:00:0b.0-2.4.2"'


class Rig(QemuRig):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "vmplug-fp")
        self.kernel = FakeKernel(tmp, "mixed")
        self.daemon: Daemon | None = None
        self.store: Store | None = None

    async def up(self, match: str) -> Daemon:
        self.config_path.write_text(
            self.vm_tables(("a",)) + f"[[rule]]\nattach = \"a\"\nmatch = '{match}'\n"
        )
        self.qemu("a").start()
        config = parse_config(self.config_path.read_text(), self.config_path)
        self.store = Store(self.tmp / "vmplug.db")
        self.daemon = Daemon(
            config,
            sysfs_root=self.kernel.root,
            source=ReplayEventSource(self.kernel.fifo),
            store=self.store,
            config_path=self.config_path,
        )
        await self.daemon.start()
        await until(lambda: _has(self.ports("a"), {KBD}), what="attached at start")
        return self.daemon

    async def close(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
        if self.store is not None:
            self.store.close()
        await self.close_vms()
        self.kernel.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        await r.close()


async def _has(value: Awaitable[set[str]], want: set[str]) -> bool:
    return await value == want


class ProbeHold(threading.Thread):
    """Holds the daemon's read of ``serial`` (a FIFO) until QEMU was seen
    holding ``qemu_id`` or ``wait`` seconds passed; then gives the serial,
    leaving a regular file in the FIFO's place for the reads after."""

    def __init__(self, fifo: Path, serial: str, qmp: Path, qemu_id: str, wait: float) -> None:
        super().__init__(daemon=True, name="probe-hold")
        self.fifo, self.serial, self.qmp, self.qemu_id, self.wait = fifo, serial, qmp, qemu_id, wait
        self.held_before_read: bool | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.held_before_read = self._watch()
            self._release()
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc
            with contextlib.suppress(OSError):
                self._release()

    def _watch(self) -> bool:
        end = time.monotonic() + self.wait
        with SyncQmp(self.qmp, timeout=5.0, name="fastpath") as qmp:
            while time.monotonic() < end:
                listing = qmp.execute("qom-list", {"path": "/machine/peripheral"})
                if any(c.get("name") == self.qemu_id for c in listing):
                    return True
                time.sleep(0.02)
        return False

    def _release(self) -> None:
        end = time.monotonic() + 20.0
        while True:  # the daemon must have opened the FIFO (ENXIO: no reader yet)
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > end:
                    raise
                time.sleep(0.01)
        try:
            plain = self.fifo.with_name("serial.plain")
            plain.write_text(self.serial + "\n")
            plain.replace(self.fifo)  # later reads find a file; the open FIFO lives on
            os.write(fd, (self.serial + "\n").encode())
        finally:
            os.close(fd)


def _prepare(r: Rig, d: Daemon, wait: float, new_serial: str | None = None) -> ProbeHold:
    """Unplugged keyboard, its serial a FIFO; the hold that will watch for its id."""
    path = r.kernel.stash / KBD / "serial"
    serial = path.read_text().strip()
    path.unlink()
    os.mkfifo(path)
    real = r.kernel.where[KBD]  # where it comes back
    qemu_id = d._left[KBD].qemu_id
    return ProbeHold(real / "serial", new_serial or serial, r.qemu("a").qmp_paths[1], qemu_id, wait)


async def _plug_held(r: Rig, hold: ProbeHold) -> None:
    hold.start()
    r.kernel.plug(KBD, devnum=42)
    # the daemon's loop blocks in the read until the hold lets it go
    await asyncio.to_thread(hold.join, 30.0)
    assert not hold.is_alive(), "the daemon never read the serial"
    if hold.error is not None:
        raise hold.error


def _attaches(r: Rig, identity: str) -> list[tuple[str, str | None]]:
    assert r.store is not None
    return [
        (e.kind, e.result)
        for e in r.store.history(identity, limit=None)
        if e.kind in ("attach", "detach")
    ]


async def test_replug_is_attached_before_the_device_can_be_read(rig: Rig) -> None:
    d = await rig.up(BY_ID)
    identity, qemu_id = d.inventory[KBD].identity, d.inventory[KBD].qemu_id
    assert d.inventory[KBD].serial  # its identity, and so its QEMU id, needs the serial
    rig.kernel.unplug(KBD)
    await until(lambda: _has(rig.ports("a"), set()), what="detached")
    hold = _prepare(rig, d, wait=10.0)
    await _plug_held(rig, hold)
    assert hold.held_before_read, "QEMU did not hold the device before its serial was read"
    await until(lambda: _has(rig.ports("a"), {KBD}), what="attached after the replug")
    assert set(await rig.held("a")) == {qemu_id}
    assert d.inventory[KBD].devnum == 42 and d.inventory[KBD].identity == identity
    assert await d.wait_converged(10.0)
    # exactly once: one attach per plug, the replug's journaled under the read identity
    assert _attaches(rig, identity) == [("attach", "ok"), ("detach", "ok"), ("attach", "ok")]
    assert d.stats.actions_ok == 3


async def test_no_uevent_is_read_while_the_early_device_add_is_in_flight(rig: Rig) -> None:
    """The replug's device_add waits for QEMU (here SIGSTOPped: on a real kernel
    it waits for the probe); the uevents behind the ``add`` stay in the source
    meanwhile and are handled, in order, once QEMU answered."""
    d = await rig.up(BY_ID)
    qemu_id = d.inventory[KBD].qemu_id
    rig.kernel.unplug(KBD)
    await until(lambda: _has(rig.ports("a"), set()), what="detached")
    assert await d.wait_converged(10.0)  # no pass left to talk to the QEMU stopped next
    events = d.stats.events
    vm = rig.qemu("a")
    vm.kill(signal.SIGSTOP)
    try:
        rig.kernel.plug(KBD, devnum=43)
        await asyncio.sleep(1.0)  # the add read, its device_add sent to the stopped QEMU
        assert d.stats.events == events, "the add was handled before QEMU answered"
        rig.kernel.unplug(TABLET)  # behind the add, while QEMU has not answered
        await asyncio.sleep(0.5)
        # (the keyboard's bind came in the add's own read: FakeKernel writes them at once)
        read = [e for e in d._host_queue if e is not None and e.port == TABLET]
        assert not read, "an event was read while the device_add was in flight"
        assert TABLET in d.inventory
    finally:
        vm.kill(signal.SIGCONT)
    await until(lambda: _true(TABLET not in d.inventory), what="the tablet's remove handled")
    await until(lambda: _has(rig.ports("a"), {KBD}), what="attached after the replug")
    assert set(await rig.held("a")) == {qemu_id}


async def _true(value: bool) -> bool:
    return value


async def test_a_wrong_guess_is_replaced_by_the_device_read(rig: Rig) -> None:
    d = await rig.up(BY_ID)
    old = d.inventory[KBD].qemu_id
    rig.kernel.unplug(KBD)
    await until(lambda: _has(rig.ports("a"), set()), what="detached")
    # another keyboard of the same make, another serial, in the same socket
    hold = _prepare(rig, d, wait=10.0, new_serial="another-one")
    await _plug_held(rig, hold)
    assert hold.held_before_read  # added early under the old device's id
    new = d.inventory[KBD]
    assert new.serial == "another-one" and new.qemu_id != old
    await until(
        lambda: _has_ids(rig, {new.qemu_id}), what="the guessed id replaced by the device's"
    )
    assert await d.wait_converged(10.0)
    assert _attaches(rig, new.identity) == [("attach", "ok")]


async def _has_ids(r: Rig, want: set[str]) -> bool:
    return set(await r.held("a")) == want


async def test_a_rule_that_needs_the_serial_waits_for_the_read(rig: Rig) -> None:
    d = await rig.up(BY_SERIAL)
    identity = d.inventory[KBD].identity
    rig.kernel.unplug(KBD)
    await until(lambda: _has(rig.ports("a"), set()), what="detached")
    hold = _prepare(rig, d, wait=1.5)
    await _plug_held(rig, hold)
    assert hold.held_before_read is False, "attached on a rule the uevent cannot answer"
    await until(lambda: _has(rig.ports("a"), {KBD}), what="attached after the read")
    assert _attaches(rig, identity) == [("attach", "ok"), ("detach", "ok"), ("attach", "ok")]


class CountingQmpVm(QmpVm):
    """A real QmpVm that counts the commands it sends (which, not how)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent: list[str] = []

    async def _exec(
        self, client: Any, cmd: str, args: Mapping[str, object] | None = None
    ) -> object:
        self.sent.append(cmd)
        return await super()._exec(client, cmd, args)


async def test_a_new_session_reads_every_binding_with_one_info_qtree(
    qemu: QemuFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted daemon meets 25 devices a VM: one ``info qtree`` instead of
    three qom-gets each, and the same bindings as the qom-gets give."""
    proc = qemu(qmp_sockets=2)
    proc.start()
    specs = {
        f"vmplug-{i:012x}": UsbHostSpec(hostbus=1 + i % 3, hostport=f"{1 + i % 4}.{1 + i}")
        for i in range(25)
    }
    adder = QmpVm("adder", str(proc.qmp_paths[0]))
    await adder.start()
    try:
        assert await adder.wait_connected(10.0)
        for dev_id, spec in specs.items():
            await adder.attach(dev_id, spec)
    finally:
        await adder.stop()
    seen: list[dict[str, object]] = []
    for qtree_min in (QTREE_MIN, 10**6):  # the qtree read, then qom-gets alone
        vm = CountingQmpVm("fresh", str(proc.qmp_paths[1]))
        monkeypatch.setattr("vmplug.vms.qmp.QTREE_MIN", qtree_min)
        await vm.start()
        try:
            assert await vm.wait_connected(10.0)
            vm.sent.clear()
            got = await vm.observe_bindings()
        finally:
            await vm.stop()
        assert {k: (b.hostbus, b.hostport) for k, b in got.items()} == {
            k: (s.hostbus, s.hostport) for k, s in specs.items()
        }
        assert all(b.hostaddr is None for b in got.values())
        seen.append(dict(got))
        if qtree_min == QTREE_MIN:
            assert vm.sent == ["qom-list", "human-monitor-command"], vm.sent
        else:
            assert vm.sent.count("qom-get") == 3 * len(specs), vm.sent
    assert seen[0] == seen[1]


async def test_a_replug_read_in_flux_gets_no_second_identity(rig: Rig) -> None:
    """Issue 19's guarantee with the fast path: the replug is added early under the
    id of the device that left; its read then meets the device still being set up
    (in flux: no identity from a half-read device), so the early attachment is
    taken back until the device reads whole, and then attached under its own id.
    No other id is ever added, the journal names only real identities, and the
    ``add`` is journaled once."""
    d = await rig.up(BY_ID)
    identity, qemu_id = d.inventory[KBD].identity, d.inventory[KBD].qemu_id
    rig.kernel.unplug(KBD)
    await until(lambda: _has(rig.ports("a"), set()), what="detached")
    assert await d.wait_converged(10.0)
    assert rig.store is not None
    store = rig.store
    before = len(_attaches(rig, identity))
    assert before == 2  # attach at start, detach on unplug
    seq = rig.kernel.plug_setting_up(KBD, devnum=43)  # add sent; its read is in flux

    async def taken_back() -> bool:
        return len(_attaches(rig, identity)) >= before + 2 and KBD not in d.inventory

    await until(taken_back, what="the early attach taken back while the device is unread")
    rig.kernel.finish_setup(KBD)
    await until(lambda: _has_ids(rig, {qemu_id}), what="attached once read whole")
    assert d.inventory[KBD].identity == identity and d.inventory[KBD].devnum == 43
    assert await d.wait_converged(10.0)
    rows = store.history(None, limit=None)
    real = {dev.identity for dev in d.inventory.values()}
    assert {r.identity for r in rows if r.identity} <= real, rows
    assert {r.qemu_id for r in rows if r.is_action} == {qemu_id}, rows
    adds = [r for r in rows if r.kind == "device-add" and r.port == KBD]
    assert len([r for r in adds if (r.detail or {}).get("seqnum") == seq]) == 1
    assert _attaches(rig, identity)[before:] == [
        ("attach", "ok"),
        ("detach", "ok"),
        ("attach", "ok"),
    ]
