"""The soak on a real kernel: the lab guest, real USB uevents, real netlink, faults.

Run (bounded by --duration; tests/lab/test_lab_soak.py runs a short one):

    /tmp/team/labslot .venv/bin/python -m bench.soak_lab [--duration 900] [--seed 1] [--json]

What runs, all real: the lab guest (:class:`vmplug_lab.demo.DemoLab`: the
distribution kernel under QEMU/TCG with an emulated hub, keyboard and tablet),
inside it a bare QEMU as the VM (no OS, QMP only), the demo's QOM watcher, and
``vmplug run --events kernel`` reading the guest kernel's own netlink uevents
with a receive buffer of ``--rcvbuf`` bytes (``VMPLUG_UEVENT_RCVBUF``; the
kernel doubles it).  Its database and sockets live on a tmpfs of their own in
the guest (``--dbfs-mb``), so its disk can really be full.  The demo's rule
sends both devices (0627:0001) to the VM.

Plug and unplug are the outer QEMU's ``device_add``/``device_del`` (the guest
kernel enumerates and tears the device down, and sends its uevents), at
random intervals; between stretches of them, faults picked at random
(seeded), every kind once first:

* ``cycle``: unplug + replug of a device;
* ``vm-kill``: the VM's QEMU killed with SIGKILL, restarted;
* ``daemon-kill``: vmplug killed with SIGKILL, half of the time 0-1 s after a
  replug (in the middle of its attach); a device replugged while it is dead;
  restarted (its start-up under TCG is part of the recovery time);
* ``sigstop``: the VM's QEMU stopped (SIGSTOP) for 2-4 s while a device is
  replugged;
* ``overflow``: vmplug stopped (SIGSTOP: busy, reading nothing) while
  ``ip -batch`` adds and deletes ``--veth`` veth pairs in the guest's network
  namespace (the daemon's: a burst of real ``net``/``queues`` uevents that fills
  its socket).  Before the burst the keyboard is unplugged (its ``remove`` waits
  in the socket); behind it the keyboard comes back and the tablet is replugged:
  their uevents meet a full socket and the kernel drops them.  Continued, the
  daemon reads the kernel's ENOBUFS (the kernel reports it before the queued
  uevents), journals ``overflow`` and rescans; only the rescan can tell it what
  changed, and the keyboard's ``remove`` read after it is stale;
* ``disk-full``: the database's tmpfs filled (``dd``) for ~3 s while devices move.

After each fault, polled until they hold (the recovery time) or a settle time
passes (a violation): the VM holds exactly the plugged devices, once each, all
attached, and no other ``vmplug-`` device (orphans); vmplug's RSS and open fds
stay bounded (RSS < 3x, fds < 2x + 16 of the first daemon's after start).  The
watcher's state (no device numbers: a replug looks the same) is confirmed by
a QOM read on the VM's third QMP socket: each device held by the device number
the kernel gives its port now.

The journal, read in the guest at the end, against the kernel's own record of
its uevents (``udevadm monitor --kernel`` in the guest, a second netlink
listener with a big buffer; a device unplugged before the kernel enumerated it
made no uevent, so the QMP plugs are not the record): no seqnum twice; every
``add``/``remove`` of the two ports the kernel sent while a daemon could
journal it, journaled once as what it was (not required: seqnums in the
windows where no daemon listened, the disk was full or the daemon was stopped
for an overflow, read from ``/sys/kernel/uevent_seqnum`` around each; and what
a daemon killed -9 had not journaled yet, read from the journal right after
the kill: it died with it); no device uevent journaled that the kernel did not
send; ``overflow`` entries exactly one per overflow fault (each burst a real
ENOBUFS; none from anything else), a ``rescan`` per start and overflow.

Printed as bench.soak prints: cycles, faults survived per kind, recovery
p50/p99/max per kind, violations, RSS and fds at start and end, the load.
The guest (and everything in it) is stopped by PID in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.soak import _pct, print_report
from vmplug.host.events import NetlinkEventSource
from vmplug_lab.demo import GUEST_DIR, KBD, PORTS, TABLET, TIMING_SOCK, DemoLab
from vmplug_lab.guest import GuestProcess, LabDevice, LabError, lab_unavailable_reason

FAULTS = ("cycle", "vm-kill", "daemon-kill", "sigstop", "overflow", "disk-full")
DEVS: dict[str, LabDevice] = {KBD.id: KBD, TABLET.id: TABLET}
DB = f"{GUEST_DIR}/vmplug.db"

#: Run in the guest (system python3 -I -S): the journal's uevent entries.
JOURNAL_PY = """\
import json, sqlite3, sys
con = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, timeout=10)
rows = con.execute(
    "SELECT kind, port, json_extract(detail, '$.seqnum') FROM journal WHERE entry = 'event'"
).fetchall()
seen, ours, kinds = {}, {}, {}
for kind, port, seq in rows:
    kinds[kind] = kinds.get(kind, 0) + 1
    if seq is not None:
        seen[seq] = seen.get(seq, 0) + 1
        if kind in ("device-add", "device-remove"):
            ours[str(seq)] = kind.split("-")[1] + " " + str(port)
print(json.dumps({"twice": sorted(s for s, n in seen.items() if n > 1), "uevents": ours,
                  "kinds": kinds}))
"""


#: Run in the guest (system python3 -I -S) on the VM's third QMP socket: what the
#: VM holds with the device number QEMU opened, and the kernel's device numbers
#: now; the watcher's state has no device number, so a replug it cannot tell.
VERIFY_PY = """\
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.readline()
def ask(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r.get("return")
ask("qmp_capabilities")
held = []
for item in ask("qom-list", path="/machine/peripheral") or []:
    if item.get("type") == "child<usb-host>" and item["name"].startswith("vmplug-"):
        p = "/machine/peripheral/" + item["name"]
        held.append({k: ask("qom-get", path=p, property=k)
                     for k in ("attached", "hostbus", "hostport", "hostaddr")})
devnum = {}
for port in sys.argv[2:]:
    try:
        devnum[port] = int(open("/sys/bus/usb/devices/" + port + "/devnum").read())
    except OSError:
        pass
print(json.dumps({"held": held, "devnum": devnum}))
"""


class LabSoak(DemoLab):
    """The demo's lab guest, VM, watcher and daemon, driven through the soak's faults."""

    def __init__(
        self,
        workdir: Path,
        rng: random.Random,
        *,
        settle: float = 90.0,
        rcvbuf: int = 65536,
        veth: int = 150,
        dbfs_mb: int = 32,
        heal: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.rng = rng
        self.settle = settle
        self.rcvbuf = rcvbuf
        self.veth = veth
        self.dbfs_mb = dbfs_mb
        self.heal = heal
        self.plugged = dict.fromkeys(DEVS, True)
        self.cycles = 0
        self.survived: dict[str, int] = defaultdict(int)
        self.recovery: dict[str, list[float]] = defaultdict(list)
        self.violations: list[str] = []
        #: QMP device_add / device_del the harness made
        self.made = {"add": 0, "remove": 0}
        #: kernel seqnum ranges in which no daemon could journal (dead, disk full,
        #: stopped for an overflow): their uevents are not required in the journal
        self.exempt: list[tuple[int, int]] = []
        #: per kill -9: the kernel's seqnum then, and the seqnums journaled by then
        self.kills: list[tuple[int, set[int]]] = []
        self.overflows = 0
        self.lost_in_overflow = 0  # our ports' uevents of overflow windows not journaled
        self.monitor: GuestProcess | None = None
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.unread_at_kill = 0
        self.continued = 0.0  # when the last SIGSTOPped process was continued
        self.required = 0
        self.kernel_seen: dict[str, int] = {}

    # ------------------------------------------------------------- set-up

    def boot(self) -> float:
        secs = super().boot()
        # the database and sockets on a tmpfs of their own: its disk can be full
        self.guest.run(f"mount -t tmpfs -o size={self.dbfs_mb}m soakdb {GUEST_DIR}", check=True)
        # the ladder's port cycles and re-authorizations make uevents the harness did
        # not: off unless asked for (as in bench.soak), so its record stays exact
        config = self.guest.workdir / "vmplug.toml"
        config.write_text(config.read_text() + f"\n[heal]\nenabled = {str(self.heal).lower()}\n")
        (self.guest.workdir / "journal.py").write_text(JOURNAL_PY)
        (self.guest.workdir / "verify.py").write_text(VERIFY_PY)
        # the kernel's own record of the uevents: a second netlink listener with
        # udevadm's big buffer, never stopped, never full
        log = self.guest.workdir / "uevents.log"
        self.monitor = self.guest.spawn(
            "udevadm monitor --kernel --property --subsystem-match=usb/usb_device", log=str(log)
        )
        end = time.monotonic() + 60
        while "monitor will print" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > end:
                raise LabError("udevadm monitor did not start in the guest")
            time.sleep(0.2)
        return secs

    def start_daemon(self, timeout: float = 400.0, env: Mapping[str, str] | None = None) -> float:
        """The demo's ``vmplug run``, with the small netlink receive buffer."""
        small = {NetlinkEventSource.RECEIVE_BUFFER_ENV: str(self.rcvbuf)}
        return super().start_daemon(timeout, env={**small, **(env or {})})

    # ------------------------------------------------------------- actions

    def seqnum(self) -> int:
        """The guest kernel's last uevent seqnum."""
        return int(self.guest.run("cat /sys/kernel/uevent_seqnum", timeout=60, check=True).stdout)

    def unplug(self, dev: LabDevice) -> None:
        if self.plugged[dev.id]:
            self.guest.unplug(dev.id)
            self.plugged[dev.id] = False
            self.made["remove"] += 1

    def plug(self, dev: LabDevice) -> None:
        if not self.plugged[dev.id]:
            self.guest.hotplug(dev)
            self.plugged[dev.id] = True
            self.made["add"] += 1

    def replug(self, dev: LabDevice) -> None:
        self.unplug(dev)
        time.sleep(self.rng.uniform(0.05, 0.5))
        self.plug(dev)
        self.cycles += 1

    def pick(self) -> LabDevice:
        return DEVS[self.rng.choice(sorted(DEVS))]

    def cycles_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.replug(self.pick())
            time.sleep(self.rng.uniform(0.1, 1.0))

    def kill_daemon(self) -> None:
        if self.daemon is None:
            return
        self.guest.run(f"kill -KILL {self.daemon.pid}", timeout=30)
        while self.guest.poll(self.daemon) is None:
            time.sleep(0.05)
        self.daemon = None
        # what it had not read or committed yet died with it (the kernel's socket
        # went with the process): not expected, read from the journal after the kill
        self.kills.append((self.seqnum(), set(self.journaled())))

    def fault(self, kind: str) -> None:
        dev = self.pick()
        g = self.guest
        if kind == "cycle":
            self.replug(dev)
        elif kind == "vm-kill":
            self.kill_vm()
            time.sleep(self.rng.uniform(0.1, 1.0))
            self.start_vm()
        elif kind == "daemon-kill":
            if self.rng.random() < 0.5:
                self.replug(dev)
                time.sleep(self.rng.uniform(0, 1.0))
            else:
                time.sleep(self.rng.uniform(0, 0.5))
            self.kill_daemon()
            self.replug(dev)  # a change while vmplug is dead: the restart's rescan sees it
            self.start_daemon()
            self.exempt.append((self.kills[-1][0], self.seqnum()))
        elif kind == "sigstop":
            assert self.vm is not None
            g.run(f"kill -STOP {self.vm.pid}", timeout=30)
            try:
                self.replug(dev)
                time.sleep(self.rng.uniform(2, 4))
            finally:
                g.run(f"kill -CONT {self.vm.pid}", timeout=30)
                self.continued = time.monotonic()
        elif kind == "overflow":
            self.overflow()
        elif kind == "disk-full":
            lo = self.seqnum()  # what comes now may not reach the disk
            try:
                g.run(f"dd if=/dev/zero of={GUEST_DIR}/filler bs=1M 2>/dev/null; true", timeout=60)
                for _ in range(3):
                    self.replug(self.pick())
                    time.sleep(0.5)
            finally:
                g.run(f"rm -f {GUEST_DIR}/filler", timeout=60)
            time.sleep(1.0)
            self.exempt.append((lo, self.seqnum()))

    def overflow(self) -> None:
        assert self.daemon is not None
        g = self.guest
        pid = self.daemon.pid
        before = self.journal()
        n = self.veth
        adds = "".join(f"link add sv{i} type veth peer name sw{i}\n" for i in range(n))
        dels = "".join(f"link del sv{i}\n" for i in range(n))
        (g.workdir / "veth-add.batch").write_text(adds)
        (g.workdir / "veth-del.batch").write_text(dels)
        lo = self.seqnum()
        g.run(f"kill -STOP {pid}", timeout=30)
        a, b = (DEVS[i] for i in sorted(DEVS))
        try:
            # one device leaves before the burst: its remove waits in the socket
            self.unplug(a)
            g.wait_for(f"! test -e /sys/bus/usb/devices/{PORTS[a.id]}", timeout=60, interval=0.2)
            g.run(f"ip -batch {g.workdir}/veth-add.batch && ip -batch {g.workdir}/veth-del.batch",
                  timeout=300, check=True)  # fmt: skip
            # behind the burst it comes back and the other is replugged: a full
            # socket drops their uevents; only a rescan can know
            self.plug(a)
            self.replug(b)
        finally:
            g.run(f"kill -CONT {pid}", timeout=30)
            self.continued = time.monotonic()
        hi = self.seqnum()
        self.exempt.append((lo, hi))
        self.overflows += 1
        deadline = time.monotonic() + self.settle
        while self.journal()["kinds"].get("overflow", 0) < before["kinds"].get("overflow", 0) + 1:
            if time.monotonic() > deadline:
                self.violations.append(f"overflow {self.overflows}: no overflow journaled")
                break
            time.sleep(0.5)
        time.sleep(1.0)
        journaled = self.journaled()
        self.lost_in_overflow += sum(
            1 for q in self.kernel_uevents() if lo < q <= hi and q not in journaled
        )

    # ------------------------------------------------------------- invariants

    def journal(self) -> dict[str, Any]:
        py = self.python or f"{sys.executable} -I -S"
        res = self.guest.run(f"{py} {self.guest.workdir}/journal.py {DB}", timeout=120)
        if res.rc != 0:
            raise LabError(f"reading the journal in the guest failed: {res.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def journaled(self) -> dict[int, str]:
        """seqnum -> "add PORT"/"remove PORT" of the journal's device uevents."""
        return {int(q): v for q, v in self.journal()["uevents"].items()}

    def kernel_uevents(self) -> dict[int, str]:
        """seqnum -> "add PORT"/"remove PORT": the kernel's uevents for our two
        ports, as the guest's ``udevadm monitor`` printed them."""
        text = (self.guest.workdir / "uevents.log").read_text(errors="replace")
        out: dict[int, str] = {}
        for block in text.split("\n\n"):
            props = dict(ln.split("=", 1) for ln in block.splitlines() if "=" in ln)
            port = props.get("DEVPATH", "").rsplit("/", 1)[-1]
            if props.get("ACTION") in ("add", "remove") and port in PORTS.values():
                out[int(props["SEQNUM"])] = f"{props['ACTION']} {port}"
        return out

    def figures(self) -> dict[str, int]:
        assert self.daemon is not None
        pid = self.daemon.pid
        res = self.guest.run(
            f"grep VmRSS /proc/{pid}/status; ls /proc/{pid}/fd | wc -l", timeout=60, check=True
        )
        lines = res.stdout.split("\n")
        return {"pid": pid, "rss_kb": int(lines[0].split()[1]), "fds": int(lines[1])}

    def wanted(self) -> list[str]:
        return sorted(PORTS[i] for i, p in self.plugged.items() if p)

    def verify(self, want: list[str]) -> str | None:
        """None when the VM holds exactly ``want``, attached, each by the device
        number the kernel gives its port now; else what is wrong."""
        py = self.python or f"{sys.executable} -I -S"
        ports = " ".join(PORTS.values())
        res = self.guest.run(f"{py} {self.guest.workdir}/verify.py {TIMING_SOCK} {ports}", 60)
        if res.rc != 0:
            return f"the VM's QOM unreadable: {res.stderr.strip()[-300:]}"
        v = json.loads(res.stdout)
        held = sorted(f"{h['hostbus']}-{h['hostport']}" for h in v["held"])
        if held != want:
            return f"VM holds {held}"
        for h in v["held"]:
            port = f"{h['hostbus']}-{h['hostport']}"
            if h["attached"] is not True or h["hostaddr"] != v["devnum"].get(port):
                return f"{port}: {h}, the kernel's device number {v['devnum'].get(port)}"
        return None

    def check(self, kind: str, t0: float, conn: int | None = None) -> None:
        """Poll until the invariants hold (the watcher's state, then confirmed by
        :meth:`verify`): the recovery time is when the watcher saw it."""
        want = self.wanted()
        deadline = t0 + self.settle + (400.0 if kind == "daemon-kill" else 0.0)
        while True:
            left = max(0.0, deadline - time.monotonic())
            res = self.expect(kind, want, t0, left, after=lambda s: conn is None or s.conn > conn)
            wrong = self.verify(want) if res.ok else res.detail
            if wrong is None and res.seconds is not None:
                self.recovery[kind].append(res.seconds)
                self.survived[kind] += 1
                break
            if time.monotonic() > deadline:
                self.violations.append(f"after {kind}: wanted {want}; {wrong}")
                break
            time.sleep(0.3)
        if self.daemon is not None:
            f = self.figures()
            if self.first and (
                f["rss_kb"] > 3 * self.first["rss_kb"] or f["fds"] > 2 * self.first["fds"] + 16
            ):
                self.violations.append(f"after {kind}: resources {f} vs first {self.first}")
            self.last = f

    def journal_check(self) -> dict[str, Any]:
        """The journal against the kernel's record (udevadm monitor in the guest)."""
        time.sleep(3.0)  # the monitor's last lines
        j = self.journal()
        if j["twice"]:
            self.violations.append(
                f"journal: {len(j['twice'])} seqnums twice, e.g. {j['twice'][:5]}"
            )
        kernel = self.kernel_uevents()
        journaled = {int(q): v for q, v in j["uevents"].items()}
        required = 0
        for q, what in sorted(kernel.items()):
            if any(lo < q <= hi for lo, hi in self.exempt):
                continue
            kill = next(((at, seen) for at, seen in self.kills if q <= at), None)
            if kill is not None and q not in kill[1]:
                self.unread_at_kill += 1  # it died with the daemon killed -9
                continue
            required += 1
            if journaled.get(q) != what:
                self.violations.append(
                    f"journal: the kernel's uevent {q} ({what}) journaled as {journaled.get(q)}"
                )
        top = max(kernel, default=0)
        wrong = sorted(q for q, v in journaled.items() if q <= top and kernel.get(q) != v)
        if wrong:
            self.violations.append(f"journal: uevents the kernel did not send: {wrong[:5]}")
        self.required = required
        self.kernel_seen = {
            a: sum(1 for v in kernel.values() if v.startswith(a)) for a in ("add", "remove")
        }
        if j["kinds"].get("overflow", 0) != self.overflows:
            self.violations.append(
                f"journal: {j['kinds'].get('overflow', 0)} overflow entries, "
                f"{self.overflows} overflow bursts made"
            )
        if j["kinds"].get("rescan", 0) < self.daemon_starts + self.overflows:
            self.violations.append(
                f"journal: {j['kinds'].get('rescan', 0)} rescans, fewer than "
                f"{self.daemon_starts} starts + {self.overflows} overflows"
            )
        return j

    # ------------------------------------------------------------- the run

    def run(self, duration: float) -> dict[str, Any]:
        boot = self.boot()
        start = self.step_start()
        if not start.ok:
            raise LabError(f"the soak's start: {start}")
        self.first = self.figures()
        self.last = self.first
        self.exempt.append((0, self.seqnum()))  # before the first daemon listened
        t0 = time.monotonic()
        end = t0 + duration
        i = 0
        while time.monotonic() < end:
            self.cycles_for(self.rng.uniform(4.0, 12.0))
            kind = FAULTS[i] if i < len(FAULTS) else self.rng.choice(FAULTS)
            i += 1
            conn = self.state().conn if kind == "vm-kill" else None
            t = time.monotonic()
            self.fault(kind)
            # recovery from the fault's start for a kill (the restart is part of it),
            # from SIGCONT for a stop, else from the moment the fault ended
            if kind in ("sigstop", "overflow"):
                t = self.continued
            elif kind not in ("vm-kill", "daemon-kill"):
                t = time.monotonic()
            self.check(kind, t, conn)
        self.check("cycle", time.monotonic())
        time.sleep(2.0)  # the journal's held writes
        j = self.journal_check()
        rec = {
            k: {"n": len(v), "p50_s": _pct(v, 0.5), "p99_s": _pct(v, 0.99), "max_s": max(v)}
            for k, v in sorted(self.recovery.items())
            if v
        }
        return {
            "elapsed_s": time.monotonic() - t0,
            "boot_s": boot,
            "cycles": self.cycles,
            "faults_survived": dict(sorted(self.survived.items())),
            "recovery": rec,
            "violations": self.violations,
            "uevents_checked_in_journal": self.required,
            "plugs_made": self.made,
            "kernel_uevents_seen": self.kernel_seen,
            "uevents_unread_at_kill": self.unread_at_kill,
            "usb_uevents_lost_in_overflows": self.lost_in_overflow,
            "overflow_bursts": self.overflows,
            "daemon_starts": self.daemon_starts,
            "daemon_start": self.first,
            "daemon_end": self.last,
            "rcvbuf": self.rcvbuf,
            "veth_pairs": self.veth,
            "heal": self.heal,
            "journal_kinds": j["kinds"],
            "load_avg": os.getloadavg(),
        }


def soak_lab(duration: float, seed: int, workdir: Path | None = None, **kw: Any) -> dict[str, Any]:
    """One lab soak; the guest is stopped by PID in ``finally``."""
    own = workdir is None
    wd = (
        Path(tempfile.mkdtemp(prefix="vmplug-soaklab-", dir="/tmp")) if workdir is None else workdir
    )
    s = LabSoak(wd, random.Random(seed), **kw)
    try:
        out = s.run(duration)
    finally:
        s.close()
    out["workdir"] = str(wd)
    if own and not out["violations"]:
        import shutil  # noqa: PLC0415

        shutil.rmtree(wd, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=90.0)
    ap.add_argument("--rcvbuf", type=int, default=65536)
    ap.add_argument("--veth", type=int, default=150, help="veth pairs per overflow burst")
    ap.add_argument("--heal", action="store_true", help="with the healing ladder on")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    reason = lab_unavailable_reason()
    if reason:
        print(f"soak_lab: the lab cannot run here: {reason}", file=sys.stderr)
        return 2
    try:
        out = soak_lab(args.duration, args.seed, settle=args.settle, rcvbuf=args.rcvbuf,
                       veth=args.veth, heal=args.heal)  # fmt: skip
    except LabError as exc:
        print(f"soak_lab: lab error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_report(out, "soak_lab")
        print(f"  plugs made (QMP) {out['plugs_made']}, uevents the kernel sent for them "
              f"{out['kernel_uevents_seen']}")  # fmt: skip
        print(f"  overflow: {out['overflow_bursts']} bursts of {out['veth_pairs']} veth pairs, "
              f"rcvbuf {out['rcvbuf']}, {out['usb_uevents_lost_in_overflows']} USB uevents "
              f"lost in them; {out['daemon_starts']} daemon starts")  # fmt: skip
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
