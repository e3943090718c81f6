"""Lab (real kernel): the daemon's uevent socket overflowing for real, and the
rungs the healer carries out that only a real kernel can judge.

One ``mixed`` guest; vmplug's daemon runs in it on /sys, the guest kernel's
netlink uevents and /dev/bus/usb (tests/lab/heal_probe.py):

* a burst of real ``change`` uevents plus a real replug (hub port disabled and
  enabled: new address) while the daemon's loop is busy.  With a receive
  buffer of 4 KiB (``VMPLUG_UEVENT_RCVBUF``) the kernel reports ENOBUFS, the
  daemon journals ``overflow`` and rescans, and its inventory is the kernel's
  (the new address, which only the lost uevents carried); with the default
  buffer the same burst loses nothing and no rescan is needed;
* the port-cycle rung journals whether the port really lost power, read from
  its hub (GET_STATUS while disabled), and what the hub claims;
* the controller rung unbinds and binds EHCI (named in ``[heal] controllers``):
  its tablet is enumerated anew; for the keyboard on xHCI (not named) it is
  refused, journaled as ``heal-failed``, and the keyboard keeps its address;
  the refusal's alert (``heal_failed``) reaches a webhook server on the
  guest's loopback, once;
* a port error record in the real /dev/kmsg is read back by the healer and
  answered with a rung whose reason quotes it.

The guest is stopped by PID in teardown.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug_lab.guest import LabGuest, lab_unavailable_reason
from vmplug_lab.topologies import MIXED

pytestmark = [pytest.mark.lab, pytest.mark.long_lab]

PROBE = Path(__file__).with_name("heal_probe.py")
PY = sys.executable
TABLET = "2-2.4.1"  # on QEMU's usb-hub, on xHCI
KBD = "2-2.4.2"
EHCI, EHCI_TABLET = "0000:00:0c.0", "1-3"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = LabGuest(MIXED, tmp_path_factory.mktemp("lab"))
    try:
        lab.start()
        for port in (TABLET, KBD, EHCI_TABLET):
            lab.wait_for(f"test -e /sys/bus/usb/devices/{port}/devnum", timeout=120)
        lab.run("udevadm settle --timeout=30", timeout=60)
        yield lab
    finally:
        lab.stop()


def _probe(guest: LabGuest, args: str) -> dict[str, Any]:
    res = guest.run(f"{PY} {PROBE} {args}", timeout=300)
    assert res.rc == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out))  # shown with a failure
    return out


def test_a_tiny_socket_buffer_overflows_for_real_and_the_rescan_sets_it_right(
    guest: LabGuest,
) -> None:
    out = _probe(guest, f"overflow 4096 300 {TABLET}")
    assert out["overflows"] >= 1, out  # the kernel said ENOBUFS
    assert out["overflow_journaled"] >= 1 and out["rescans"] >= 1, out
    # the tablet came back with a new address; the daemon has it, as sysfs does
    assert out["after"] is not None and out["after"] != out["before"], out
    assert out["inventory_devnum"] == out["after"], out
    assert out["inventory_matches_sysfs"], out


def test_the_default_buffer_keeps_the_same_burst_whole(guest: LabGuest) -> None:
    out = _probe(guest, f"overflow 0 300 {TABLET}")
    assert out["overflows"] == 0 and out["overflow_journaled"] == 0, out
    assert out["rescans"] == 0, out  # the uevents alone told it
    assert out["after"] != out["before"] and out["inventory_devnum"] == out["after"], out
    assert out["inventory_matches_sysfs"], out


def test_port_cycle_says_if_power_was_cut_and_the_controller_rung_only_where_allowed(
    guest: LabGuest,
) -> None:
    out = _probe(guest, f"rungs {EHCI} {EHCI_TABLET} {KBD}")
    cycle = out["port_cycle"]
    assert cycle["ok"] and cycle["journal"] == "heal", cycle
    # measured from the hub, not assumed: one of the two, never "not known"
    assert cycle["detail"]["power"] in ("power cycled", "port disabled, power not cut"), cycle
    assert cycle["detail"]["hub_power_switching"] in ("per-port", "ganged", "none"), cycle
    assert cycle["removed"] >= 1, cycle  # the kernel disconnected it
    if cycle["detail"]["power"] == "power cycled":  # power back: enumerated anew
        assert cycle["after"] is not None and cycle["after"] != cycle["before"], cycle
    # (seen on EHCI's root hub, which claims no power switching: power not cut,
    # and the device did not come back after the port was enabled again)
    ctrl = out["controller"]
    assert ctrl["controller"] == EHCI and ctrl["ok"] and ctrl["journal"] == "heal", ctrl
    assert ctrl["detail"]["controller"] == EHCI and ctrl["detail"]["rung"] == "controller"
    # the kernel removed the tablet with its bus and enumerated it anew
    assert ctrl["removed"] >= 1 and ctrl["after"] is not None, ctrl
    refused = out["refused"]
    assert not refused["ok"] and refused["journal"] == "heal-failed", refused
    assert "not in [heal] controllers" in refused["detail"]["error"], refused
    assert refused["after"] == refused["before"] and refused["removed"] == 0, refused
    # one alert for the one rung that failed, on the loopback webhook
    hooks = out["webhook"]
    assert [(h["state"], h["condition"], h["alert"]) for h in hooks] == [
        ("firing", "heal-failed", "rung-failed")
    ], hooks
    assert "not in [heal] controllers" in hooks[0]["reason"], hooks
    kmsg = out["kmsg"]
    assert any(port == EHCI_TABLET and mine for port, mine, _ in kmsg["kernel_errors"]), kmsg
    assert kmsg["heal"] is not None and "error -110" in kmsg["heal"][1]["reason"], kmsg
