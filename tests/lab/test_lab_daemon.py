"""Lab: the daemon keeps emulated USB devices in a real QEMU, inside the lab guest.

One lab guest for the module (hub, keyboard, tablet; see :mod:`vmplug_lab.demo`),
with a VM (a second QEMU), ``vmplug run`` and a QOM watcher inside.  The tests
run in order and each builds on the state the previous one left: plug ->
unplug -> replug -> VM killed -> daemon restarted.  The guest (and with it
everything inside) is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug_lab.demo import KBD, PORTS, TABLET, TIMING_SOCK, DemoLab
from vmplug_lab.guest import lab_unavailable_reason

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    # a short path: the guest's sockets live elsewhere, but keep 9p paths plain
    lab = DemoLab(Path(tmp_path_factory.mktemp("demo")))
    try:
        lab.boot()
        yield lab
    finally:
        lab.close()


def _ours(lab: DemoLab) -> dict[str, dict[str, object]]:
    return {k: v for k, v in lab.state().devices.items() if k.startswith("vmplug-")}


def test_plug_attaches_into_the_vm(lab: DemoLab) -> None:
    res = lab.step_start()
    assert res.ok, res
    ours = _ours(lab)
    assert len(ours) == 2
    assert {(d["hostbus"], d["hostport"]) for d in ours.values()} == {(2, "2.1"), (2, "2.2")}
    assert all(d["attached"] is True for d in ours.values())
    assert any(" attach vmplug-" in line and " ok in " in line for line in lab.daemon_lines)


def test_unplug_removes_the_device_from_the_vm(lab: DemoLab) -> None:
    res = lab.step_unplug(KBD)
    assert res.ok, res
    assert [d["hostport"] for d in _ours(lab).values()] == ["2.2"]


def test_replug_brings_it_back(lab: DemoLab) -> None:
    res = lab.step_replug(KBD)
    assert res.ok, res
    assert sorted(str(d["hostport"]) for d in _ours(lab).values()) == ["2.1", "2.2"]


def test_vm_killed_and_restarted_gets_its_devices_again(lab: DemoLab) -> None:
    res = lab.step_restart_vm()
    assert res.ok, res
    assert lab.state().ports() == sorted(PORTS.values())


def test_daemon_restart_adopts_without_double_attach(lab: DemoLab) -> None:
    before = set(_ours(lab))
    res = lab.step_restart_daemon(hold=3.0)
    assert res.ok, res
    after = _ours(lab)
    assert set(after) == before  # same ids: adopted, not attached again
    assert len(after) == 2
    assert PORTS[TABLET.id] in lab.state().ports()


def test_replug_is_attached_at_once_not_left_to_qemus_scan(lab: DemoLab) -> None:
    """Timed in the guest with one clock: from the keyboard's directory in sysfs
    (the kernel's add uevent) to QOM attached=true.  QEMU's own re-grab needs
    udevd to have told libusb, then its next 2 s scan; vmplug hands QEMU the
    device node on the kernel's add."""
    kbd = next(k for k, d in _ours(lab).items() if d["hostport"] == "2.1")
    log = lab.guest.workdir / "timing.log"
    watcher, _ = lab.tool_spawn("watch", TIMING_SOCK, log.name, kbd)
    try:
        replugs = [lab.timed_replug(log, pause=(0.3, 0.8)) for _ in range(3)]
    finally:
        lab.guest.kill(watcher, signal.SIGKILL, timeout=5)
    assert all(r["dt"] is not None for r in replugs), replugs
    # QEMU holds the device by its new number: given the node, not found by a scan
    assert all(r["hostaddr"] == r["devnum"] for r in replugs), replugs
    # generous for TCG on a busy host, yet below what a 2 s scan gives on average
    assert statistics.median(r["dt"] for r in replugs) < 1.5, replugs
    res = lab.expect("after timed replugs", list(PORTS.values()), time.monotonic(), 30.0)
    assert res.ok, res
