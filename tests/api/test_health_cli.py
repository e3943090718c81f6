"""`vmplug health` on a scripted history whose answers are worked out by hand.

The journal is written through the real store (SQLite file) with chosen
timestamps, the devices are real captured ones (their identities and names
come from tests/fixtures/sysfs/mixed), and the command runs as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.apirig import FIXTURES
from vmplug.history.store import Store
from vmplug.host.sysfs import scan

T0 = 1_700_000_000.0
KBD_PORT = "2-2.4.2"
TABLET_PORT = "1-3"


def _devices() -> dict[str, Any]:
    return {d.port: d for d in scan(FIXTURES / "mixed")}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    devs = _devices()
    kbd, tablet = devs[KBD_PORT], devs[TABLET_PORT]
    path = tmp_path / "vmplug.db"
    store = Store(path)
    k = kbd.identity

    def ev(t: float, kind: str, **kw: Any) -> None:
        store.record_event(kind, ts=T0 + t, **kw)

    def act(t: float, ok: bool = True) -> None:
        store.record_action(
            "attach",
            identity=k,
            qemu_id=kbd.qemu_id,
            vm="a",
            result="ok" if ok else "error",
            error_class=None if ok else "GenericError",
            ts=T0 + t,
        )

    store.remember_device(kbd, ts=T0)
    store.remember_device(tablet, ts=T0)
    ev(0, "daemon-start")
    ev(0, "vm-up", vm="a")
    ev(0, "device-add", identity=k, port=KBD_PORT, vm="a")
    ev(0, "device-add", identity=tablet.identity, port=TABLET_PORT, vm=None)
    act(2)  # up from 2 s: the first 2 s are wanted and not up, but no outage
    ev(600, "device-remove", identity=k, port=KBD_PORT)  # failure 1
    ev(660, "device-add", identity=k, port=KBD_PORT, vm="a")
    ev(660, "device-bind", identity=k, port=KBD_PORT, vm="a")
    act(663, ok=False)  # error 1
    act(665)  # recovery 5 s (660 -> 665; the minute unplugged is not counted)
    ev(1200, "vm-down", vm="a")  # VM restart: no failure, but an outage
    ev(1300, "vm-up", vm="a")
    act(1301)  # recovery 1 s
    ev(2400, "attachment-lost", identity=k, vm="a")  # failure 2
    act(2410, ok=False)  # error 2
    act(2420, ok=False)  # error 3
    act(2430)  # recovery 30 s
    store.close()
    return path


def vmplug(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "VMPLUG_SYSFS_ROOT": str(FIXTURES / "mixed"),
        "VMPLUG_CONFIG": "/nonexistent",
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "vmplug"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_health_of_a_scripted_hour(db: Path) -> None:
    until = str(T0 + 3600)
    r = vmplug("health", "--db", str(db), "--window", "1h", "--until", until, "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["port"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {KBD_PORT, TABLET_PORT}
    kbd = rows[KBD_PORT]
    # wanted: [0,600) + [660,1200) + [1300,3600) = 600 + 540 + 2300
    assert kbd["wanted_s"] == pytest.approx(3440.0)
    # up: [2,600) + [665,1200) + [1301,2400) + [2430,3600) = 598 + 535 + 1099 + 1170
    assert kbd["up_s"] == pytest.approx(3402.0)
    assert kbd["uptime"] == pytest.approx(3402.0 / 3440.0)
    assert kbd["failures"] == 2  # the unplug and the loss; the VM restart is none
    assert kbd["mtbf_s"] == pytest.approx(1720.0)
    assert kbd["recoveries"] == 3
    assert kbd["median_recovery_s"] == pytest.approx(5.0)
    assert kbd["worst_recovery_s"] == pytest.approx(30.0)
    assert kbd["ongoing_recovery_s"] is None
    assert kbd["errors"] == 3 and kbd["errors_per_hour"] == pytest.approx(3.0)
    assert kbd["present"] and kbd["name"] == "QEMU USB Keyboard"
    tablet = rows[TABLET_PORT]  # no rule names a VM for it: never wanted
    assert (tablet["uptime"], tablet["failures"], tablet["mtbf_s"]) == (None, 0, None)
    assert tablet["errors_per_hour"] == 0.0


def test_health_window_and_device_selection(db: Path) -> None:
    # the last half hour only: [1800, 3600); the state at 1800 comes from before
    r = vmplug(
        "health", KBD_PORT, "--db", str(db), "--window", "30m", "--until", str(T0 + 3600), "--json"
    )
    assert r.returncode == 0, r.stderr
    (kbd,) = json.loads(r.stdout)
    assert kbd["wanted_s"] == pytest.approx(1800.0)
    assert kbd["up_s"] == pytest.approx(600.0 + 1170.0)
    assert kbd["failures"] == 1 and kbd["mtbf_s"] == pytest.approx(1800.0)
    assert (kbd["median_recovery_s"], kbd["worst_recovery_s"]) == (30.0, 30.0)
    assert kbd["errors"] == 2 and kbd["errors_per_hour"] == pytest.approx(4.0)
    # the table a person reads
    r = vmplug("health", KBD_PORT, "--db", str(db), "--window", "1h", "--until", str(T0 + 3600))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(KBD_PORT))
    for cell in ("98.90%", " 2 ", "28.7 min", "5.0 s", "30.0 s", " 3"):
        assert cell in line, (cell, line)
    # bad input: exit 2 with a message, no traceback
    r = vmplug("health", "--db", str(db), "--window", "soon")
    assert r.returncode == 2 and "--window 'soon'" in r.stderr and "Traceback" not in r.stderr
    r = vmplug("health", "--db", str(db), "--until", "yesterday-ish")
    assert r.returncode == 2 and "--until" in r.stderr
    r = vmplug("health", "9-9.9", "--db", str(db))
    assert r.returncode == 1 and "no device '9-9.9'" in r.stderr
    r = vmplug("health", "--db", str(db.parent / "missing.db"))
    assert r.returncode == 1 and "no history database" in r.stderr
