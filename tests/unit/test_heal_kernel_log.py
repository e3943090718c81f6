"""The healer's kernel-log triggers over the doctor's kernel-log fixtures (the
errors in the kernel's own format strings; a real guest's replug log has none)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from functools import partial
from pathlib import Path

from tests.support.fakekernel import FakeKernel, until
from vmplug.config import parse_config
from vmplug.daemon.heal import parse_kernel_line
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import HistoryEntry, Store
from vmplug.host.events import ReplayEventSource
from vmplug.host.usbctl import port_of

KERNEL = Path(__file__).parents[1] / "fixtures" / "doctor" / "kernel"


def test_each_error_is_found_on_its_port() -> None:
    hits = [parse_kernel_line(ln) for ln in (KERNEL / "hub-errors.log").read_text().splitlines()]
    found = [(h[0], h[1]) for h in hits if h is not None]
    assert found == [
        ("3-2", "descriptor-read"),
        ("3-2", "descriptor-read"),
        ("3-2", "not-accepting-address"),
        ("3-2", "cannot-enumerate"),  # usb3-port2: the root hub's port 2
        ("1-4", "over-current"),
    ]


def test_a_normal_replug_log_triggers_nothing() -> None:
    lines = (KERNEL / "lab-replug.log").read_text().splitlines()
    assert lines and all(parse_kernel_line(ln) is None for ln in lines)


def test_kmsg_records_are_read_like_dmesg_lines() -> None:
    line = (KERNEL / "hub-errors.log").read_text().splitlines()[1].split("] ", 1)[1]
    hit = parse_kernel_line(f"3,812,817233114,-;{line}")
    assert hit is not None and hit[0] == "3-2" and hit[2] == line


def test_port_paths_name_their_hub_port() -> None:
    assert (port_of("2-2.4.2").hub, port_of("2-2.4.2").number) == ("2-2.4", 2)
    assert (port_of("3-1").hub, port_of("3-1").number) == ("usb3", 1)


KBD, TABLET = "2-2.4.2", "2-2.4.1"  # in the captured "mixed" tree


async def test_a_line_while_the_device_is_set_up_again_is_that_devices(tmp_path: Path) -> None:
    """The kernel logs an enumeration error while the device it re-enumerates
    is not read yet (its ``port`` link comes after the probe): the line is the
    device's last seen on that port, and the ladder answers it once the device
    reads whole.  The same line for a device no rule routes: journaled, no rung.
    A real daemon and journal on a captured tree, the kernel log a FIFO."""
    kernel = FakeKernel(tmp_path, "mixed")
    config = tmp_path / "vmplug.toml"
    config.write_text(
        f"""[vm.a]
qmp = "{tmp_path}/no-vm.sock"

[heal]
attach_refusals = 1000
drops = 1000
interval_s = 0.2

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'
"""
    )
    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    store = Store(tmp_path / "vmplug.db")
    d = Daemon(
        parse_config(config.read_text(), config), sysfs_root=kernel.root,
        source=ReplayEventSource(kernel.fifo), store=store, config_path=config,
    )  # fmt: skip
    d.kernel_log = kmsg
    try:
        await d.start()

        async def present(port: str, want: bool = True) -> bool:
            return (port in d.inventory) is want

        await until(partial(present, KBD), what="keyboard read")
        ident, tablet = d.inventory[KBD].identity, d.inventory[TABLET].identity
        kernel.unplug(KBD)
        await until(partial(present, KBD, False), what="keyboard gone")
        kernel.plug_setting_up(KBD, devnum=99)
        for port in (TABLET, KBD):
            line = f"3,900,1,-;usb {port}: can't set config #1, error -110\n"
            os.write(writer, line.encode())

        async def kernel_errors() -> list[HistoryEntry]:
            return [e for e in store.history(None, limit=None) if e.kind == "kernel-error"]

        await until(lambda: _longer(kernel_errors(), 1), what="both lines journaled")
        errors = {e.port: e for e in await kernel_errors()}
        seen = {p: (e.identity, dict(e.detail or {}).get("present")) for p, e in errors.items()}
        # the keyboard's journaled while it was in flux (not read), as the keyboard's
        assert seen == {KBD: (ident, False), TABLET: (tablet, True)}, seen
        kernel.finish_setup(KBD)

        async def heals(who: str) -> list[HistoryEntry]:
            return [e for e in store.history(who, limit=None) if e.kind.startswith("heal")]

        await until(lambda: _longer(heals(ident), 0), what="the keyboard's first rung")
        first = (await heals(ident))[0]
        assert first.detail is not None and first.detail["rung"] == "reattach"
        assert first.detail["reason"] == f"kernel: usb {KBD}: can't set config #1, error -110"
        assert await heals(tablet) == []  # no rule sends it to a VM
    finally:
        await d.stop()
        store.close()
        os.close(writer)
        kernel.close()


async def _longer(rows: Awaitable[list[HistoryEntry]], n: int) -> bool:
    return len(await rows) > n


async def test_records_wait_for_the_read_not_a_reader_of_their_own(tmp_path: Path) -> None:
    """The kernel log is read when the healer ticks: records that arrive in
    between (a replug logs ~10 while the kernel probes it) wake nothing, and
    one read takes them all, split at record ends."""
    from vmplug.daemon.heal import KernelLog  # noqa: PLC0415

    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    got: list[str] = []
    reader = KernelLog(kmsg, got.append)
    reader.start()
    try:
        os.write(writer, b"6,1,1,-;usb 2-2.1: new full-speed USB device\n6,2,2,-;usb 2-2.1: Prod")
        await asyncio.sleep(0.2)  # the loop runs: no reader of its own takes them
        assert got == []
        reader.read()
        assert got == ["6,1,1,-;usb 2-2.1: new full-speed USB device"]
        os.write(writer, b"uct: QEMU USB Keyboard\n")
        reader.read()
        assert got[1:] == ["6,2,2,-;usb 2-2.1: Product: QEMU USB Keyboard"]
    finally:
        reader.stop()
        os.close(writer)


async def test_a_read_error_other_than_an_overrun_ends_the_read(tmp_path: Path) -> None:
    """EPIPE (records overwritten) is skipped; any other error (here EISDIR: the
    path is a directory) ends the read instead of spinning on it."""
    from vmplug.daemon.heal import KernelLog  # noqa: PLC0415

    reader = KernelLog(tmp_path, lambda _line: None)
    reader.start()
    try:
        await asyncio.wait_for(asyncio.to_thread(reader.read), 5.0)
        assert reader._fd is None  # given up: not warned again at every tick
        reader.read()
    finally:
        reader.stop()
