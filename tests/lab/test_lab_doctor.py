"""Lab: ``vmplug doctor`` on a real kernel, real QEMUs and a real qemu-ga.

One lab guest for the module.  Inside it (the "host" the doctor examines):
an audio device (2-1), a high-speed keyboard (2-2) and tablet (1-2, EHCI)
sharing 0627:0001, a full-speed hub (2-3), and VMs (second-level QEMUs)
started per scenario.  The tests run in order; each makes its faults for
real and runs ``vmplug doctor --json`` once inside the guest (the venv's
Python takes ~15 s to start over 9p):

1. guest layer, from outside, through the lab guest's own qemu-ga on
   ``org.qemu.guest_agent.0``: its /sys/bus/usb/devices read with
   guest-file-read; then a device with no guest driver (usb-ccid) found;
2. healthy: a q35 VM with qemu-xhci holds the audio device by hostbus+hostport:
   nothing to fix, exit 0;
3. faults: autosuspend ``auto`` on the audio device, two 6 Mbit/s audio
   devices behind one full-speed hub, a VM with only UHCI (``-usb``) that
   binds the keyboard by ``hostaddr`` (then the keyboard is replugged: new
   address) and takes ``vendorid:productid`` 0627:0001 that two devices share;
   and a config rule sending the audio devices to that VM while a program has
   one's sound card open (the host driver and the program hold it);
4. the tablet unplugged: ``vmplug doctor 1-2`` says it is gone, with the
   kernel's disconnect line as evidence.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Severity, exit_status, run_checks
from vmplug.doctor.guest import CHECKS as GUEST_CHECKS
from vmplug_lab.guest import GuestProcess, LabDevice, LabGuest, lab_unavailable_reason

pytestmark = pytest.mark.lab

GDIR = "/tmp/vmplug-doctor"
AUDIO = LabDevice("usb-audio", "xhci.0", "1", "audio1")
KBD = LabDevice("usb-kbd", "xhci.0", "2", "kbd1")
TABLET = LabDevice("usb-tablet", "ehci.0", "2", "tab1")
HUB = LabDevice("usb-hub", "xhci.0", "3", "hub1")
#: multi=on: 8 channels, 768-byte isochronous packets every 1 ms frame = 6.1 Mbit/s
MULTI1 = LabDevice("usb-audio", "xhci.0", "3.1", "multi1", {"multi": "on"})
MULTI2 = LabDevice("usb-audio", "xhci.0", "3.2", "multi2", {"multi": "on"})
CCID = LabDevice("usb-ccid", "xhci.0", "4", "ccid1")
VMPLUG = Path(sys.executable).parent / "vmplug"
QEMU = "qemu-system-x86_64 -nodefaults -display none -accel tcg -m 64"


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.guest = LabGuest([AUDIO, KBD, TABLET, HUB], workdir / "lab")
        self.vms: list[GuestProcess] = []

    def doctor(self, *args: str, config: Path | None = None) -> tuple[int, dict[str, Any]]:
        pre = f"--config {config} " if config else ""
        cmd = f"{VMPLUG} {pre}doctor --json --timeout 5 {' '.join(args)}"
        res = self.guest.run(cmd, timeout=240)
        assert res.stdout.strip(), f"doctor printed nothing (rc={res.rc}): {res.stderr}"
        return res.rc, json.loads(res.stdout)

    def start_vm(self, name: str, args: str) -> GuestProcess:
        cmd = f"{QEMU} -name {name} -qmp unix:{GDIR}/{name}.sock,server=on,wait=off {args}"
        proc = self.guest.spawn(cmd, log=f"{self.guest.workdir}/vm-{name}.log")
        self.vms.append(proc)
        return proc

    def stop_vm(self, proc: GuestProcess) -> None:
        self.guest.kill(proc, signal.SIGKILL)
        self.vms.remove(proc)

    def devnum(self, port: str) -> int:
        return int(self.guest.run(f"cat /sys/bus/usb/devices/{port}/devnum", check=True).stdout)

    def close(self) -> None:
        for proc in list(self.vms):
            try:
                self.guest.kill(proc, signal.SIGKILL, timeout=5)
            except Exception:
                break
        self.guest.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = Lab(tmp_path_factory.mktemp("doctor"))
    try:
        lab.guest.start()
        lab.guest.run(f"rm -rf {GDIR} && mkdir -p {GDIR}", check=True)
        lab.guest.wait_for(
            " && ".join(f"test -e /sys/bus/usb/devices/{p}" for p in ("2-1", "2-2", "1-2", "2-3"))
        )
        yield lab
    finally:
        lab.close()


def _released(*ifaces: str) -> str:
    """A guest shell test: no host driver but usbfs (or none) on these interfaces."""
    return " && ".join(
        f"! readlink /sys/bus/usb/devices/{i}/driver | grep -qv usbfs" for i in ifaces
    )


def found(doc: dict[str, Any], check: str, severity: str | None = None) -> list[dict[str, Any]]:
    return [
        f
        for f in doc["findings"]
        if f["check"] == check and (severity is None or f["severity"] == severity)
    ]


def problems(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["severity"] in ("warning", "error")]


def _guest_layer(lab: Lab) -> list[Any]:
    """The guest checks from outside, through the lab guest's qga socket."""
    g = lab.guest
    assert g._qga is not None
    g._qga.close()  # the agent's port serves one client at a time
    g._qga = None
    try:
        ctx = DoctorContext(qga_socket=str(g.qga_path), timeout=1.0)
        return run_checks(ctx, GUEST_CHECKS)
    finally:
        g._qga = g.open_agent()
        g._qga.sync(timeout=30)


def test_guest_layer_reads_the_guest_sysfs_through_qemu_ga(lab: Lab) -> None:
    findings = _guest_layer(lab)
    by_check = {f.check: f for f in findings}
    agent = by_check["guest.agent"]
    assert agent.severity is Severity.OK and "qemu-ga" in agent.evidence[0]
    assert "Debian" in agent.evidence[1] or "Linux" in agent.evidence[1]
    usb = by_check["guest.linux-usb"]
    listing = "\n".join(usb.evidence)
    # what the guest kernel has, read with guest-file-open/read, not exec
    assert "2-1 46f4:0002" in listing and "snd-usb-audio" in listing
    assert "2-2 0627:0001" in listing and "usbhid" in listing
    assert "1-2 0627:0001" in listing
    assert "usb1 1d6b:0002" in listing
    assert not [f for f in findings if f.severity >= Severity.WARNING]  # every driver bound

    lab.guest.hotplug(CCID)  # a smart-card reader: no kernel driver for CCID
    lab.guest.wait_for("test -e /sys/bus/usb/devices/2-4:1.0")
    findings = _guest_layer(lab)
    loose_list = [f for f in findings if f.check == "guest.linux-driver"]
    assert len(loose_list) == 1, "\n".join(f"{f.title} {f.evidence}" for f in findings)
    (loose,) = loose_list
    assert loose.severity is Severity.WARNING and loose.subject == "2-4"
    assert "no driver in the guest for interface 0 (class 0b)" in loose.title
    assert exit_status(findings) == 1


def test_healthy_setup_has_nothing_to_fix(lab: Lab) -> None:
    vm = lab.start_vm(
        "good",
        "-machine q35 -device qemu-xhci,id=xhci"
        " -device usb-host,bus=xhci.0,id=vmplug-audio,hostbus=2,hostport=1",
    )
    # QEMU has taken the audio device once the host driver is off its interfaces (it
    # claims them, usbfs, only when the VM's OS configures the device: no OS here)
    lab.guest.wait_for(_released("2-1:1.0", "2-1:1.1"), 90)
    rc, doc = lab.doctor()
    assert problems(doc) == [], json.dumps(doc, indent=1)
    assert rc == 0 and doc["status"] == "ok"
    # the checks did look: QEMU found over QMP, the device held by it, its node fine
    (attached,) = found(doc, "qemu.attached", "ok")
    assert "vmplug-audio (vmplug's) holds 2-1" in attached["title"]
    assert any("held by QEMU" in f["title"] for f in found(doc, "host.holders", "ok"))
    assert found(doc, "host.devnode", "ok")
    assert any("xhci" in f["title"] for f in found(doc, "qemu.controller", "ok"))
    assert found(doc, "host.autosuspend", "ok")
    assert found(doc, "host.bandwidth", "ok")
    lab.stop_vm(vm)


def test_faults_are_found(lab: Lab) -> None:
    g = lab.guest
    g.run("echo auto > /sys/bus/usb/devices/2-1/power/control", check=True)
    g.hotplug(MULTI1)
    g.hotplug(MULTI2)
    old = lab.devnum("2-2")
    lab.start_vm(
        "bad",
        f"-machine pc -usb -device usb-host,id=byaddr,hostbus=2,hostaddr={old}"
        " -device usb-host,id=dup,vendorid=0x0627,productid=0x0001",
    )
    g.wait_for(_released("2-2:1.0"), 90)
    g.wait_for("test -e /sys/bus/usb/devices/2-3.2")
    # replug the keyboard: it comes back with a new address
    g.unplug(KBD.id)
    g.wait_for("! test -e /sys/bus/usb/devices/2-2")
    g.hotplug(KBD)
    g.wait_for("test -e /sys/bus/usb/devices/2-2")
    assert lab.devnum("2-2") != old

    # a config whose rule sends the audio devices to the VM, and a program (standing in
    # for PipeWire) with the sound card of one of them open
    config = g.workdir / "vmplug.toml"
    config.write_text(
        f'[vm.bad]\nqmp = "{GDIR}/bad.sock"\n\n[[rule]]\nattach = "bad"\nmatch = \'id 46f4:0002\'\n'
    )
    g.wait_for("ls /sys/bus/usb/devices/2-3.1:1.0/sound | grep -q card")
    card = g.run("ls /sys/bus/usb/devices/2-3.1:1.0/sound", check=True).stdout.split()[0]
    player = g.spawn(f"sleep 600 </dev/snd/controlC{card.removeprefix('card')}")
    try:
        rc, doc = lab.doctor(config=config)
    finally:
        g.kill(player)
    assert rc == 1 and doc["status"] == "error", json.dumps(doc, indent=1)
    held = {f["subject"]: f for f in found(doc, "host.holders", "warning")}
    assert "in use by sleep" in held["2-3.1"]["title"]
    assert "snd-usb-audio" in held["2-3.1"]["title"]
    assert any(e.startswith("sound card open by sleep (pid ") for e in held["2-3.1"]["evidence"])
    assert "pipewire" in held["2-3.1"]["fix"]
    assert "in use by" not in held["2-3.2"]["title"]  # its card is open by nobody
    (suspend,) = found(doc, "host.autosuspend", "warning")
    assert suspend["subject"] == "2-1"
    assert suspend["evidence"] == [
        "/sys/devices/pci0000:00/0000:00:0b.0/usb2/2-1/power/control = auto"
    ]
    assert "ATTR{power/control}" in suspend["fix"]  # the udev rule from vmplug generate
    (bw,) = found(doc, "host.bandwidth", "error")
    assert "under 2-3" in bw["title"] and "12.3 Mbit/s" in bw["title"]
    (ctl,) = found(doc, "qemu.controller", "error")
    assert "UHCI" in ctl["title"] and "0627:0001, 480" in ctl["title"]
    assert any("piix3-usb-uhci" in e for e in ctl["evidence"])
    assert "qemu-xhci" in ctl["fix"]
    (addr,) = found(doc, "qemu.usb-host-match", "error")
    assert addr["subject"] == "byaddr" and "never take it again" in addr["title"]
    assert f"hostaddr={old}" in "\n".join(addr["evidence"])
    (dup,) = found(doc, "qemu.duplicate-ids", "warning")
    assert "0627:0001" in dup["title"] and "2 host devices" in dup["title"]
    assert "hostport=" in dup["fix"]  # vmplug generate qemu --by-port
    disc = [f for f in found(doc, "host.kernel-log") if f["subject"] == "2-2"]
    assert disc and "USB disconnect" in disc[0]["evidence"][-1]


def test_unplugged_device(lab: Lab) -> None:
    lab.guest.unplug(TABLET.id)
    lab.guest.wait_for("! test -e /sys/bus/usb/devices/1-2")
    rc, doc = lab.doctor("1-2")
    assert rc == 1  # a finding (the device is not there), not bad input (issue 17)
    (gone,) = found(doc, "host.present", "error")
    assert gone["subject"] == "1-2" and "not plugged in" in gone["title"]
    assert any("usb 1-2: USB disconnect" in e for e in gone["evidence"])
