"""The guest-additions layer on real parts in the lab guest (``VMPLUG_LONG_LAB=1``).

One lab guest (a real Debian kernel under TCG, src/vmplug_lab/guest.py) with
an emulated keyboard (2-1: usbhid binds), a smart-card reader (2-2: usb-ccid,
no Linux driver binds to CCID) and an audio device (2-3).

* From outside, through the guest's own ``qemu-ga`` on
  ``org.qemu.guest_agent.0``: the agent's health (guest-ping, guest-info,
  guest-get-osinfo), the driver that binds vs the one that does not, and the
  daemon's probe (guestwatch) journaling ``guest-problem`` that the ladder
  takes -- then the keyboard's driver unbound in the guest, found too.
* Inside the guest: a second QEMU with ``-spice`` and a spicevmc usbredir
  channel takes the audio device with ``usb-host`` (really attached: QOM
  ``attached`` true), and ``vmplug doctor`` finds SPICE competing for it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug.daemon.guestwatch import GuestTarget, GuestWatch
from vmplug.daemon.heal import Rung, decide
from vmplug.daemon.journal import Journal
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.doctor.guest import CHECKS, NO_DRIVER, guest_problems
from vmplug.engine.remedy import HealPolicy
from vmplug.history.store import EventKind, Store
from vmplug.wire.qga import GuestAgent
from vmplug_lab.guest import GuestProcess, LabDevice, LabGuest, lab_unavailable_reason

pytestmark = [pytest.mark.lab, pytest.mark.long_lab, pytest.mark.timeout(1200)]

KBD = LabDevice("usb-kbd", "xhci.0", "1", "kbd1")
CCID = LabDevice("usb-ccid", "xhci.0", "2", "ccid1")
AUDIO = LabDevice("usb-audio", "xhci.0", "3", "audio1")
GDIR = "/tmp/vmplug-ga"
VMPLUG = Path(sys.executable).parent / "vmplug"


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.guest = LabGuest([KBD, CCID, AUDIO], workdir / "lab")
        self.procs: list[GuestProcess] = []

    def ids(self, port: str) -> str:
        out = self.guest.run(
            f"cat /sys/bus/usb/devices/{port}/idVendor /sys/bus/usb/devices/{port}/idProduct",
            check=True,
        ).stdout.split()
        return f"{out[0]}:{out[1]}"

    def outside(self) -> GuestAgent:
        """The agent from outside (its port serves one client: the lab's lets go)."""
        g = self.guest
        if g._qga is not None:
            g._qga.close()
            g._qga = None
        return GuestAgent(g.qga_path, timeout=10.0)

    def back(self) -> None:
        g = self.guest
        g._qga = g.open_agent()
        g._qga.sync(timeout=30)

    def close(self) -> None:
        for proc in list(self.procs):
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
    lab = Lab(tmp_path_factory.mktemp("guestadd"))
    try:
        lab.guest.start()
        lab.guest.run(f"rm -rf {GDIR} && mkdir -p {GDIR}", check=True)
        lab.guest.wait_for("test -e /sys/bus/usb/devices/2-1:1.0/driver")
        lab.guest.wait_for(
            "test -e /sys/bus/usb/devices/2-2:1.0 && test -e /sys/bus/usb/devices/2-3"
        )
        yield lab
    finally:
        lab.close()


def _guest_checks(lab: Lab) -> dict[str, list[Finding]]:
    g = lab.guest
    if g._qga is not None:
        g._qga.close()
        g._qga = None
    try:
        ctx = DoctorContext(qga_socket=str(g.qga_path), timeout=2.0)
        out: dict[str, list[Finding]] = {}
        for f in run_checks(ctx, list(CHECKS)):
            out.setdefault(f.check, []).append(f)
        return out
    finally:
        lab.back()


def test_agent_health_and_drivers_from_the_real_guest(lab: Lab) -> None:
    found = _guest_checks(lab)
    (agent,) = found["guest.agent"]
    assert agent.severity is Severity.OK
    assert "guest-ping answered; guest-info: qemu-ga" in agent.evidence[0]
    assert "guest-get-osinfo: Debian GNU/Linux" in agent.evidence[1]
    (cmds,) = found["guest.agent-commands"]
    assert cmds.severity is Severity.OK and "guest-file-read" in cmds.evidence[0]
    loose = found.get("guest.linux-driver", [])
    assert [f.subject for f in loose] == ["2-2"], loose  # the reader; the keyboard bound
    assert "no driver in the guest for interface 0 (class 0b)" in loose[0].title


def test_guest_problems_and_the_probe_journal_what_the_guest_says(lab: Lab, tmp_path: Path) -> None:
    kbd, ccid = lab.ids("2-1"), lab.ids("2-2")
    attached = (("kbd-ident", kbd, "2-1"), ("ccid-ident", ccid, "2-2"))
    with lab.outside() as agent:
        problems = guest_problems(agent, [(i, v) for i, v, _ in attached])
    lab.back()
    assert [(p.identity, p.problem) for p in problems] == [("ccid-ident", NO_DRIVER)]
    assert "2-2" in problems[0].message and "class 0b" in problems[0].message

    # the daemon's probe: journaled, and the ladder takes it for that device only
    store = Store(tmp_path / "j.db")
    try:
        for ident, _, _ in attached:
            store.record_action("attach", identity=ident, qemu_id="vmplug-x", vm="lab", result="ok")
        if lab.guest._qga is not None:
            lab.guest._qga.close()
            lab.guest._qga = None
        target = GuestTarget("lab", str(lab.guest.qga_path), attached)
        watch = GuestWatch(Journal(store), lambda: [target], interval=1.0, timeout=10.0)
        reported = asyncio.run(watch.check_once())
        lab.back()
        assert [(vm, p.identity) for vm, p in reported] == [("lab", "ccid-ident")]
        entries = store.history(None, limit=None)
        (ev,) = [e for e in entries if e.kind == EventKind.GUEST_PROBLEM]
        assert (ev.vm, ev.identity, ev.port) == ("lab", "ccid-ident", "2-2")
        policy = HealPolicy(interval_s=1.0, settle_s=5.0, attach_refusals=2)
        st = decide(entries, "ccid-ident", "2-2", policy, ev.ts + 1)
        assert st.decision is not None and st.decision.rung is Rung.REATTACH
        assert "guest lab: 2-2" in st.decision.reason
        assert decide(entries, "kbd-ident", "2-1", policy, ev.ts + 1).decision is None
    finally:
        store.close()

    # the keyboard's driver unbound in the guest (as a blacklisted module would
    # leave it): now the guest says so for the keyboard too
    lab.guest.run("echo 2-1:1.0 > /sys/bus/usb/drivers/usbhid/unbind", check=True)
    try:
        with lab.outside() as agent:
            again = guest_problems(agent, [(i, v) for i, v, _ in attached])
        lab.back()
        assert sorted((p.identity, p.problem) for p in again) == [
            ("ccid-ident", NO_DRIVER),
            ("kbd-ident", NO_DRIVER),
        ]
    finally:
        lab.guest.run("echo 2-1:1.0 > /sys/bus/usb/drivers/usbhid/bind")


def test_spice_usbredir_competes_for_a_really_attached_device(lab: Lab) -> None:
    g = lab.guest
    audio = lab.ids("2-3")
    sock = f"{GDIR}/spicevm.sock"
    cmd = (
        "qemu-system-x86_64 -nodefaults -display none -accel tcg -m 64 -name spicevm "
        f"-qmp unix:{sock},server=on,wait=off -device qemu-xhci,id=xhci "
        "-spice port=5930,addr=127.0.0.1,disable-ticketing=on "
        "-chardev spicevmc,name=usbredir,id=ur1 -device usb-redir,chardev=ur1,id=redir1,bus=xhci.0 "
        "-device usb-host,hostbus=2,hostport=3,id=audiopass,bus=xhci.0"
    )
    proc = g.spawn(cmd, log=f"{g.workdir}/spicevm.log")
    lab.procs.append(proc)
    # QEMU holds it: no kernel driver but usbfs (or none) on its interfaces now
    released = " && ".join(
        f"! readlink /sys/bus/usb/devices/2-3:1.{i}/driver | grep -qv usbfs" for i in (0, 1)
    )
    try:
        g.wait_for(released, 120)
    except Exception as exc:
        state = g.run(
            "ls -l /sys/bus/usb/devices/2-3:1.*/driver; cat " + f"{g.workdir}/spicevm.log"
        )
        raise AssertionError(f"the inner QEMU did not take 2-3: {exc}\n{state}") from exc
    res = g.run(f"{VMPLUG} doctor --json --timeout 5 --vm spicevm", timeout=240)
    doc: dict[str, Any] = json.loads(res.stdout)
    spice = [f for f in doc["findings"] if f["check"] == "guest.spice-usbredir"]
    assert len(spice) == 1, doc["findings"]
    (f,) = spice
    assert f["severity"] == "warning" and f["subject"] == audio
    assert "channel(s) redir1 (spicevmc)" in f["title"]
    assert (
        "usb-redir redir1: chardev ur1 (query-chardev: spicevmc), no filter, attached=false"
        in (f["evidence"])
    )
    vid, pid = audio.split(":")
    assert f"filter=-1:0x{vid}:0x{pid}:-1:0|-1:-1:-1:-1:1" in f["fix"]
    assert res.rc == 1  # a warning: doctor's exit status 1
