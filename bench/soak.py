"""The soak: a studio's day compressed, with faults, and the invariants after each one.

Run (bounded by --duration; the suite runs a ~45 s version, tests/qemu/test_soak.py):

    .venv/bin/python -m bench.soak [--duration 600] [--seed 1] [--json]

What runs, all real: ``vmplug run`` as a subprocess (so it can be killed with
SIGKILL) on a captured sysfs tree that the harness changes as the kernel would,
its uevents replayed through a FIFO (tests/support/fakekernel.py); two real
qemu-system-x86_64 (TCG, qemu-xhci), each with a second QMP socket the harness
reads QOM through; the daemon's SQLite journal on a tmpfs of its own (so the
disk can really be full).  The rules send the keyboard 2-2.4.2 to VM a and the
tablet 1-3 to VM b.

Faults, picked at random (seeded), between stretches of plug/unplug cycles at
random intervals (5-200 ms):

* ``cycle``: unplug + replug of a routed device (new device number);
* ``vm-kill``: QEMU of a VM killed with SIGKILL, restarted;
* ``daemon-kill``: vmplug killed with SIGKILL at a random moment, half of the
  time 0-30 ms after a replug (in the middle of its attach); restarted
  (uevents while it is dead are lost, as the kernel's would be);
* ``sigstop``: a QEMU stopped (SIGSTOP) for 2-4 s while a device is replugged;
* ``overflow``: a real ENOBUFS.  The daemon runs in a network namespace of
  its own (``unshare --net``) and reads, besides the FIFO, the real netlink
  uevent socket there, with a receive buffer of ``--rcvbuf`` bytes
  (``VMPLUG_UEVENT_RCVBUF``; tests/support/netns_overflow.py's
  ``ReplayAndNetlink``).  Once it has read the FIFO, it is stopped (SIGSTOP:
  busy, reading nothing) while ``ip -batch`` adds and deletes ``--veth`` veth
  pairs in its namespace: real uevents (net, queues) that fill its socket,
  and the kernel drops the rest and flags ENOBUFS.  Behind the burst both
  routed devices change in the tree (one unplugged, one replugged with a new
  device number) with no uevent sent: they are the uevents lost in the
  overflow.  Continued, the daemon must read the ENOBUFS, journal
  ``overflow`` and rescan; only the rescan can tell it what changed.  (What
  is not real: the lost USB uevents are the fake kernel's, dropped by the
  harness, not by the socket; bench/soak_lab.py has the kernel drop real USB
  uevents.)  With ``--rcvbuf 16777216`` (the daemon's default) the same
  burst fits and the check fails: no overflow journaled, an orphan;
* ``disk-full``: the journal's file system filled for 3 s while devices move;
* ``slow-setup``: a device announced (``add``) before the kernel has made its
  ``port`` link, the link made 20-300 ms later (``bind``): the daemon reads it
  "in flux" and again later (the soak's first finding: that re-read journaled
  the add's seqnum a second time).

After each fault, the invariants, polled until they hold (recovery time) or
``--settle`` s pass (a violation): every present routed device is held exactly
once, by its VM; no ``vmplug-`` device in any VM that is not wanted there
(orphans); the journal has every uevent's seqnum the harness sent while the
daemon lived and the disk was not full once, and none twice; one ``overflow`` entry per
overflow fault (none from anything else), a ``rescan`` per start and overflow (what a daemon
had not journaled yet when it was killed -9 is read from the journal right
after the kill and not expected: it died with it, as it would on a kernel's
socket); the daemon's RSS
and open fds stay under bounds (RSS < 3x and fds < 2x + 16 of the first
process's, measured after its start).

Printed: cycles, faults survived per kind, recovery p50/p99/max per kind,
violations (each one named), RSS and fds at start and end.  Every process the
soak starts is stopped by PID in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.fakekernel import FakeKernel
from tests.support.netns_overflow import BOTH, veth_burst
from tests.support.qemu_proc import QemuProcess
from vmplug.host.events import NetlinkEventSource
from vmplug.host.inventory import read_devices
from vmplug.vms.qmp import QmpVm

#: ``vmplug`` whose ``--events replay+kernel`` reads the FIFO and the real netlink socket
DAEMON = [sys.executable, "-m", "tests.support.netns_overflow", "daemon"]
ROUTES = {"2-2.4.2": "a", "1-3": "b"}
FAULTS = ("cycle", "vm-kill", "daemon-kill", "sigstop", "overflow", "disk-full", "slow-setup")


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


@dataclass
class Soak:
    tmp: Path
    rng: random.Random
    settle: float = 20.0
    #: the healing ladder on (default off: the invariants are the reconciler's alone)
    heal: bool = False
    kernel: FakeKernel = field(init=False)
    identities: set[str] = field(init=False)
    qemus: dict[str, QemuProcess] = field(default_factory=dict)
    daemon: subprocess.Popen[bytes] | None = None
    cycles: int = 0
    survived: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recovery: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    violations: list[str] = field(default_factory=list)
    #: seqnum -> when sent: the removes and adds sent while the daemon lived and the
    #: disk had room, each to be journaled exactly once
    expect: dict[int, float] = field(default_factory=dict)
    plugged: dict[str, bool] = field(default_factory=dict)
    devnum: int = 100
    first: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    mnt: Path = field(init=False)
    observers: dict[str, QmpVm] = field(default_factory=dict)
    recording: bool = True
    #: uevents sent while a daemon lived that it had not journaled when killed
    unread_at_kill: int = 0
    #: the daemon's netlink receive buffer (the kernel doubles it)
    rcvbuf: int = 65536
    #: veth pairs per overflow burst (each makes ~6 uevents: net and queues)
    veth: int = 150
    #: overflow faults made (each one real ENOBUFS)
    overflows: int = 0
    daemon_starts: int = 0

    def __post_init__(self) -> None:
        self.kernel = FakeKernel(self.tmp, "mixed")
        #: every identity a present device can have: an attach of any other is
        #: a device read half-way through its removal (issue 19)
        self.identities = {d.identity for d in read_devices(self.kernel.root)}
        self.sock = Path(tempfile.mkdtemp(prefix="vmplug-s", dir="/tmp"))
        self.mnt = self.tmp / "dbfs"
        self.mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(self.mnt)],
                       check=True)  # fmt: skip
        self.db = self.mnt / "vmplug.db"
        self.config = self.tmp / "vmplug.toml"
        for name in ("a", "b"):
            self.qemus[name] = QemuProcess(self.tmp, qmp_sockets=2, name=name, sock_dir=self.sock)
        vms = "".join(f'[vm.{n}]\nqmp = "{q.qmp_paths[0]}"\n\n' for n, q in self.qemus.items())
        rules = "".join(
            f'[[rule]]\nattach = "{vm}"\nmatch = \'via-port "{port}"\'\n\n'
            for port, vm in ROUTES.items()
        )
        self.config.write_text(
            vms + f'[daemon]\nsocket = "{self.sock}/api.sock"\ndatabase = "{self.db}"\n\n'
            f"[heal]\nenabled = {'true' if self.heal else 'false'}\n\n" + rules
        )
        self.plugged = dict.fromkeys(ROUTES, True)

    def _expect(self) -> None:
        if self.recording and self.daemon is not None:
            self.expect[self.kernel.seq] = time.monotonic()

    # -- processes ------------------------------------------------------------

    def start_daemon(self) -> None:
        self.drain()
        self.daemon_starts += 1
        env = os.environ | {"VMPLUG_SYSFS_ROOT": str(self.kernel.root),
                            "VMPLUG_CONFIG": str(self.config)}  # fmt: skip
        log = (self.tmp / "daemon.log").open("ab")
        env[NetlinkEventSource.RECEIVE_BUFFER_ENV] = str(self.rcvbuf)
        # in a network namespace of its own: its netlink uevent socket gets the
        # veth bursts the overflow fault makes there, and nobody else's
        self.daemon = subprocess.Popen(
            ["unshare", "--net", *DAEMON, str(self.kernel.fifo), "run", "--events", BOTH],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not (self.sock / "api.sock").exists():
            if time.monotonic() > deadline or self.daemon.poll() is not None:
                raise RuntimeError("the daemon did not start: see daemon.log")
            time.sleep(0.05)

    def kill_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait()
            self.daemon = None
            # what it had not read or committed yet died with it (a kernel's
            # netlink socket loses it too): not expected in the journal.  Under
            # load the daemon can be seconds behind the harness, so this is
            # read from the journal after the kill, not guessed from the time.
            journaled = self.seqnums()
            unread = [q for q in self.expect if q not in journaled]
            for seq in unread:
                del self.expect[seq]
            self.unread_at_kill += len(unread)
            with contextlib.suppress(FileNotFoundError):
                (self.sock / "api.sock").unlink()

    def drain(self) -> None:
        """Uevents written while no daemon listened are lost, as the kernel's are."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.kernel._fd, 65536):
                pass

    def proc_figures(self) -> dict[str, int]:
        assert self.daemon is not None
        pid = self.daemon.pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return {"pid": pid, "rss_kb": rss, "fds": sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())}

    # -- invariants -------------------------------------------------------------

    async def held(self, vm: str) -> dict[str, str] | None:
        q = self.qemus[vm]
        if not q.alive:
            return None
        obs = self.observers.get(vm)
        if obs is None:
            obs = self.observers[vm] = QmpVm(f"obs-{vm}", str(q.qmp_paths[1]), shared=True)
            await obs.start()
        try:
            found = await asyncio.wait_for(obs.observe(), 5)
        except Exception:
            await obs.stop()
            self.observers.pop(vm, None)
            return None
        return {k: f"{o.hostbus}-{o.hostport}" for k, o in found.items()}

    async def problems(self) -> list[str]:
        out: list[str] = []
        held = {vm: await self.held(vm) for vm in self.qemus}
        for vm, h in held.items():
            if h is None:
                out.append(f"VM {vm} unreadable")
                continue
            ports = list(h.values())
            for port, want in ROUTES.items():
                n = ports.count(port)
                if want == vm and self.plugged[port] and n != 1:
                    out.append(f"{port} held {n}x by {vm}")
                if (want != vm or not self.plugged[port]) and n:
                    out.append(f"orphan {port} in {vm}")
            for qid, port in h.items():
                if qid.startswith("vmplug-") and port not in ROUTES:
                    out.append(f"orphan {qid} ({port}) in {vm}")
        return out

    async def check(self, kind: str, t0: float) -> None:
        deadline = t0 + self.settle
        while True:
            found = await self.problems()
            if not found:
                self.recovery[kind].append(time.monotonic() - t0)
                self.survived[kind] += 1
                break
            if time.monotonic() > deadline:
                self.violations.append(f"after {kind}: {'; '.join(found)}")
                break
            await asyncio.sleep(0.05)
        if self.daemon is not None and self.first:
            f = self.proc_figures()
            if f["rss_kb"] > 3 * self.first["rss_kb"] or f["fds"] > 2 * self.first["fds"] + 16:
                self.violations.append(f"after {kind}: resources {f} vs first {self.first}")
            self.last = f

    def kinds(self) -> dict[str, int]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT kind, COUNT(*) FROM journal GROUP BY kind").fetchall()
        finally:
            con.close()
        return {str(k): int(n) for k, n in rows}

    def seqnums(self) -> dict[int, int]:
        """How often each uevent seqnum is in the journal."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT json_extract(detail, '$.seqnum') FROM journal "
                "WHERE entry = 'event' AND json_extract(detail, '$.seqnum') IS NOT NULL"
            ).fetchall()
        finally:
            con.close()
        seen: dict[int, int] = defaultdict(int)
        for (s,) in rows:
            seen[int(s)] += 1
        return seen

    def journal_check(self) -> None:
        seen = self.seqnums()
        doubled = sorted(s for s, n in seen.items() if n > 1)
        lost = sorted(s for s in self.expect if s not in seen)
        if doubled:
            self.violations.append(f"journal: {len(doubled)} seqnums twice, e.g. {doubled[:5]}")
        if lost:
            self.violations.append(f"journal: {len(lost)} uevents lost, e.g. {lost[:5]}")
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            attached = con.execute(
                "SELECT DISTINCT identity FROM journal "
                "WHERE entry = 'action' AND kind = 'attach' AND result = 'ok'"
            ).fetchall()
        finally:
            con.close()
        phantoms = sorted(str(i) for (i,) in attached if i not in self.identities)
        if phantoms:
            self.violations.append(f"journal: attach of identities no device has: {phantoms[:5]}")
        kinds = self.kinds()
        if kinds.get("overflow", 0) != self.overflows:
            self.violations.append(
                f"journal: {kinds.get('overflow', 0)} overflow entries, "
                f"{self.overflows} overflow bursts made"
            )
        if kinds.get("rescan", 0) < self.daemon_starts + self.overflows:
            self.violations.append(
                f"journal: {kinds.get('rescan', 0)} rescans, fewer than "
                f"{self.daemon_starts} starts + {self.overflows} overflows"
            )

    # -- actions ------------------------------------------------------------------

    def replug(self, port: str) -> None:
        if self.plugged[port]:
            self.kernel.unplug(port)
            self._expect()  # the remove
            self.plugged[port] = False
        self.devnum = self.devnum % 120 + 1
        self.kernel.plug(port, devnum=self.devnum + 1)
        self.kernel.seq -= 1
        self._expect()  # the add (the bind after it is journaled too, not checked)
        self.kernel.seq += 1
        self.plugged[port] = True
        self.cycles += 1

    async def cycles_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.replug(self.rng.choice(list(ROUTES)))
            await asyncio.sleep(self.rng.uniform(0.005, 0.2))

    async def fault(self, kind: str) -> None:
        port = self.rng.choice(list(ROUTES))
        if kind == "cycle":
            self.replug(port)
        elif kind == "vm-kill":
            vm = self.rng.choice(list(self.qemus))
            self.qemus[vm].kill(signal.SIGKILL)
            self.qemus[vm].wait()
            obs = self.observers.pop(vm, None)
            if obs is not None:
                await obs.stop()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            self.qemus[vm].cleanup()
            self.qemus[vm] = QemuProcess(self.tmp, qmp_sockets=2, name=vm, sock_dir=self.sock)
            self.qemus[vm].start()
        elif kind == "daemon-kill":
            if self.rng.random() < 0.5:
                self.replug(port)
                await asyncio.sleep(self.rng.uniform(0, 0.03))
            else:
                await asyncio.sleep(self.rng.uniform(0, 0.3))
            self.kill_daemon()
            # a device changes while vmplug is dead: the restart's rescan must see it
            self.replug(port)
            self.start_daemon()
        elif kind == "sigstop":
            vm = ROUTES[port]
            pid = self.qemus[vm].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                self.replug(port)
                await asyncio.sleep(self.rng.uniform(2, 4))
            finally:
                os.kill(pid, signal.SIGCONT)
        elif kind == "overflow":
            await self.overflow()
        elif kind == "slow-setup":
            if self.plugged[port]:
                self.kernel.unplug(port)
                self._expect()
                self.plugged[port] = False
            self.devnum = self.devnum % 120 + 1
            self.kernel.plug_setting_up(port, devnum=self.devnum + 1)
            self._expect()  # the add
            await asyncio.sleep(self.rng.uniform(0.02, 0.3))
            self.kernel.finish_setup(port)
            self.plugged[port] = True
            self.cycles += 1
        elif kind == "disk-full":
            filler = self.mnt / "filler"
            self.recording = False  # what comes now may not reach the disk
            try:
                # unbuffered, and the close inside the suppress: a full disk ends it
                with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                for _ in range(6):
                    self.replug(self.rng.choice(list(ROUTES)))
                    await asyncio.sleep(0.3)
            finally:
                filler.unlink(missing_ok=True)
            await asyncio.sleep(0.5)
            self.recording = True

    async def overflow(self) -> None:
        """vmplug stopped (busy: it reads nothing) while a burst of real uevents
        fills its netlink socket; then both devices change behind it, their
        uevents not sent (a full socket drops them).  Continued, it must read
        the kernel's ENOBUFS, journal ``overflow`` and rescan."""
        assert self.daemon is not None
        pid = self.daemon.pid
        # what the FIFO holds is read first: a uevent read after the rescan would be
        # stale (on one netlink socket, the ones before the loss come before it)
        deadline = time.monotonic() + self.settle
        while any(q not in self.seqnums() for q in self.expect) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.to_thread(veth_burst, pid, self.veth, self.tmp)
            a, b = sorted(ROUTES)
            if self.plugged[a]:
                self.kernel.unplug(a, announce=False)
                self.plugged[a] = False
            if self.plugged[b]:
                self.kernel.unplug(b, announce=False)
            self.devnum = self.devnum % 120 + 1
            self.kernel.plug(b, devnum=self.devnum + 1, announce=False)
            self.plugged[b] = True
            self.cycles += 1
        finally:
            os.kill(pid, signal.SIGCONT)
        self.overflows += 1

    async def run(self, duration: float) -> dict[str, Any]:
        for q in self.qemus.values():
            q.start()
        self.start_daemon()
        t0 = time.monotonic()
        await self.check("start", t0)
        self.first = self.proc_figures()
        self.recovery.pop("start", None)
        self.survived.pop("start", None)
        end = t0 + duration
        kinds = list(FAULTS)
        i = 0
        while time.monotonic() < end:
            await self.cycles_for(self.rng.uniform(0.5, 2.0))
            kind = kinds[i % len(kinds)] if i < len(kinds) else self.rng.choice(kinds)
            i += 1
            await self.fault(kind)
            await self.check(kind, time.monotonic())
        await self.check("cycle", time.monotonic())
        await asyncio.sleep(1.0)  # the journal's held writes
        self.journal_check()
        return self.report(time.monotonic() - t0)

    def report(self, elapsed: float) -> dict[str, Any]:
        rec = {
            k: {"n": len(v), "p50_s": _pct(v, 0.5), "p99_s": _pct(v, 0.99), "max_s": max(v)}
            for k, v in sorted(self.recovery.items())
            if v
        }
        return {
            "elapsed_s": elapsed,
            "cycles": self.cycles,
            "faults_survived": dict(sorted(self.survived.items())),
            "recovery": rec,
            "violations": self.violations,
            "uevents_checked_in_journal": len(self.expect),
            "uevents_unread_at_kill": self.unread_at_kill,
            "overflow_bursts": self.overflows,
            "veth_pairs": self.veth,
            "rcvbuf": self.rcvbuf,
            "daemon_starts": self.daemon_starts,
            "daemon_start": self.first,
            "daemon_end": self.last,
            "heal": self.heal,
            "journal_kinds": self.kinds(),
            "load_avg": os.getloadavg(),
        }

    async def close(self) -> None:
        for obs in self.observers.values():
            with contextlib.suppress(Exception):
                await obs.stop()
        self.kill_daemon()
        for q in self.qemus.values():
            with contextlib.suppress(Exception):
                os.kill(q.pid, signal.SIGCONT)
            q.cleanup()
        self.kernel.close()
        subprocess.run(["umount", str(self.mnt)], check=False)
        import shutil  # noqa: PLC0415

        shutil.rmtree(self.sock, ignore_errors=True)


async def soak(
    duration: float,
    seed: int,
    settle: float = 20.0,
    heal: bool = False,
    rcvbuf: int = 65536,
    veth: int = 150,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmplug-soak-") as tmp:
        s = Soak(Path(tmp), random.Random(seed), settle=settle, heal=heal, rcvbuf=rcvbuf, veth=veth)
        try:
            return await s.run(duration)
        finally:
            await s.close()


def print_report(out: dict[str, Any], name: str) -> None:
    """The soak's figures as text (also bench.soak_lab's, the same figures)."""
    load = " ".join(f"{x:.2f}" for x in out["load_avg"])
    print(f"{name}: {out['elapsed_s']:.0f} s, {out['cycles']} plug/unplug cycles, load {load}")
    for kind, n in out["faults_survived"].items():
        r = out["recovery"].get(kind, {})
        print(f"  {kind:12s} survived {n:4d}  recovery p50 {r.get('p50_s', 0):.3f} s  "
              f"p99 {r.get('p99_s', 0):.3f} s  max {r.get('max_s', 0):.3f} s")  # fmt: skip
    print(f"  journal: {out['uevents_checked_in_journal']} uevents checked, "
          f"{out['uevents_unread_at_kill']} unread by a daemon when it was killed")  # fmt: skip
    kinds = out["journal_kinds"]
    print("  journal: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print(f"  violations: {len(out['violations'])}")
    for v in out["violations"]:
        print(f"    {v}")
    print(f"  daemon start {out['daemon_start']}  end {out['daemon_end']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--heal", action="store_true", help="with the healing ladder on")
    ap.add_argument("--rcvbuf", type=int, default=65536, help="the daemon's netlink buffer")
    ap.add_argument("--veth", type=int, default=150, help="veth pairs per overflow burst")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (the journal's own tmpfs, to fill it)", file=sys.stderr)
        return 2
    out = asyncio.run(
        soak(args.duration, args.seed, args.settle, args.heal, args.rcvbuf, args.veth)
    )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_report(out, "soak")
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
