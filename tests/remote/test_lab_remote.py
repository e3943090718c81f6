"""Lab proof: USB devices of one real Linux guest (the device host) kept in a
second real Linux guest (the VM) over usbredir with mutual TLS.

The proof is the VM's own kernel, read through its guest agent: each device
appears in ``/sys/bus/usb/devices`` with its ids and its driver binds
(``usbhid``, ``usb-storage``, ``snd-usb-audio``).  Then the faults: replug on
the device host, its export side killed -9 and restarted (vmplug restarted
too: it adopts the devices), detach, and the device host's network cut and
restored.  The tests run in order on one pair of guests (module scope).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.remote.labrig import AUDIO, KBD, REMOTES, STICK, RemoteLab
from vmplug.vms.qmp import QmpVm
from vmplug_lab.guest import lab_unavailable_reason

pytestmark = [pytest.mark.lab, pytest.mark.long_lab, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    rig = RemoteLab(Path(tmp_path_factory.mktemp("remote")))
    try:
        rig.boot()
        rig.start_export()
        yield rig
    finally:
        rig.close()


async def _vm(lab: RemoteLab) -> QmpVm:
    vm = QmpVm("vm", str(lab.vm_qmp))
    await vm.start()
    assert await vm.wait_connected(30)
    return vm


async def test_remote_devices_bind_in_the_vms_kernel(lab: RemoteLab) -> None:
    vm = await _vm(lab)
    try:
        for remote in REMOTES:
            await vm.attach(remote.dev_id, lab.spec(remote))
        for remote in REMOTES:
            lab.wait_in_guest(remote)
        seen = {d["ids"]: d for d in lab.guest_devices().values()}
        for remote in REMOTES:
            assert remote.ids in seen, seen
            assert remote.driver in seen[remote.ids]["drivers"].replace("_", "-"), seen
        observed = await vm.observe()
        assert {r.dev_id for r in REMOTES} == set(observed)
        assert all(d.attached and d.driver == "usb-redir" for d in observed.values())
        assert await vm.redir_links() == {r.dev_id: True for r in REMOTES}
        holders = {e["name"]: e["holder"] for e in lab.export_status()}
        assert holders == {r.name: "vmhost" for r in REMOTES}
    finally:
        await vm.stop()


async def test_replug_on_the_device_host_comes_back(lab: RemoteLab) -> None:
    lab.dev.unplug(KBD.lab.id)
    lab.wait_in_guest(KBD, present=False)
    lab.dev.hotplug(KBD.lab)
    took = lab.wait_in_guest(KBD)
    print(f"replug -> bound in the VM's kernel: {took:.1f} s")
    # the others were not disturbed
    lab.wait_in_guest(STICK, timeout=5)
    lab.wait_in_guest(AUDIO, timeout=5)


async def test_export_side_killed_and_restarted(lab: RemoteLab) -> None:
    lab.kill_export(9)
    for remote in REMOTES:
        lab.wait_in_guest(remote, present=False)
    lab.start_export()
    for remote in REMOTES:
        lab.wait_in_guest(remote)
    vm = await _vm(lab)
    try:  # vmplug restarted too (a new QmpVm): it adopts what is there, nothing doubled
        assert set(await vm.observe()) == {r.dev_id for r in REMOTES}
    finally:
        await vm.stop()


async def test_detach_removes_everything(lab: RemoteLab) -> None:
    vm = await _vm(lab)
    try:
        for remote in REMOTES:
            await vm.detach(remote.dev_id)
        assert await vm.observe() == {}
        assert await vm.redir_links() == {}
    finally:
        await vm.stop()
    for remote in REMOTES:
        lab.wait_in_guest(remote, present=False)
    deadline = time.monotonic() + 30
    while any(e["holder"] for e in lab.export_status()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(e["holder"] for e in lab.export_status()), lab.export_status()


async def test_network_cut_and_restored(lab: RemoteLab) -> None:
    vm = await _vm(lab)
    try:
        for remote in (KBD, STICK):
            await vm.attach(remote.dev_id, lab.spec(remote))
    finally:
        await vm.stop()
    for remote in (KBD, STICK):
        lab.wait_in_guest(remote)
    lab.set_link(False)
    time.sleep(8)
    lab.set_link(True)
    t0 = time.monotonic()
    for remote in (KBD, STICK):
        lab.wait_in_guest(remote, timeout=120)
    # the stream carries data again: read the remote stick in the VM
    found = lab.vm.run(
        "for i in $(seq 1 300); do for b in /sys/block/sd*; do [ -e $b ] && "
        "echo /dev/${b##*/} && exit 0; done; sleep 0.2; done; dmesg | tail -25; exit 1",
        timeout=120,
    )
    assert found.rc == 0, f"no disk of the remote stick in the VM: {found.stdout}"
    dev = found.stdout.split()[0]
    lab.vm.run(f"dd if={dev} of=/dev/null bs=64k count=16 iflag=direct", timeout=120, check=True)
    took = time.monotonic() - t0
    print(f"network restored -> devices in the VM and the stick readable: {took:.1f} s")
