"""Hot-plug latency in the lab: replug -> attached in a VM, three attachers side by side.

Everything runs inside the lab guest (a Linux kernel under QEMU/TCG with an
emulated hub and keyboard, see :mod:`vmplug_lab.demo`): a VM (a second QEMU,
the "inner" QEMU) and, one after the other,

* **vmplug** — ``vmplug run`` with a rule that sends the keyboard to the VM;
* **qemu** — QEMU's own re-grab: one ``usb-host,vendorid=0x0627,productid=0x0001``
  added once; QEMU finds the replugged device on its own (its 2 s scan);
* **floor** — a bare attacher with no policy: a loop that listens to kernel
  uevents and sends ``device_add`` the instant the device's ``add`` arrives
  (the same ``usb-host`` arguments vmplug sends: ``hostdevice`` = the
  device's /dev/bus/usb node, plus hostbus/hostport/hostaddr), retrying at
  once on failure, and ``device_del`` on ``remove``.

The host unplugs and replugs the keyboard through the lab guest's QMP
(``--replugs`` times per attacher), waiting until the guest saw it go and
then 0.5-2.5 s more: QEMU restarts its 2 s scan timer when it lets a device
go, so a fixed pause would lock the replug to one phase of it.  The time is
taken **inside the guest, with one clock**: a watcher process there receives
the kernel's uevents on a netlink socket (the ``add`` of the keyboard's
usb_device is the moment it appears in sysfs: the kernel creates the
directory before it announces it; the watcher waits for it at real-time
priority, so its stamp is not late) and then, at normal priority, polls the
inner QEMU's QOM property ``attached`` of the attacher's usb-host device every
10 ms until it is true (``info usb`` would keep stale product names).  It also
notes when the kernel's ``bind`` and udevd's ``add`` broadcast arrived (the
latter is when libusb, and so QEMU's scan, can first see the device).

What bounds the numbers: the kernel holds the device's lock while it probes
drivers (~0.1 s under TCG); QEMU's open() of the node and any read of the
serial wait for it, so no attacher that must know which device this is can
act before the probe ends.  The floor's QEMU is already blocked in open() then
and goes on at once; vmplug still has to read the device, match rules and
send device_add (tens of ms of Python under TCG).

With ``--baseline REV``, a fourth attacher ``base`` is vmplug's package as git
REV has it (unpacked into the guest's tmpfs, run ahead of the current one by
``PYTHONPATH``), with the same config: before/after in one boot.  ``--rounds``
repeats the whole order (interleaved, so that a drift of the host's load falls
on every attacher alike); each attacher's replugs are pooled over the rounds.
Each series begins with one replug that is not counted (its record carries
``"warmup": true``): the inner QEMU sets up libusb at its first usb-host open.

Prints median, p90, p99 and max per attacher, the ratios vmplug/qemu and
vmplug/floor (and vmplug/base), the host's and the guest's load average, and
per phase (a round runs each attacher once) its median beside the share of the host's CPU its
hypervisor stole in that phase (/proc/stat; a shared host's noise).  Takes about
6-10 minutes under TCG; prints progress.  Not part of the test suite.

Run: .venv/bin/python bench/bench_hotplug.py [--replugs 30] [--order floor,vmplug,qemu]
     [--baseline REV] [--rounds N] [--json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmplug_lab.demo import GUEST_DIR, HUB, KBD, PORTS, REVISION_DIR, TABLET, TIMING_SOCK, DemoLab
from vmplug_lab.guest import GuestProcess, LabError, lab_unavailable_reason

PORT = PORTS[KBD.id]  # "2-2.1" in the guest kernel
VM_SOCK = f"{GUEST_DIR}/vm.sock"  # the attacher's socket (vmplug's, or the floor's)
CHECK_SOCK = f"{GUEST_DIR}/check.sock"  # for setting up and cleaning up
ATTACHERS = ("floor", "vmplug", "qemu", "base")
IDS = {"floor": "floor", "qemu": "regrab", "vmplug": "vmplug-*", "base": "vmplug-*"}
#: QEMU's own re-grab: matched by vendor/product, found by its scan
REGRAB = {"driver": "usb-host", "bus": "xhci.0", "vendorid": 0x0627, "productid": 0x0001}
#: issue 16: vmplug / floor at p50 and p90, and QEMU's re-grab / vmplug at p50
GOAL_FLOOR = 1.2
GOAL_REGRAB = 5.0


class Bench:
    def __init__(self, workdir: Path, replugs: int, say: Callable[[str], None]) -> None:
        self.lab = DemoLab(workdir, say=lambda _l: None)
        self.replugs = replugs
        self.say = say
        self.procs: list[GuestProcess] = []
        self.loads: dict[str, dict[str, str]] = {}
        #: per attacher, one entry per phase (a round runs each attacher once):
        #: the phase's median and the share of the host's CPU time the
        #: hypervisor gave to others while this machine wanted it
        self.phases: dict[str, list[dict[str, float | None]]] = {}
        self.records: dict[str, list[dict[str, Any]]] = {}

    def boot(self) -> None:
        self.lab.boot()
        # one keyboard: a vendorid/productid usb-host would grab the tablet too
        self.lab.guest.unplug(TABLET.id)
        self.lab.start_vm()
        self.lab.guest.wait_for(
            f"test -S {VM_SOCK} && test -S {TIMING_SOCK} && test -S {CHECK_SOCK}", timeout=60
        )
        time.sleep(1.0)

    def close(self) -> None:
        for proc in self.procs:
            if self.lab.guest.qemu_pid is not None:
                with contextlib.suppress(LabError):
                    self.lab.guest.kill(proc, signal.SIGKILL, timeout=5)
        self.lab.close()

    def spawn(self, mode: str, sock: str, out: str, dev_id: str) -> tuple[GuestProcess, str]:
        proc, first = self.lab.tool_spawn(mode, sock, out, dev_id)
        self.procs.append(proc)
        return proc, str(first["id"])

    def stop(self, proc: GuestProcess) -> None:
        self.lab.guest.kill(proc, signal.SIGKILL, timeout=5)
        self.procs.remove(proc)

    def load(self, label: str) -> None:
        host = Path("/proc/loadavg").read_text().split()[:3]
        guest = self.lab.guest.run("cat /proc/loadavg").stdout.split()[:3]
        self.loads[label] = {"host": " ".join(host), "guest": " ".join(guest)}

    def series(self, name: str, watch_log: Path) -> list[float | None]:
        results: list[float | None] = []
        records = self.records.setdefault(name, [])
        # not counted: the inner QEMU's first usb-host open sets up libusb (a
        # floor that comes first paid 915 ms for it once), and each attacher
        # starts its series warm alike
        rec = self.lab.timed_replug(watch_log)
        records.append({**rec, "warmup": True})
        shown = "timeout" if rec["dt"] is None else f"{rec['dt'] * 1000:.1f} ms"
        self.say(f"  {name:6} warm-up: {shown} (not counted)")
        time.sleep(0.3)
        for i in range(self.replugs):
            rec = self.lab.timed_replug(watch_log)
            records.append(rec)
            results.append(rec["dt"])
            marks = " ".join(f"{k}={v * 1000:.0f}" for k, v in sorted(rec["marks"].items()))
            shown = "timeout" if rec["dt"] is None else f"{rec['dt'] * 1000:7.1f} ms"
            self.say(f"  {name:6} {i + 1:2d}/{self.replugs}: {shown}  ({marks} ms)")
            time.sleep(0.3)
        return results

    def phase(self, name: str) -> list[float | None]:
        self.load(f"{name} before")
        cpu0 = host_cpu()
        results: list[float | None] = []
        watch_log = self.lab.guest.workdir / f"watch-{name}.log"
        cleanup: list[Callable[[], object]] = []
        try:
            if name in ("vmplug", "base"):
                env = {"PYTHONPATH": REVISION_DIR} if name == "base" else {}
                self.say(f"  starting vmplug run in the guest{f' ({env})' if env else ''}…")
                # a replug every few seconds is what the healing ladder takes
                # for a flapping device (it would reattach it); the floor has none
                config = self.lab.guest.workdir / "vmplug.toml"
                text = config.read_text()
                if "heal = false" not in text:
                    config.write_text(text.replace("match = ", "heal = false\nmatch = ", 1))
                self.lab.start_daemon(env=env)
                cleanup.append(self.lab.stop_daemon)
                if env:  # that it runs the baseline's package
                    where = self.lab.guest.run(
                        f"env PYTHONPATH={REVISION_DIR} {sys.executable} -c"
                        " 'import vmplug; print(vmplug.__file__)'",
                        timeout=300, check=True,
                    ).stdout.strip()  # fmt: skip
                    if not where.startswith(REVISION_DIR):
                        raise LabError(f"the baseline's vmplug is not the one imported: {where}")
                self.wait_vmplug_attached()
            elif name == "qemu":
                added = self.lab.tool_run("add", VM_SOCK, IDS[name], json.dumps(REGRAB))
                if not added.get("added"):
                    raise LabError(f"device_add of the re-grab usb-host failed: {added}")
            else:
                floor, _ = self.spawn("floor", VM_SOCK, "floor.log", IDS[name])
                cleanup.append(lambda: self.stop(floor))
            watcher, _ = self.spawn("watch", TIMING_SOCK, watch_log.name, IDS[name])
            cleanup.insert(0, lambda: self.stop(watcher))
            results = self.series(name, watch_log)
            return results
        finally:
            for step in cleanup:
                step()
            # leave the VM empty for the next attacher
            self.lab.tool_run("del", CHECK_SOCK, IDS[name])
            self.load(f"{name} after")
            self.phases.setdefault(name, []).append(
                {
                    "median_ms": summarize(results).get("median_ms"),
                    "steal_pct": stolen_pct(cpu0, host_cpu()),
                }
            )

    def wait_vmplug_attached(self, timeout: float = 60.0) -> None:
        """Until the daemon has attached the keyboard (the watcher needs its id)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.lab.tool_run("find", CHECK_SOCK, IDS["vmplug"]).get("attached"):
                return
            time.sleep(0.5)
        raise LabError("vmplug did not attach the keyboard")


def host_cpu() -> tuple[int, int]:
    """(steal, total) clock ticks of this machine's CPUs, from /proc/stat.

    Steal is the time the hypervisor ran something else while this machine
    had work for the CPU: a shared host's noise, which slows the lab guest's
    one emulated CPU and so whichever attacher's phase it falls in."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[7], sum(fields)  # user nice system idle iowait irq softirq steal


def stolen_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else 0.0


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (p99 of 30 samples is the largest but none)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def summarize(samples: list[float | None]) -> dict[str, Any]:
    ok = [s for s in samples if s is not None]
    if not ok:
        return {"n": len(samples), "timeouts": len(samples)}
    return {
        "n": len(samples),
        "timeouts": len(samples) - len(ok),
        "median_ms": round(statistics.median(ok) * 1000, 1),
        "p90_ms": round(quantile(ok, 0.90) * 1000, 1),
        "p99_ms": round(quantile(ok, 0.99) * 1000, 1),
        "max_ms": round(max(ok) * 1000, 1),
        "min_ms": round(min(ok) * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replugs", type=int, default=30, help="replugs per attacher (default 30)")
    ap.add_argument("--order", default="floor,vmplug,qemu", help="attachers, in order")
    ap.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    ap.add_argument("--workdir", type=Path, help="keep the lab's files here")
    ap.add_argument("--baseline", metavar="REV", help="attacher 'base': vmplug at git REV")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the order N times (default 1)")
    args = ap.parse_args()
    order = [a.strip() for a in args.order.split(",") if a.strip()]
    if args.baseline and "base" not in order:
        order.insert(order.index("vmplug") + 1 if "vmplug" in order else len(order), "base")
    if any(a not in ATTACHERS for a in order):
        ap.error(f"--order takes {', '.join(ATTACHERS)}")
    if "base" in order and not args.baseline:
        ap.error("attacher 'base' needs --baseline REV")
    if args.replugs < 1 or args.rounds < 1:
        ap.error("--replugs and --rounds take a positive number")
    reason = lab_unavailable_reason()
    if reason:
        print(f"the lab guest cannot run here: {reason}", file=sys.stderr)
        return 1
    start = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)

    own = args.workdir is None
    wd = Path(tempfile.mkdtemp(prefix="vmplug-hp-", dir="/tmp")) if own else args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    bench = Bench(wd, args.replugs, say)
    results: dict[str, list[float | None]] = {}
    try:
        say(f"booting the lab guest (TCG; devices: {HUB.id}, {KBD.id})…")
        bench.boot()
        base_rev = ""
        if args.baseline:
            say(f"base: vmplug at {args.baseline}, unpacked into the guest…")
            base_rev = bench.lab.unpack_revision(args.baseline)
        for i in range(args.rounds):
            for name in order:
                rnd = f" (round {i + 1}/{args.rounds})" if args.rounds > 1 else ""
                say(f"{name}: {args.replugs} replugs of {PORT}{rnd}")
                results.setdefault(name, []).extend(bench.phase(name))
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("stopping the lab guest…")
        bench.close()
    summary = {name: summarize(samples) for name, samples in results.items()}
    print()
    each = args.replugs * args.rounds
    print(f"replug -> QOM attached=true, in the lab guest (TCG), {each} replugs each")
    if args.baseline:
        print(f"base = vmplug at {base_rev} ({args.baseline}), vmplug = the working tree")
    print(f"{'attacher':8} {'n':>3} {'median':>9} {'p90':>9} {'p99':>9} {'max':>9} {'min':>9}")
    for name, s in summary.items():
        if "median_ms" not in s:
            print(f"{name:8} {s['n']:3d}  all timed out")
            continue
        print(
            f"{name:8} {s['n']:3d} {s['median_ms']:7.1f}ms {s['p90_ms']:7.1f}ms "
            f"{s['p99_ms']:7.1f}ms {s['max_ms']:7.1f}ms {s['min_ms']:7.1f}ms"
            + (f"  ({s['timeouts']} timeouts)" if s["timeouts"] else "")
        )
    ratios: dict[str, float] = {}
    v = summary.get("vmplug", {})
    for other in ("qemu", "floor", "base"):
        o = summary.get(other, {})
        if "median_ms" in v and "median_ms" in o:
            for q in ("median", "p90", "p99"):
                ratios[f"vmplug/{other} {q}"] = round(v[f"{q}_ms"] / o[f"{q}_ms"], 3)
    b, fl = summary.get("base", {}), summary.get("floor", {})
    if "median_ms" in b and "median_ms" in fl:
        for q in ("median", "p90"):
            ratios[f"base/floor {q}"] = round(b[f"{q}_ms"] / fl[f"{q}_ms"], 3)
    for k, r in ratios.items():
        print(f"{k:22} {r:6.3f}")
    if "vmplug/qemu median" in ratios:
        print(f"vmplug is {1 / ratios['vmplug/qemu median']:.1f}x faster than QEMU (median)")
    # the goals of issue 16, and the floor's own ratio to QEMU: what bounds the second
    f, qm = summary.get("floor", {}), summary.get("qemu", {})
    if "vmplug/floor median" in ratios:
        worst = max(ratios["vmplug/floor median"], ratios["vmplug/floor p90"])
        verdict = "meets" if worst <= GOAL_FLOOR else "MISSES"
        print(f"vmplug/floor p50 and p90 <= {GOAL_FLOOR:g}: {verdict} ({worst:.3f})")
    if "vmplug/qemu median" in ratios:
        regrab = 1 / ratios["vmplug/qemu median"]
        verdict = "meets" if regrab >= GOAL_REGRAB else "MISSES"
        line = f"qemu/vmplug median >= {GOAL_REGRAB:g}: {verdict} ({regrab:.2f})"
        if "median_ms" in f and "median_ms" in qm:
            line += f"; qemu/floor median {qm['median_ms'] / f['median_ms']:.2f} (the bound)"
        print(line)
    print("load average (1/5/15 min; the last round's):")
    for label, load in bench.loads.items():
        print(f"  {label:16} host {load['host']:16} guest {load['guest']}")
    print("per phase: median, and the host's CPU stolen by its hypervisor in that phase")
    for name, phases in bench.phases.items():
        cells = []
        for i, ph in enumerate(phases):
            median = "-" if ph["median_ms"] is None else f"{ph['median_ms']:.1f} ms"
            cells.append(f"r{i + 1} {median} (steal {ph['steal_pct']:.1f}%)")
        print(f"  {name:8} " + "   ".join(cells))
    if args.json:
        print(
            json.dumps(
                {
                    "summary": summary,
                    "ratios": ratios,
                    "loads": bench.loads,
                    "phases": bench.phases,
                    "records": bench.records,
                }
            )
        )
    if own:
        shutil.rmtree(wd, ignore_errors=True)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
