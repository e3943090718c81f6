"""Every fault of a remote link, with the integrated daemons: exactly-once journal.

The rig (tests/remote/faultrig.py): ``vmplug run`` as the device host and
as one or two VM hosts, each in a network namespace of its own, a real QEMU
beside each VM host, the device side of usbredir served from the device
host's captured tree (this kernel has no USB; see the rig's doc).  For each
fault the test does one thing and then compares, row by row, the VM host's
journal (``vmplug history --json``, from its SQLite) with what it did: one
loss and one return per cut, nothing doubled, nothing lost; and what QEMU
really holds (QOM ``attached`` read through QEMU's second QMP socket) and
how many streams the device side really served.

Two ways a cut reaches the VM host's journal, both here:

* the whole link is cut for longer than 10 s: the VM host's own poll of the
  device host gives up after 10 s without an ACK (``POLL_SILENCE_S``), so
  the device host is ``down`` (in ``status``, the API) and its device
  absent: ``remote-host-down``, ``device-remove``, ``detach``; when the
  network is back ``remote-host-up``, ``device-add``, ``attach``;
* only the stream's own flow is cut (a firewall dropping one connection):
  the poll goes on, the device host ends the silent link after its
  ``link_timeout`` and says so in its export list (``dead_links``), QEMU's
  reconnect brings the device back: ``attachment-lost``, then ``device-add``
  and ``adopt`` (found in the VM again, nothing sent to QEMU).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.remote.faultrig import (
    EXPORT_PORTS,
    LINK_TIMEOUT,
    FaultRig,
    VmHost,
    kinds,
    last_id,
    netns_possible,
    until,
)
from tests.support.vmplugproc import VMPLUG

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

#: a cut the device host's endpoint and the VM host's poll both give up on
LONG_CUT = LINK_TIMEOUT + 4
#: the rows a cut of the whole link (or the device host gone) leaves on the VM host
HOST_LOST = ["remote-host-down", "device-remove", "detach"]
HOST_BACK = ["remote-host-up", "device-add", "attach"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[FaultRig]:
    reason = netns_possible()
    if reason:
        pytest.skip(reason)
    r = FaultRig(tmp_path, f"{os.getpid() % 100000}")
    try:
        yield r
    finally:
        r.close()


def _host(a: VmHost) -> dict[str, Any]:
    [h] = a.proc.json("status")["remote_hosts"]
    return dict(h)


def _attached_everywhere(rig: FaultRig, a: VmHost) -> str | None:
    """The device's QEMU id once QEMU's guest bus holds it, the device host
    streams it to this VM host and this VM host's status says attached."""
    dev_id = rig.attached_in(a.name)
    if dev_id is None:
        return None
    row = rig.devhost.export_row()
    if row["holder"] != a.name or not row["streaming"]:
        return None
    status = a.proc.json("status")
    atts = [x for x in status["attachments"] if x["qemu_id"] == dev_id]
    if [x["state"] for x in atts] != ["attached"]:
        return None
    return dev_id


def _up(rig: FaultRig, a: VmHost) -> str:
    return str(
        until(lambda: _attached_everywhere(rig, a), "the device attached", 60, a.proc)
        and rig.attached_in(a.name)
    )


def _rows(a: VmHost, since: int) -> list[dict[str, Any]]:
    return [r for r in a.proc.history() if int(r["id"]) > since]


def _remote_only(rows: list[dict[str, Any]]) -> list[str]:
    """Kinds of the rows about the device host or its device (not this host's own)."""
    return kinds(
        [
            r
            for r in rows
            if r["kind"].startswith("remote-host-")
            or (r.get("identity") or "").endswith("@devhost")
        ]
    )


def _start(rig: FaultRig, *names: str) -> list[VmHost]:
    hosts = [rig.add_vmhost(name, i + 1) for i, name in enumerate(names)]
    rig.devhost.start()
    for h in hosts:
        h.proc.start()
    return hosts


def test_whole_link_cut_longer_than_the_timeouts(rig: FaultRig) -> None:
    [a] = _start(rig, "vmhost-a")
    dev_id = _up(rig, a)
    base = last_id(a.proc.history())
    assert rig.connects_sent() == 1
    t0 = time.monotonic()
    a.pair.link_down()
    try:
        # the cut shows on the VM host, in its status and API: the device host down
        shown = until(lambda: _host(a)["state"] == "down", "the device host down", 30, a.proc)
        assert shown <= 10 + 5, shown  # POLL_SILENCE_S, and a keepalive probe's second
        down = _host(a)
        assert down["error"], down
        human = a.proc.vmplug("status")
        assert human.returncode == 0, human.stderr
        assert "down" in human.stdout, human.stdout
        until(lambda: rig.qemu_redirs(a.name) == {}, "the usb-redir detached", 20, a.proc)
        time.sleep(max(0.0, LONG_CUT - (time.monotonic() - t0)))  # the cut's length
    finally:
        a.pair.link_up()
    back = until(lambda: _attached_everywhere(rig, a), "the device back", 60, a.proc)
    print(
        f"whole-link cut of {LONG_CUT:.0f} s: device host down in status after {shown:.1f} s; "
        f"back in the guest {back:.2f} s after the network"
    )
    assert rig.attached_in(a.name) == dev_id
    rows = _rows(a, base)
    assert kinds(rows) == HOST_LOST + HOST_BACK, rows
    assert {r["identity"] for r in rows if r["identity"]} == {_identity(a)}
    assert _host(a)["state"] == "up"
    # the device side served exactly one more stream, and the device host
    # counts the one link it ended for silence
    assert rig.connects_sent() == 2
    row = rig.devhost.export_row()
    assert (row["sessions"], row["dead_links"], row["holder"]) == (2, 1, "vmhost-a"), row


def _identity(a: VmHost) -> str:
    [ident] = {r["identity"] for r in a.proc.json("list") if r.get("host") == "devhost"}
    return str(ident)


DROP = ["INPUT", "-j", "DROP", "-p", "tcp", "--dport"]


def _drop_stream(rig: FaultRig, add: bool) -> None:
    """iptables on the device host: drop what comes in on the endpoints' ports only
    (the API's poll goes on: a firewall or NAT that lost one connection)."""
    ports = f"{EXPORT_PORTS[0]}:{EXPORT_PORTS[1]}"
    subprocess.run(
        ["ip", "netns", "exec", rig.dev_ns, "iptables", "-I" if add else "-D", *DROP, ports],
        check=True,
        timeout=20,
    )


@pytest.mark.long_lab  # ~45 s (the doctor's run is half of it)
def test_stream_cut_alone_is_a_loss_and_an_adopt(rig: FaultRig) -> None:
    [a] = _start(rig, "vmhost-a")
    dev_id = _up(rig, a)
    base = last_id(a.proc.history())
    t0 = time.monotonic()
    _drop_stream(rig, add=True)
    try:
        # the device host ends the silent link; the VM host hears it from its poll
        lost = until(
            lambda: "attachment-lost" in kinds(_rows(a, base)), "attachment-lost", 30, a.proc
        )
        assert time.monotonic() - t0 >= LINK_TIMEOUT - 0.5
        assert _host(a)["state"] == "up"  # the poll was never cut
    finally:
        _drop_stream(rig, add=False)
    back = until(lambda: _attached_everywhere(rig, a), "the device back", 60, a.proc)
    until(lambda: "adopt" in kinds(_rows(a, base)), "adopt journaled", 30, a.proc)
    print(f"stream cut: loss journaled {lost:.1f} s after the cut; back {back:.2f} s after")
    assert rig.attached_in(a.name) == dev_id
    rows = _rows(a, base)
    assert kinds(rows) == ["attachment-lost", "device-add", "adopt"], rows
    assert {r["identity"] for r in rows} == {_identity(a)}
    assert rows[0]["detail"]["dead_links"] == 1
    assert rig.connects_sent() == 2
    row = rig.devhost.export_row()
    assert (row["sessions"], row["dead_links"]) == (2, 1), row
    # the doctor's network layer (run where the VM host's QEMU dials from) says so
    doctor = subprocess.run(
        ["ip", "netns", "exec", a.pair.vm, *VMPLUG, "doctor", "--json"],
        env=a.proc.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    findings = [f for f in json.loads(doctor.stdout)["findings"] if f["layer"] == "network"]
    quality = [f for f in findings if f["check"] == "network.quality"]
    assert [f["severity"] for f in quality] == ["warning"], findings
    assert "dropped 1 time(s) by a network cut" in quality[0]["title"]
    streams = [f for f in findings if f["check"] == "network.stream"]
    assert [f["severity"] for f in streams] == ["ok"], findings


@pytest.mark.long_lab  # ~20 s; the bare endpoint's short cut is in the default run
def test_short_cut_is_carried_by_tcp(rig: FaultRig) -> None:
    [a] = _start(rig, "vmhost-a")
    dev_id = _up(rig, a)
    base = last_id(a.proc.history())
    t0 = time.monotonic()
    a.pair.link_down()
    try:
        while time.monotonic() - t0 < 3.0:
            assert rig.attached_in(a.name) == dev_id
            time.sleep(0.2)
    finally:
        a.pair.link_up()
    # past both timeouts from the cut's start: nothing gave up meanwhile
    time.sleep(max(0.0, LINK_TIMEOUT + 2 - (time.monotonic() - t0)))
    assert rig.attached_in(a.name) == dev_id
    assert _rows(a, base) == []
    assert rig.connects_sent() == 1
    row = rig.devhost.export_row()
    assert (row["sessions"], row["dead_links"], row["holder"]) == (1, 0, "vmhost-a"), row
    assert _host(a)["state"] == "up"


def test_device_host_killed_and_restarted(rig: FaultRig) -> None:
    [a] = _start(rig, "vmhost-a")
    dev_id = _up(rig, a)
    base = last_id(a.proc.history())
    rig.devhost.kill9()
    until(lambda: _host(a)["state"] == "down", "the device host down", 30, a.proc)
    until(lambda: rig.qemu_redirs(a.name) == {}, "the usb-redir detached", 20, a.proc)
    t0 = time.monotonic()
    rig.devhost.start()
    until(lambda: _attached_everywhere(rig, a), "the device back", 60, a.proc)
    print(f"device host restarted -> device back in the guest: {time.monotonic() - t0:.2f} s")
    assert rig.attached_in(a.name) == dev_id
    rows = _rows(a, base)
    assert kinds(rows) == HOST_LOST + HOST_BACK, rows
    assert rig.connects_sent() == 2
    assert rig.devhost.export_row()["sessions"] == 1  # a new device host process: counted anew


def test_device_host_down_when_the_vm_host_starts(rig: FaultRig) -> None:
    a = rig.add_vmhost("vmhost-a", 1)
    a.proc.start()
    until(lambda: _host(a)["state"] == "down", "the device host down", 30, a.proc)
    assert rig.qemu_redirs(a.name) == {}
    rig.devhost.start()
    _up(rig, a)
    assert _remote_only(a.proc.history()) == ["remote-host-down", *HOST_BACK]
    assert rig.connects_sent() == 1


@pytest.mark.long_lab  # ~30 s
def test_two_vm_hosts_one_wins_and_keeps_it_across_a_cut(rig: FaultRig) -> None:
    a, b = _start(rig, "vmhost-a", "vmhost-b")
    # both want it; the device host gives it to the first that asks. Which
    # one that is depends on start-up order: read it, then hold the other to it.
    until(
        lambda: (
            rig.devhost.export_row()["holder"] in ("vmhost-a", "vmhost-b")
            and rig.devhost.export_row()["streaming"]
        ),
        "the device held",
        60,
    )
    winner, loser = (a, b) if rig.devhost.export_row()["holder"] == "vmhost-a" else (b, a)
    _up(rig, winner)
    until(lambda: loser.proc.json("status")["held"], "the other told", 30, loser.proc)
    held = [r for r in loser.proc.history() if r["kind"] == "device-held"]
    assert [r["detail"]["holder"] for r in held] == [winner.name]
    assert rig.qemu_redirs(loser.name) == {}
    assert not [r for r in loser.proc.history() if r["kind"] == "attach"]
    wbase, lbase = last_id(winner.proc.history()), last_id(loser.proc.history())
    # a cut of the winner's whole link: the device host lets it go, but the
    # other VM host gives the winner CLAIM_GRACE_S to come back first
    t0 = time.monotonic()
    winner.pair.link_down()
    try:
        until(lambda: _host(winner)["state"] == "down", "the device host down", 30)
        time.sleep(max(0.0, LONG_CUT - (time.monotonic() - t0)))
    finally:
        winner.pair.link_up()
    until(lambda: _attached_everywhere(rig, winner), "back with the winner", 60, winner.proc)
    assert kinds(_rows(winner, wbase)) == HOST_LOST + HOST_BACK
    assert _rows(loser, lbase) == []  # told once, and nothing else
    assert rig.qemu_redirs(loser.name) == {}
    assert rig.connects_sent() == 2
