"""The daemon end to end against real QEMU processes.

The host side is a sysfs tree captured from a real kernel (tests/fixtures/
sysfs) that the test changes the way the kernel would (a device directory
disappears on unplug, comes back with a new device number on replug), and the
uevents are replayed through a FIFO: each one is the captured device's own
``uevent`` file plus ACTION/DEVPATH/SUBSYSTEM/SEQNUM, as the kernel sends them.
Everything on the VM side is real: qemu-system-x86_64 with a qemu-xhci, a QMP
socket for vmplug and a second one the test reads QOM through.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.fakekernel import FakeKernel, until
from tests.support.qemurig import QemuRig
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.engine.desired import Attachment
from vmplug.history.store import Store
from vmplug.host.events import ReplayEventSource

pytestmark = pytest.mark.qemu

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"


class Rig(QemuRig):
    """Kernel, VMs and daemons of one test; everything stopped at teardown."""

    def __init__(self, tmp: Path, capture: str) -> None:
        super().__init__(tmp, "vmplug-d")
        self.kernel = FakeKernel(tmp, capture)
        self.daemons: list[Daemon] = []
        self.stores: list[Store] = []

    def write_config(self, rules: str, vms: tuple[str, ...] = ("a", "b")) -> None:
        self.config_path.write_text(self.vm_tables(vms) + rules)

    async def up(self, rules: str | None = None) -> Daemon:
        """Config, both VMs running, and a daemon started on them."""
        self.write_config(RULES_BY_PORT if rules is None else rules)
        self.qemu("a").start()
        self.qemu("b").start()
        return await self.daemon()

    async def daemon(self, cls: type[Daemon] = Daemon) -> Daemon:
        config = parse_config(self.config_path.read_text(), self.config_path)
        store = Store(self.tmp / "vmplug.db")
        self.stores.append(store)
        d = cls(
            config,
            sysfs_root=self.kernel.root,
            source=ReplayEventSource(self.kernel.fifo),
            store=store,
            config_path=self.config_path,
        )
        self.daemons.append(d)
        await d.start()
        return d

    async def stop_daemon(self, d: Daemon) -> None:
        await d.stop()
        self.daemons.remove(d)

    async def close(self) -> None:
        for d in list(self.daemons):
            await d.stop()
        for s in self.stores:
            s.close()
        await self.close_vms()
        self.kernel.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[[str], Rig]]:
    made: list[Rig] = []

    def make(capture: str) -> Rig:
        r = Rig(tmp_path, capture)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.close()


RULES_BY_PORT = """
[[rule]]
attach = "a"
match = 'via-port "2-2.4.2"'

[[rule]]
attach = "b"
match = 'via-port "1-3"'
"""


async def test_plug_unplug_replug_follow_the_device(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    d = await r.up()
    # at start: both present devices attached to the VM their rule names
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    await until(lambda: _eq(r.ports("b"), {"1-3"}))
    held = await r.held("a")
    kbd = next(iter(held.values()))
    assert kbd.id == d.inventory["2-2.4.2"].qemu_id and kbd.id.startswith("vmplug-")
    # unplug: detached from the VM (device_del, DEVICE_DELETED)
    r.kernel.unplug("2-2.4.2")
    await until(lambda: _eq(r.ports("a"), set()))
    assert await r.ports("b") == {"1-3"}
    # replug with a new device number: attached again, same stable id
    r.kernel.plug("2-2.4.2", devnum=42)
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    assert set((await r.held("a")).keys()) == {kbd.id}
    assert d.inventory["2-2.4.2"].devnum == 42
    # the history tells the story in order
    kinds = [(e.kind, e.result) for e in r.stores[0].history(kbd_identity(d), limit=None)]
    attach_ok = [k for k in kinds if k == ("attach", "ok")]
    assert len(attach_ok) == 2
    assert ("detach", "ok") in kinds and ("device-remove", None) in kinds
    assert d.stats.event_to_add, "the bind-to-device_add latency was measured"


def kbd_identity(d: Daemon) -> str:
    return d.inventory["2-2.4.2"].identity


async def _eq(value: Awaitable[set[str]], want: set[str]) -> bool:
    return await value == want


async def test_vm_started_after_device_and_vm_restart(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    r.write_config(RULES_BY_PORT)
    d = await r.daemon()  # no VM runs yet: the sockets do not exist
    await asyncio.sleep(0.3)
    assert not d.vms["a"].connected
    r.qemu("a").start()  # VM appears later: vmplug connects and attaches
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    # VM killed and started again on the same socket: attached again
    r.qemus["a"].kill()
    r.qemus["a"].wait()
    await until(lambda: _false(d.vms["a"].connected))
    r.observers.pop("a")
    r.qemus["a"].start()
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}), timeout=20)
    kinds = [e.kind for e in r.stores[0].history(None, limit=None)]
    assert "vm-down" in kinds and kinds.count("vm-up") >= 2


async def _false(value: bool) -> bool:
    return not value


async def test_daemon_restart_adopts_and_never_attaches_twice(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    d1 = await r.up()
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    # both VMs' attaches done (b's may still be in flight when a's is seen)
    assert await d1.wait_converged(10)
    await r.stop_daemon(d1)  # leaves attached devices attached
    assert await r.ports("a") == {"2-2.4.2"}
    store = r.stores[0]
    before = store.count()
    d2 = await r.daemon()
    assert await d2.wait_converged(10)
    assert await r.ports("a") == {"2-2.4.2"}
    assert len(await r.held("a")) == 1
    after = store.history(None, limit=None)
    new = [e for e in after if e.id > before and e.entry == "action"]
    assert {(e.kind, e.vm) for e in new} == {("adopt", "a"), ("adopt", "b")}


async def test_reload_moves_devices_and_refuses_a_bad_config(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    d = await r.up()
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    # the keyboard now goes to b
    r.write_config(RULES_BY_PORT.replace('attach = "a"', 'attach = "b"'))
    ok, _ = await d.reload()
    assert ok
    await until(lambda: _eq(r.ports("b"), {"2-2.4.2", "1-3"}))
    assert await r.ports("a") == set()
    # an invalid config is refused; the running one stays and nothing moves
    r.config_path.write_text(
        r.config_path.read_text() + "\n[[rule]]\nattach = 'nope'\nmatch = 'id 1:*'\n"
    )
    ok, message = await d.reload()
    assert not ok and "nope" in message
    await asyncio.sleep(0.3)
    assert await r.ports("b") == {"2-2.4.2", "1-3"}
    routes = [e for e in r.stores[0].history(None, limit=None) if e.kind == "device-route"]
    assert [(e.port, e.vm) for e in routes] == [("2-2.4.2", "b")]


async def test_identical_devices_go_to_two_vms_by_port(rig: Callable[[str], Rig]) -> None:
    r = rig("identical")
    links = (r.kernel.root / "bus/usb/devices").iterdir()
    devices = sorted(p.name for p in links if ":" not in p.name and "-" in p.name)
    first, second = devices[0], devices[1]
    await r.up(
        f"[[rule]]\nattach = 'a'\nmatch = 'via-port \"{first}\"'\n"
        f"[[rule]]\nattach = 'b'\nmatch = 'via-port \"{second}\"'\n"
    )
    await until(lambda: _eq(r.ports("a"), {first}))
    await until(lambda: _eq(r.ports("b"), {second}))
    ids = set(await r.held("a")) | set(await r.held("b"))
    assert len(ids) == 2  # distinct stable ids although vid:pid (and serial) are the same


async def test_first_matching_rule_wins(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    # both rules match the keyboard; the first sends it to b
    d = await r.up(
        "[[rule]]\nattach = 'b'\nmatch = 'id 0627:0001 with-interface { 03:01:01 }'\n"
        "[[rule]]\nattach = 'a'\nmatch = 'via-port \"2-2.4.2\"'\n"
        "[[rule]]\nblock = true\nmatch = 'id 0627:*'\n"
    )
    await until(lambda: _eq(r.ports("b"), {"2-2.4.2"}))
    assert await d.wait_converged(5)
    assert await r.ports("a") == set()  # tablets are blocked, hubs never go anywhere


async def test_overflow_rescans_and_catches_up(rig: Callable[[str], Rig]) -> None:
    r = rig("mixed")
    d = await r.up()
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    # the device goes away but its uevent is "lost": only an overflow arrives
    real = r.kernel.devdir("2-2.4.2")
    (r.kernel.root / "bus/usb/devices/2-2.4.2").unlink()
    shutil.rmtree(real)
    rescans = d.stats.rescans
    r.kernel.overflow()
    await until(lambda: _eq(r.ports("a"), set()))
    assert d.stats.rescans == rescans + 1


async def test_failed_attach_is_retried_until_the_vm_can_take_it(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    r = rig("mixed")
    # VM a has no USB controller: every attach fails with a QMP error
    r.qemu("a", usb=False).start()
    r.write_config(RULES_BY_PORT)
    r.qemu("b").start()
    d = await r.daemon()
    key = ("a", d.inventory["2-2.4.2"].qemu_id)
    await until(lambda: _true(key in d.retries))
    # retried: a second attempt comes (self-healing's reattach rung starts a
    # fresh series after every third refusal, so sample until one is seen)
    await until(lambda: _true(key in d.retries and d.retries[key].attempt >= 2))
    retry = d.retries[key]
    assert retry.attempt >= 2 and "USB" in retry.error
    errors = [e for e in r.stores[0].history(None, limit=None) if e.result == "error"]
    assert errors and all(e.vm == "a" for e in errors)
    # the VM comes back with a controller: the retry succeeds
    r.qemus["a"].cleanup()
    r.qemus.pop("a")
    old_observer = r.observers.pop("a", None)
    if old_observer is not None:
        await old_observer.stop()
    r.qemu("a").start()
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}), timeout=40)
    assert await r.ports("b") == {"1-3"}


async def _true(value: bool) -> bool:
    return value


class RefusedNodeDaemon(Daemon):
    """Believes every device has a usbfs node, at a path no host has (bus 255):
    QEMU itself refuses it, as it would a node gone again or not permitted."""

    def devnode(self, att: Attachment) -> str | None:
        return f"/dev/bus/usb/255/{att.hostaddr:03d}" if att.hostaddr else None


async def test_a_node_qemu_refuses_falls_back_to_the_port_form(
    rig: Callable[[str], Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmplug")
    r = rig("mixed")
    r.write_config(RULES_BY_PORT)
    r.qemu("a").start()
    r.qemu("b").start()
    d = await r.daemon(RefusedNodeDaemon)
    await until(lambda: _eq(r.ports("a"), {"2-2.4.2"}))
    assert await d.wait_converged(10)
    (obs,) = (await r.held("a")).values()
    assert obs.hostaddr is None and obs.hostport == "2.4.2"  # the port form: QEMU re-grabs
    assert d.observed["a"][obs.id].hostaddr is None  # and vmplug knows it is not pinned
    kinds = [(e.kind, e.result) for e in r.stores[0].history(kbd_identity(d), limit=None)]
    assert kinds.count(("attach", "ok")) == 1
    assert ("attach", "error") not in kinds  # one action, no failure to count in health
    refused = [rec.getMessage() for rec in caplog.records if "refused" in rec.getMessage()]
    assert any("/dev/bus/usb/255/" in m and "attaching by port" in m for m in refused)
