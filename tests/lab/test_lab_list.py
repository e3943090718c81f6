"""Lab: `vmplug list` inside a real kernel with emulated USB, checked against the kernel.

One guest (the ``mixed`` topology) is booted for the whole module; it is
stopped by PID in the fixture's teardown even when a test fails.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug_lab.guest import LabDevice, LabGuest, lab_unavailable_reason
from vmplug_lab.topologies import MIXED

pytestmark = pytest.mark.lab

PROBE = Path(__file__).with_name("sysfs_probe.py")
FIXTURES = Path(__file__).parents[1] / "fixtures" / "sysfs"
VMPLUG = Path(sys.executable).parent / "vmplug"
#: Port paths the guest kernel gives the MIXED topology (see topologies.py).
MIXED_PORTS = {
    "usb1": None,
    "usb2": None,
    "usb3": None,
    "1-1": ("46f4", "0001"),  # usb-storage LABSTICK0002 on EHCI
    "1-3": ("0627", "0001"),  # usb-tablet on EHCI
    "2-2": ("0409", "55aa"),  # usb-hub on xHCI port 2
    "2-2.1": ("46f4", "0002"),  # usb-audio
    "2-2.4": ("0409", "55aa"),  # nested usb-hub
    "2-2.4.1": ("0627", "0001"),  # usb-tablet
    "2-2.4.2": ("0627", "0001"),  # usb-kbd
    "3-1": ("46f4", "0001"),  # usb-storage LABSTICK0001, SuperSpeed
}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = LabGuest(MIXED, tmp_path_factory.mktemp("lab"))
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def _json(guest: LabGuest, cmd: str) -> Any:
    res = guest.run(cmd, timeout=120)
    assert res.rc == 0, f"{cmd}: rc={res.rc}\n{res.stderr}"
    return json.loads(res.stdout)


def _probe(guest: LabGuest, root: str = "/sys") -> dict[str, dict[str, Any]]:
    probe: dict[str, dict[str, Any]] = _json(guest, f"/usr/bin/python3 {PROBE} {root}")
    return probe


def _vmplug_list(guest: LabGuest, root: str | None = None) -> dict[str, dict[str, Any]]:
    env = f"VMPLUG_SYSFS_ROOT={shlex.quote(root)} " if root else ""
    devices = _json(guest, f"{env}{VMPLUG} list --json --all")
    return {d["port"]: d for d in devices}


@pytest.fixture(scope="module")
def settled(guest: LabGuest) -> LabGuest:
    guest.wait_for(
        "n=$(ls /sys/bus/usb/devices | grep -c -E '^[0-9]+-[0-9.]+$'); "
        f'test "$n" -ge {len(MIXED)}',
        timeout=120,
    )
    guest.run("udevadm settle --timeout=30", timeout=60)
    return guest


def test_guest_sees_the_mixed_topology(settled: LabGuest) -> None:
    probe = _probe(settled)
    assert set(probe) == set(MIXED_PORTS)
    for port, ids in MIXED_PORTS.items():
        if ids is not None:
            assert (probe[port]["vendor_id"], probe[port]["product_id"]) == ids, port
    assert probe["3-1"]["speed"] == "5000"
    assert probe["3-1"]["serial"] == "LABSTICK0001"
    assert probe["1-1"]["serial"] == "LABSTICK0002"
    assert {i["driver"] for i in probe["2-2.1"]["interfaces"]} == {"snd-usb-audio"}


def test_vmplug_list_matches_kernel_attributes(settled: LabGuest) -> None:
    probe = _probe(settled)
    listed = _vmplug_list(settled)
    assert set(listed) == set(probe)
    for port, want in probe.items():
        got = listed[port]
        where = f"device {port}"
        assert got["busnum"] == want["busnum"], where
        assert got["devnum"] == want["devnum"], where
        assert got["vendor_id"] == want["vendor_id"], where
        assert got["product_id"] == want["product_id"], where
        assert got["bcd_device"] == want["bcd_device"], where
        assert got["manufacturer"] == want["manufacturer"], where
        assert got["product"] == want["product"], where
        assert got["serial"] == want["serial"], where
        assert float(got["speed_mbps"]) == float(want["speed"]), where
        assert got["device_class"] == want["device_class"], where
        assert (got["num_ports"] or 0) == want["num_ports"], where
        assert got["authorized"] is (want["authorized"] == "1"), where
        assert got["removable"] == want["removable"], where
        assert got["power_control"] == want["power_control"], where
        assert got["driver"] == want["driver"], where
        assert got["connect_type"] == want["connect_type"], where
        got_ifaces = [
            {k: i[k] for k in ("number", "class", "subclass", "protocol", "driver")}
            for i in got["interfaces"]
        ]
        assert got_ifaces == want["interfaces"], where


def test_audio_interface_has_isochronous_endpoints(settled: LabGuest) -> None:
    audio = _vmplug_list(settled)["2-2.1"]
    types = {
        ep["type"]
        for iface in audio["interfaces"]
        for alt in iface["alt_settings"]
        for ep in alt["endpoints"]
    }
    assert "isochronous" in types
    assert audio["iso_bandwidth_bps"] > 0


def test_capture_round_trip(settled: LabGuest) -> None:
    """A capture made inside reads back exactly like the live /sys it came from."""
    cap = "/tmp/lab-capture"
    settled.run(f"rm -rf {cap} && {sys.executable} -m vmplug_lab.capture {cap}", check=True)
    assert _probe(settled, cap) == _probe(settled)
    assert _vmplug_list(settled, cap) == _vmplug_list(settled)
    meta = _json(settled, f"cat {cap}/capture.json")
    assert meta["kernel"] == settled.run("uname -r").stdout.strip()


def test_committed_mixed_fixture_matches_a_live_guest(settled: LabGuest) -> None:
    """The committed fixture still describes what the MIXED topology gives.

    Device numbers depend on enumeration order and root hubs carry the kernel
    version, so only non-root devices are compared, without ``devnum``.
    """
    fixture = FIXTURES / "mixed"
    meta = json.loads((fixture / "capture.json").read_text())
    assert meta["devices"] == [d.to_json() for d in MIXED], "re-make: " + meta["remake"]
    out = subprocess.run(
        [sys.executable, str(PROBE), str(fixture)], capture_output=True, text=True, check=True
    ).stdout
    committed = json.loads(out)
    live = _probe(settled)

    def strip(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {
            k: {f: v for f, v in d.items() if f != "devnum"}
            for k, d in tree.items()
            if not k.startswith("usb")
        }

    assert strip(committed) == strip(live)


def test_hotplug_and_unplug_reach_the_guest_kernel(settled: LabGuest) -> None:
    """Hot-plug through the guest QEMU's QMP; the guest kernel sends uevents."""
    monitor = settled.spawn("udevadm monitor --kernel --subsystem-match=usb")
    kbd = LabDevice("usb-kbd", "xhci.0", "2.4.3", "labhot1")
    try:
        settled.wait_for("udevadm monitor --help >/dev/null && sleep 0.5", timeout=30)
        settled.hotplug(kbd)
        settled.wait_for("test -e /sys/bus/usb/devices/2-2.4.3:1.0/driver", timeout=60)
        listed = _vmplug_list(settled)
        assert listed["2-2.4.3"]["vendor_id"] == "0627"
        assert listed["2-2.4.3"]["interfaces"][0]["driver"] == "usbhid"
        settled.unplug(kbd.id)
        settled.wait_for("! test -e /sys/bus/usb/devices/2-2.4.3", timeout=60)
        assert "2-2.4.3" not in _vmplug_list(settled)
        settled.run("sleep 1")
    finally:
        if any(d.id == kbd.id for d in settled.devices):
            settled.unplug(kbd.id)
        settled.kill(monitor)
    log = settled.read_log(monitor)
    for action in ("add", "bind", "remove"):
        assert any(
            f"{action} " in line and line.rstrip().endswith("/2-2.4.3 (usb)")
            for line in log.splitlines()
        ), f"no kernel '{action}' uevent for 2-2.4.3 in:\n{log}"
