"""Lab: a device unplugged while the daemon reads it gets no second identity (issue 19).

One lab guest (hub, keyboard, tablet; :class:`vmplug_lab.demo.DemoLab`) with
a VM, a QOM watcher and ``vmplug run`` inside, on the real guest kernel.  The
keyboard is plugged in through the guest QEMU's QMP and unplugged
(``device_del``) a moment later, while the daemon is handling its ``add`` and
``bind``: the kernel then tears the device down under the daemon's read
(interfaces, configuration, port link, then device_del's attributes and
strings).  Repeated, with the delay swept, until the daemon says it met a
device changing while it read it (bounded: 30 tries).

It must never attach an id that no present device has, and the journal
must hold no identity but the two real ones.  Before issue 19 a read that lost
the serial gave the keyboard its port-path identity and a second id.

The daemon in the guest runs the vmplug this test imports (copied into the
shared work directory), so the test can be run against another checkout:
``PYTHONPATH=<old>/src pytest tests/lab/test_lab_remove_race.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmplug
from vmplug_lab.demo import CONFIG, GUEST_DIR, KBD, PORTS, TABLET, DemoLab
from vmplug_lab.guest import GuestProcess, lab_unavailable_reason

pytestmark = pytest.mark.lab

TRIES = 30
#: host seconds between device_add and device_del, swept over the window in
#: which the guest enumerates the keyboard and the daemon handles add and bind
DELAYS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.1, 1.3)
ATTACH = re.compile(r"\battach (vmplug-[0-9a-f]{12})\b")
HIT = "changing while read"
#: The demo's rule, made to ask for the interfaces: the daemon then reads the
#: device before it decides (the path this test is about).  With the demo's
#: own ``id 0627:0001`` a replug takes the fast path (issue 16): device_add
#: from the uevent alone, the read only after it, and the sweep below no
#: longer lands a read in the teardown.
RACE_CONFIG = CONFIG.replace(
    "match = 'id 0627:0001'", "match = 'id 0627:0001 with-interface 03:*:*'"
)
assert RACE_CONFIG != CONFIG

JOURNAL = """
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT entry, kind, identity, qemu_id FROM journal").fetchall()
print(json.dumps(rows))
"""


class Daemon:
    """``vmplug run`` in the guest, from a copy of the imported vmplug."""

    def __init__(self, lab: DemoLab) -> None:
        self.lab = lab
        work = lab.guest.workdir
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(
            Path(vmplug.__file__).parent,
            src / "vmplug",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (work / "race.toml").write_text(RACE_CONFIG)
        self.log = work / "race-daemon.log"
        self.db = f"{GUEST_DIR}/race.db"
        self.proc: GuestProcess | None = lab.guest.spawn(
            f"env PYTHONPATH={src} {sys.executable} -m vmplug --config {work}/race.toml run"
            f" --socket {GUEST_DIR}/race.sock --db {self.db} --events kernel",
            log=str(self.log),
        )

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def wait_removes(self, count: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.removes() >= count:
                return True
            assert self.proc is not None
            if self.lab.guest.poll(self.proc) is not None:
                raise AssertionError("vmplug run exited:\n" + "\n".join(self.lines()[-30:]))
            time.sleep(0.1)
        return False

    def journal(self) -> list[list[str | None]]:
        """(entry, kind, identity, qemu_id) of every journal row."""
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        out = self.lab.guest.run(f"{python} -I -c {_quote(JOURNAL)} {self.db}", timeout=60)
        assert out.rc == 0, out
        rows: list[list[str | None]] = json.loads(out.stdout)
        return rows

    def removes(self) -> int:
        return sum(f"device {PORTS[KBD.id]} removed" in line for line in self.lines())

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.guest.kill(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = DemoLab(Path(tmp_path_factory.mktemp("race")))
    try:
        lab.boot()
        yield lab
    finally:
        lab.close()  # stops the guest by PID: everything inside goes with it


def _ours(lab: DemoLab) -> dict[str, dict[str, object]]:
    return {k: v for k, v in lab.state().devices.items() if k.startswith("vmplug-")}


def test_unplug_during_add_and_bind_gives_no_second_identity(lab: DemoLab) -> None:
    lab.start_watcher()
    lab.start_vm()
    assert lab.wait(lambda s: s.up, 60.0) is not None, "the VM never came up"
    daemon = Daemon(lab)
    try:
        both = sorted(PORTS.values())
        held = lab.wait(lambda s: s.holds(both), 120.0)
        assert held is not None, lab.state().describe() + "\n" + "\n".join(daemon.lines()[-40:])
        known = set(_ours(lab))
        assert len(known) == 2
        identities = {r[2] for r in daemon.journal() if r[2]}
        # the hub, the keyboard and the tablet, each by its serial
        assert len([i for i in identities if i.startswith("0627:0001/serial=")]) == 2, identities

        lab.guest.unplug(KBD.id)
        assert daemon.wait_removes(1, 60.0)
        tries, hits, seen = 0, 0, 0
        bad: list[str] = []
        while tries < TRIES and not hits and not bad:
            delay = DELAYS[tries % len(DELAYS)]
            tries += 1
            lab.guest.hotplug(KBD)
            time.sleep(delay)
            before = daemon.removes()
            lab.guest.unplug(KBD.id)
            # the daemon saw the remove (or the kernel never announced the device)
            daemon.wait_removes(before + 1, 30.0)
            lab.wait(lambda s: s.holds([PORTS[TABLET.id]]), 15.0)
            lines = daemon.lines()
            hits = sum(HIT in line for line in lines)
            attached = ATTACH.findall("\n".join(lines))
            bad = [a for a in attached if a not in known]
            seen = len(attached)
        journal = daemon.journal()
        log = "\n".join(daemon.lines()[-60:])
        print(f"\n{tries} tries, {hits} reads met the device changing, {seen} attaches")
        print("\n".join(ln for ln in daemon.lines() if HIT in ln or " attach " in ln))
        assert not bad, f"attached ids no present device has: {bad}\n{log}"
        stray = {r[2] for r in journal if r[2]} - identities
        assert not stray, f"identities from half-read devices in the journal: {stray}\n{log}"
        assert {r[3] for r in journal if r[0] == "action" and r[3]} <= known, journal
        assert hits, f"the window was never hit in {tries} tries ({seen} attaches)\n{log}"
    finally:
        daemon.stop()
