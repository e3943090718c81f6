"""Lab: the healing ladder's levers (vmplug.host.usbctl) on a real kernel.

One ``mixed`` guest: the emulated keyboard on the nested hub (2-2.4.2) is
reset with USBDEVFS_RESET, its hub port disabled and enabled, de-authorized
and authorized; each time the kernel's own uevents for that port (a netlink
socket in the guest) show what the lever did.  Stopped by PID in teardown.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug_lab.guest import LabGuest, lab_unavailable_reason
from vmplug_lab.topologies import MIXED

pytestmark = pytest.mark.lab

PROBE = Path(__file__).with_name("usbctl_probe.py")
PY = sys.executable
KBD = "2-2.4.2"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = LabGuest(MIXED, tmp_path_factory.mktemp("lab"))
    try:
        lab.start()
        lab.wait_for(f"test -e /sys/bus/usb/devices/{KBD}/devnum", timeout=120)
        lab.run("udevadm settle --timeout=30", timeout=60)
        yield lab
    finally:
        lab.stop()


def _lever(guest: LabGuest, lever: str) -> dict[str, Any]:
    res = guest.run(f"{PY} {PROBE} {lever} {KBD}", timeout=60)
    assert res.rc == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    assert out["error"] is None, out
    return out


def test_usbdevfs_reset_rebinds_the_device_in_place(guest: LabGuest) -> None:
    out = _lever(guest, "reset")
    # the same device, same address: the kernel reset its port and re-enumerated it
    # in place (usbhid has pre_reset/post_reset hooks: it stays bound, no uevents)
    assert out["after"] == out["before"]
    dmesg = guest.run("dmesg").stdout
    assert re.search(rf"usb {re.escape(KBD)}: reset \S+ USB device number {out['before']}\b", dmesg)


def test_port_disable_disconnects_and_enumerates_anew(guest: LabGuest) -> None:
    out = _lever(guest, "port-cycle")
    assert out["disable"].endswith("2-2.4:1.0/2-2.4-port2/disable")
    mine = [a for a, name in out["events"] if name == KBD]
    assert "remove" in mine and "add" in mine, out
    assert out["after"] is not None and out["after"] != out["before"]


def test_deauthorize_authorize_unconfigures_and_configures(guest: LabGuest) -> None:
    out = _lever(guest, "reauthorize")
    ifaces = [a for a, name in out["events"] if name.startswith(f"{KBD}:")]
    assert "remove" in ifaces and "add" in ifaces, out
    assert out["after"] == out["before"]  # the port was not touched
    assert guest.run(f"cat /sys/bus/usb/devices/{KBD}/authorized").stdout.strip() == "1"
