"""Fast checks of the lab helpers that need no guest: QEMU arguments and capture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmplug_lab.capture import capture
from vmplug_lab.guest import LabDevice, LabGuest, LabUnavailable, find_kernel
from vmplug_lab.topologies import TOPOLOGIES

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sysfs"
PROBE = Path(__file__).with_name("sysfs_probe.py")


def _probe(root: Path) -> object:
    out = subprocess.run(
        [sys.executable, str(PROBE), str(root)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_storage_gets_a_blockdev_and_audio_an_audiodev(tmp_path: Path) -> None:
    stick = LabDevice("usb-storage", "xhci.0", "1", "stick1", {"serial": "S1"})
    audio = LabDevice("usb-audio", "xhci.0", "2.1", "audio1")
    args = stick.qemu_args(tmp_path) + audio.qemu_args(tmp_path)
    assert args == [
        "-blockdev",
        f"driver=raw,node-name=stick1-disk,file.driver=file,file.filename={tmp_path}/stick1.img",
        "-device",
        "usb-storage,bus=xhci.0,port=1,id=stick1,drive=stick1-disk,serial=S1",
        "-device",
        "usb-audio,bus=xhci.0,port=2.1,id=audio1,audiodev=lab-audio",
    ]


def test_guest_qemu_args_have_qmp_agent_port_and_pidfile(tmp_path: Path) -> None:
    guest = LabGuest(TOPOLOGIES["minimal"], tmp_path)
    args = guest.qemu_args()
    assert f"unix:{tmp_path}/qmp.sock,server=on,wait=off" in args
    assert any("name=org.qemu.guest_agent.0" in a for a in args)
    assert args[args.index("-pidfile") + 1] == str(tmp_path / "qemu.pid")


def test_bad_ids_and_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid QEMU device id"):
        LabDevice("usb-kbd", "xhci.0", "1", "1bad")
    with pytest.raises(ValueError, match="cannot contain"):
        LabDevice("usb-kbd", "xhci.0", "1", "kbd", {"serial": "a,b"})
    with pytest.raises(ValueError, match="plain path"):
        LabGuest([], tmp_path / "with space")
    kbd = LabDevice("usb-kbd", "xhci.0", "1", "kbd")
    with pytest.raises(ValueError, match="duplicate"):
        LabGuest([kbd, kbd], tmp_path)


def test_find_kernel_explains_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(LabUnavailable, match="apt-get install linux-image-amd64"):
        find_kernel(tmp_path)
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-5.10.0-30-amd64"):
        (tmp_path / name).write_bytes(b"")
    assert find_kernel(tmp_path).name == "vmlinuz-6.1.0-56-amd64"


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_fixture_recaptures_to_itself(name: str, tmp_path: Path) -> None:
    """capture() over a committed fixture (a sysfs root) reproduces it."""
    fixture = FIXTURES / name
    out = tmp_path / "cap"
    info = capture(out, sysfs=fixture)
    assert _probe(out) == _probe(fixture)
    for dev in info["usb_devices"]:
        a = (fixture / "bus/usb/devices" / dev / "descriptors").read_bytes()
        b = (out / "bus/usb/devices" / dev / "descriptors").read_bytes()
        assert a == b, dev


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_fixture_metadata_matches_its_topology(name: str) -> None:
    meta = json.loads((FIXTURES / name / "capture.json").read_text())
    assert meta["topology"] == name
    assert meta["devices"] == [d.to_json() for d in TOPOLOGIES[name]]
    assert meta["qemu"] and meta["kernel"]
    # Links stay inside the fixture and resolve (git keeps no empty dirs).
    for link in (FIXTURES / name).rglob("*"):
        if link.is_symlink():
            assert link.resolve().exists(), link
            assert link.resolve().is_relative_to((FIXTURES / name).resolve()), link
