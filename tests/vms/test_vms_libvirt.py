"""libvirt domains against a real libvirtd (session mode, private directories)
running TCG domains with no OS.  This host has no USB at all, so attaching a
hostdev fails inside libvirt: the error must be clear and the daemon must keep
retrying; the domain's lifecycle must reach vmplug as events.  Real attach,
replug and restart with real USB: tests/lab/test_lab_libvirt.py."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.vmrig import SYSFS_FIXTURES, Libvirt
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.host.events import ReplayEventSource
from vmplug.vms.base import UsbHostSpec, VmDisconnected, VmError
from vmplug.vms.base import VmEventKind as K
from vmplug.vms.factory import make_backend, one_shot
from vmplug.vms.libvirt import HostUsb, LibvirtVm, hostdev_xml, usb_hostdevs

pytestmark = pytest.mark.qemu

MIXED = SYSFS_FIXTURES / "mixed"


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def in_order(seen: list[K], wanted: list[K]) -> bool:
    """``wanted`` is a subsequence of ``seen``."""
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


@pytest.fixture
async def domain(libvirtd: Libvirt) -> AsyncIterator[str]:
    count = len(libvirtd.virsh("list", "--all", "--name").stdout.split())
    name = f"vmplug-t{count}"
    libvirtd.define(name)
    yield name
    libvirtd.virsh("destroy", name, check=False)
    libvirtd.virsh("undefine", name, check=False)


async def test_lifecycle_events_and_a_clear_attach_error(
    libvirtd: Libvirt, domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMPLUG_SYSFS_ROOT", str(MIXED))
    reasons: list[K] = []
    cfg = parse_config(f'[vm.w]\nlibvirt = "{domain}"\nuri = "{libvirtd.uri}"\n')
    vm = make_backend(cfg.vms["w"], lambda e: reasons.append(e.kind))
    assert isinstance(vm, LibvirtVm)
    await vm.start()
    try:
        assert await vm.wait_connected(30)
        assert reasons == [K.CONNECTED]
        assert await vm.observe() == {}
        # The device is in the (captured) sysfs tree, so vmplug names it exactly;
        # libvirt itself then looks for it on this host, which has no USB.
        with pytest.raises(VmError) as info:
            await vm.attach("vmplug-0123456789ab", UsbHostSpec.by_port(2, "2.4.2"))
        err = info.value
        assert not isinstance(err, VmDisconnected)
        assert "attach vmplug-0123456789ab (" in str(err)
        assert "/sys/bus/usb/devices" in str(err)
        assert err.qmp_class == "libvirt.VIR_ERR_SYSTEM_ERROR"
        # a port with nothing in it: vmplug's own error, before libvirt is asked
        with pytest.raises(VmError, match="no USB device at port 2-7 on the host"):
            await vm.attach("vmplug-0123456789ab", UsbHostSpec.by_port(2, "7"))
        # lifecycle: events, not polling
        libvirtd.virsh("destroy", domain)
        await until(lambda: not vm.connected)
        assert reasons[-1:] == [K.DISCONNECTED]
        with pytest.raises(VmDisconnected, match="is not running"):
            await vm.observe()
        libvirtd.virsh("start", domain)
        await until(lambda: vm.connected)
        assert reasons[-1:] == [K.CONNECTED]
        libvirtd.virsh("reset", domain)
        await until(lambda: reasons[-1] == K.RESET)
        libvirtd.virsh("suspend", domain)
        await until(lambda: reasons[-1] == K.STOP)
        libvirtd.virsh("resume", domain)
        await until(lambda: reasons[-1] == K.RESUME)
        # libvirt starts QEMU paused and resumes it (RESUME around a start), and
        # firmware with nothing to boot resets the guest now and then (RESET)
        assert in_order(reasons, [K.CONNECTED, K.DISCONNECTED, K.CONNECTED, K.RESET, K.STOP])
        assert reasons.count(K.CONNECTED) == 2 and reasons.count(K.DISCONNECTED) == 1
    finally:
        await vm.stop()


async def test_daemon_retries_a_failed_attach(
    libvirtd: Libvirt, domain: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysfs = tmp_path / "sysfs"
    shutil.copytree(MIXED, sysfs, symlinks=True)
    events = tmp_path / "uevents"
    os.mkfifo(events)
    keep = os.open(events, os.O_RDWR | os.O_NONBLOCK)
    config_path = tmp_path / "vmplug.toml"
    config_path.write_text(
        f'[vm.w]\nlibvirt = "{domain}"\nuri = "{libvirtd.uri}"\n\n'
        '[[rule]]\nattach = "w"\nmatch = \'via-port "2-2.4.2"\'\n'
    )
    monkeypatch.setenv("VMPLUG_SYSFS_ROOT", str(sysfs))
    daemon = Daemon(
        parse_config(config_path.read_text(), config_path),
        sysfs_root=sysfs,
        source=ReplayEventSource(events),
        config_path=config_path,
    )
    await daemon.start()
    try:
        await until(lambda: daemon.stats.actions_failed >= 3)
        status = daemon.status()
        (att,) = status["attachments"]
        assert att["state"] == "retrying" and att["attempts"] >= 3
        assert "/sys/bus/usb/devices" in att["error"]
        assert status["vms"]["w"]["connected"] is True
    finally:
        await daemon.stop()
        os.close(keep)


async def test_persist_writes_and_removes_the_config_element(
    libvirtd: Libvirt, domain: str
) -> None:
    """``persist``: the element goes into the persistent config (optional at
    start) and comes out by its alias; the live side is the lab's to prove."""
    vm = LibvirtVm("w", domain, uri=libvirtd.uri, persist=True, sysfs_root=MIXED)
    await vm.start()
    try:
        assert await vm.wait_connected(30)
        usb = HostUsb(bus=2, device=5, vendor=0x0627, product=0x0001, port="2.4.2")
        await vm._persist_attach(vm._domain(), "vmplug-0123456789ab", usb)
        await vm._persist_attach(vm._domain(), "vmplug-0123456789ab", usb)  # no duplicate
        saved = usb_hostdevs(await vm.domain_xml(inactive=True))
        assert [(h.dev_id, h.vendor, h.product, h.bus, h.device) for h in saved] == [
            ("vmplug-0123456789ab", 0x0627, 0x0001, 2, 5)
        ]
        assert 'startupPolicy="optional"' in saved[0].xml
        assert usb_hostdevs(await vm.domain_xml()) == [], (
            "config only: the live domain is as it was"
        )
        await vm.detach("vmplug-0123456789ab")
        assert usb_hostdevs(await vm.domain_xml(inactive=True)) == []
    finally:
        await vm.stop()


def test_hostdev_element() -> None:
    usb = HostUsb(bus=3, device=17, vendor=0x1235, product=0x821A, port="1.2")
    xml = hostdev_xml("vmplug-0123456789ab", usb)
    assert xml == (
        '<hostdev mode="subsystem" type="usb" managed="no"><source>'
        '<vendor id="0x1235" /><product id="0x821a" /><address bus="3" device="17" />'
        '</source><alias name="ua-vmplug-0123456789ab" /></hostdev>'
    )
    (parsed,) = usb_hostdevs(f"<domain><devices>{xml}</devices></domain>")
    assert (parsed.dev_id, parsed.bus, parsed.device, parsed.vendor) == (
        "vmplug-0123456789ab", 3, 17, 0x1235,
    )  # fmt: skip


async def test_libvirtd_restart_reconnects(libvirtd: Libvirt, domain: str) -> None:
    """libvirtd restarted under a running domain (an upgrade, a crash): vmplug
    hears the connection close, reconnects, and finds the domain running."""
    reasons: list[K] = []
    vm = LibvirtVm("w", domain, uri=libvirtd.uri, on_change=lambda e: reasons.append(e.kind))
    await vm.start()
    try:
        assert await vm.wait_connected(30)
        libvirtd.restart()
        await until(lambda: reasons.count(K.CONNECTED) == 2)
        assert reasons[:3] == [K.CONNECTED, K.DISCONNECTED, K.CONNECTED], reasons
        assert vm.connected and await vm.observe() == {}
    finally:
        await vm.stop()


async def test_one_shot_backend_for_commands_without_a_daemon(
    libvirtd: Libvirt, domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMPLUG_SYSFS_ROOT", str(MIXED))
    cfg = parse_config(
        f'[vm.w]\nlibvirt = "{domain}"\nuri = "{libvirtd.uri}"\n\n'
        f'[vm.x]\nlibvirt = "nosuch"\nuri = "{libvirtd.uri}"\n'
    )
    async with one_shot(cfg.vms["w"]) as vm:
        assert vm.connected and await vm.observe() == {}
        with pytest.raises(VmError, match="/sys/bus/usb/devices"):
            await vm.attach("vmplug-0123456789ab", UsbHostSpec.by_port(2, "2.4.2"))
    assert not vm.connected
    with pytest.raises(VmDisconnected, match="has no domain 'nosuch'"):
        async with one_shot(cfg.vms["x"], timeout=2):
            pass
