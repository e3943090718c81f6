"""Lab: a VM that refuses device_add (no USB controller) drives the whole ladder
on a real kernel -- the daemon inside the lab guest (``--events kernel``, the
guest's /sys and /dev/bus/usb) climbs reattach, reset (USBDEVFS_RESET),
port-cycle (the hub port's disable) and reauthorize, and the kernel does each.

The port-cycle rung is used only where the hub says it switches each port's
power (``wHubCharacteristics``, read by the daemon over usbfs); elsewhere the
ladder journals the skip and goes on to reauthorize.  Three devices, three hubs:

* the demo's keyboard on QEMU's ``usb-hub`` (2-2, claims no power switching):
  reattach, reset (dmesg shows it), reauthorize;
* a tablet on EHCI's root hub (usb1, claims none; a port cycle there was
  measured to leave the device disconnected for good): it climbs past the
  port cycle to reauthorize and is still there, authorized, its driver bound;
* a keyboard on a ``usb-hub`` with ``port-power=on`` (2-3, claims per-port):
  all four rungs, the port cycle journaled as ``power cycled`` (the port read
  unpowered from its hub while disabled) and the keyboard back with a new
  address.

The guest (and the daemon and VM in it) is stopped by PID in teardown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug_lab.demo import GUEST_DIR, KBD, PORTS, VM_COMMAND, VM_NAME, DemoLab
from vmplug_lab.guest import LabDevice, lab_unavailable_reason

pytestmark = pytest.mark.lab

PORT = PORTS[KBD.id]  # 2-2.1, on the demo's usb-hub 2-2
EHCI_PORT = "1-1"  # EHCI's root hub port 1
PP_PORT = "2-3.1"  # a usb-hub with port power switching on xHCI port 3
EXTRA = (
    LabDevice("usb-tablet", "ehci.0", "1", "ehcitablet"),
    LabDevice("usb-hub", "xhci.0", "3", "pphub", {"port-power": "on"}),
    LabDevice("usb-kbd", "xhci.0", "3.1", "ppkbd"),
)
ALL = (PORT, EHCI_PORT, PP_PORT)
CONFIG = f"""\
[vm.{VM_NAME}]
qmp = "{GUEST_DIR}/vm.sock"

[heal]
attach_refusals = 2
interval_s = 0.5
""" + "".join(
    f"""
[[rule]]
attach = "{VM_NAME}"
match = 'via-port "{port}"'
"""
    for port in ALL
)
NO_SWITCHING = "no per-port power switching (none): port-cycle cuts no power there"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = DemoLab(Path(tmp_path_factory.mktemp("heal")))
    lab.guest.devices.extend(EXTRA)  # on the guest's QEMU command line
    try:
        lab.boot()
        for port in ALL:
            lab.guest.wait_for(f"test -e /sys/bus/usb/devices/{port}/devnum", timeout=120)
        yield lab
    finally:
        lab.close()


def _devnum(lab: DemoLab, port: str) -> int:
    return int(lab.guest.run(f"cat /sys/bus/usb/devices/{port}/devnum", check=True).stdout)


def test_a_vm_without_usb_drives_the_ladder_and_port_cycle_only_where_power_is_cut(
    lab: DemoLab,
) -> None:
    g = lab.guest
    (g.workdir / "vmplug.toml").write_text(CONFIG)
    before = {port: _devnum(lab, port) for port in ALL}
    no_usb = VM_COMMAND.replace(" -device qemu-xhci,id=xhci", "")
    assert no_usb != VM_COMMAND
    lab.vm = g.spawn(no_usb, log=f"{g.workdir}/vm-nousb.log")
    lab.start_daemon()
    want = {PORT: 3, EHCI_PORT: 3, PP_PORT: 4}
    rungs: dict[str, list[str]] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = lab.daemon_log()
        for port in ALL:
            pat = re.compile(rf"heal {re.escape(port)} \(.*\): (\S+) because attach refused")
            rungs[port] = [m.group(1) for ln in lines if (m := pat.search(ln))]
        if all(len(rungs[p]) >= n for p, n in want.items()):
            break
        time.sleep(1)
    lines = lab.daemon_log()
    tail = "\n".join(lines[-60:])
    failed = [m.groups() for ln in lines if (m := re.search(r"heal (\S+): (\S+) failed: (.*)", ln))]
    assert failed == [], failed  # the real kernel took every rung
    skips = {
        m.group(1): m.group(2)
        for ln in lines
        if (m := re.search(r"heal (\S+) \(.*\): port-cycle skipped: (.*)", ln))
    }
    # QEMU's usb-hub and EHCI's root hub: no port cycle, the skip says why
    assert rungs[PORT] == ["reattach", "reset", "reauthorize"], tail
    assert rungs[EHCI_PORT] == ["reattach", "reset", "reauthorize"], tail
    assert skips[PORT].startswith(f"hub 2-2 has {NO_SWITCHING}"), skips
    assert skips[EHCI_PORT].startswith(f"hub usb1 has {NO_SWITCHING}"), skips
    # the hub that switches power per port: the port cycle, power measured off
    assert rungs[PP_PORT] == ["reattach", "reset", "port-cycle", "reauthorize"], tail
    assert PP_PORT not in skips, skips
    assert any(f"heal {PP_PORT}: port-cycle: power cycled" in ln for ln in lines), tail
    dmesg = g.run("dmesg", check=True).stdout
    assert re.search(rf"usb {re.escape(PORT)}: reset \S+ USB device number {before[PORT]}\b", dmesg)
    g.wait_for(f"test -e /sys/bus/usb/devices/{PP_PORT}/devnum", timeout=60)
    assert _devnum(lab, PP_PORT) != before[PP_PORT]  # power back: enumerated anew
    # the EHCI tablet was never stranded: same device, authorized, usbhid bound
    assert _devnum(lab, EHCI_PORT) == before[EHCI_PORT]
    for port in ALL:
        assert g.run(f"cat /sys/bus/usb/devices/{port}/authorized").stdout.strip() == "1"
    drv = g.run(f"readlink /sys/bus/usb/devices/{EHCI_PORT}:1.0/driver").stdout
    assert drv.strip().endswith("/usbhid"), drv
