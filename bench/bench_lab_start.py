"""`vmplug run` start-up inside the lab guest: modules from the guest's tmpfs
(:mod:`vmplug_lab.pybundle`, unpacked at boot) vs over the 9p share.

One guest boot (the demo's: hub, keyboard, tablet, the demo config); then,
in turn, ``vmplug run`` started with the bundle (which only the venv's Python
reads, from a ``.pth`` line) and without it (``VMPLUG_LAB_BUNDLE=0``: every
import over 9p), each timed in the guest from the start to the daemon's first
``rescan:`` log line, and stopped (SIGTERM).

How the line is seen matters under TCG, where the guest has one emulated CPU:
the daemon's output goes to a FIFO that the timing shell reads with its
built-in ``read`` (it sleeps in the kernel until a line comes: no process is
forked while the daemon starts).  The earlier measure polled the log with
``grep`` and ``sleep`` every 50 ms, two fork+execs per poll on the daemon's
one CPU; it is still run once per round ("bundle, polled") to show what it
added (first seen in one guest, old code, load 1.5-1.8: 10.7-14.0 s
polled against 4.3-4.7 s read; its first run here, load 2.7-2.9: 1.42x).

Beside them, in the same round, what bounds it: the same interpreter doing
nothing (``python -c pass``, and ``-I -S``), the daemon's imports alone, and
where the rest goes: the bundle's daemon once more under a timing harness
(:data:`_TRACE`, written into the guest) that stamps each step of the start
(imports, config, store, API socket, event socket, VMs, the sysfs read) on the
process's own clock from its ``fork`` (``/proc/self/stat``) and exits at the
first rescan.  The first start over the share is the cold one (the guest's
page cache empty), as ``vmplug demo``'s first daemon start is; later ones are
warmer.  Prints each time, the ratios, the boot time and the load average.

With ``--baseline REV``, the bundle's start is also timed, in turn in the same
boot and rounds, with vmplug's own package as it was at the git revision REV
(``git archive``, compiled in the guest's tmpfs, first on ``PYTHONPATH``; the
rest of the bundle as it is): a before/after under the same load.

Run: .venv/bin/python -m bench.bench_lab_start [--rounds N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vmplug_lab.demo import GUEST_DIR, REVISION_DIR, DemoLab
from vmplug_lab.guest import lab_unavailable_reason

_RUN = (
    "{env} {vmplug} --config {w}/vmplug.toml run --socket {d}/vmplug.sock --db {d}/vmplug.db"
    " --events kernel"
)

#: start -> the first "rescan:" line, read from a FIFO by the shell's own `read`
_START = (
    """\
rm -f {d}/vmplug.sock {d}/vmplug.db* {log}; mkfifo {log}
t0=$(date +%s%N)
"""
    + _RUN
    + """ >{log} 2>&1 &
pid=$!
found=
while IFS= read -r line; do
  case $line in *rescan:*) found=1; break;; esac
done <{log}
t1=$(date +%s%N)
kill -TERM $pid 2>/dev/null; wait $pid; rm -f {log}
[ -n "$found" ] || {{ echo "died before its first rescan"; exit 1; }}
echo $(( (t1 - t0) / 1000000 ))
"""
)

#: the earlier measure: grep + sleep forked every 50 ms while the daemon starts
_POLLED = (
    """\
rm -f {d}/vmplug.sock {d}/vmplug.db* {log}
t0=$(date +%s%N)
"""
    + _RUN
    + """ >{log} 2>&1 &
pid=$!
while ! grep -q "rescan:" {log}; do
  kill -0 $pid 2>/dev/null || {{ echo died; cat {log}; exit 1; }}
  sleep 0.05
done
t1=$(date +%s%N)
kill -TERM $pid; wait $pid
echo $(( (t1 - t0) / 1000000 ))
"""
)

#: what `vmplug run` imports before it reads its config (as tests/unit/test_startup_imports.py)
RUN_IMPORTS = (
    "import vmplug.cli.daemon, vmplug.api.limits, vmplug.api.server, vmplug.daemon.notify,"
    " vmplug.daemon.reconciler, vmplug.history.store, vmplug.host.events, vmplug.wire.systemd"
)

_BARE = """\
t0=$(date +%s%N)
{python} -c {code}
t1=$(date +%s%N)
echo $(( (t1 - t0) / 1000000 ))
"""

#: The timing harness: `python TRACE ARGS...` is `vmplug ARGS...` with each step
#: of the start stamped (seconds since the process's fork) and an exit at the
#: first rescan; prints "step seconds" lines.  A step whose function is not
#: found (renamed) is left out, not faked.
_TRACE = r"""
import functools, importlib, os, sys, time
def now():
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
marks = [("interpreter up (python's own start, site)", now())]
def mark(what):
    marks.append((what, now()))
from vmplug.cli import main
import vmplug.cli.daemon
import vmplug.api.limits, vmplug.api.server, vmplug.daemon.notify, vmplug.daemon.reconciler
import vmplug.history.store, vmplug.host.events, vmplug.wire.systemd
mark("imports (vmplug run's, before its config)")
def after(modname, attr, label, is_async=False):
    owner = importlib.import_module(modname)
    *path, name = attr.split(".")
    try:
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)
    except AttributeError:
        return
    if is_async:
        async def wrapper(*a, **k):
            r = await fn(*a, **k); mark(label); return r
    else:
        def wrapper(*a, **k):
            r = fn(*a, **k); mark(label); return r
    setattr(owner, name, functools.wraps(fn)(wrapper))
after("vmplug.cli.daemon", "load_config", "config read and parsed")
after("vmplug.cli.daemon", "daemon_running", "no other daemon on the socket")
after("vmplug.history.store", "Store.__init__", "history store open (SQLite, schema)")
after("vmplug.daemon.reconciler", "Daemon.__init__", "daemon object")
after("vmplug.api.server", "Api.start_unix", "API socket up", True)
after("vmplug.host.events", "NetlinkEventSource.start", "uevent socket open")
after("vmplug.host.events", "ReplayEventSource.start", "uevent source open")
after("vmplug.daemon.reconciler", "Daemon._start_vm", "VM connection started", True)
after("vmplug.daemon.reconciler", "read_devices", "sysfs read")
import vmplug.daemon.reconciler as reconciler
snapshot = reconciler.Daemon._snapshot
def first_rescan(self, devices):
    snapshot(self, devices)
    mark("rescan: logged")
    prev = 0.0
    for what, t in marks:
        print(f"{t - prev:.4f} {t:.4f} {what}", file=sys.__stdout__); prev = t
    sys.__stdout__.flush()
    os._exit(0)
reconciler.Daemon._snapshot = first_rescan
sys.argv[0] = "vmplug"
main()
"""

_TRACED = """\
rm -f {d}/vmplug.sock {d}/vmplug.db*
{python} {trace} --config {w}/vmplug.toml run --socket {d}/vmplug.sock --db {d}/vmplug.db \
  --events kernel 2>/dev/null
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", metavar="REV", help="also time vmplug's package at git REV")
    args = ap.parse_args()
    reason = lab_unavailable_reason()
    if reason:
        sys.exit(f"lab unavailable: {reason}")
    print(f"load average {_load()} (2 cores shared)")
    with tempfile.TemporaryDirectory(prefix="vmplug-bench-lab-") as tmp:
        lab = DemoLab(Path(tmp))
        try:
            t0 = time.monotonic()
            boot = lab.boot()
            g = lab.guest
            print(f"boot {boot:.1f} s (bundle built and unpacked: {g.python_path is not None})")
            if g.python_path is None:
                sys.exit("no bundle in the guest: nothing to compare")
            base = f"bundle @{lab.unpack_revision(args.baseline)}" if args.baseline else None
            where = "import vmplug, sys; print(vmplug.__file__)"
            envs = ["", "VMPLUG_LAB_BUNDLE=0 "] + ([f"PYTHONPATH={REVISION_DIR} "] if base else [])
            for env in envs:  # that each kind imports where it says
                got = g.run(f"{env}{sys.executable} -c {where!r}", timeout=300, check=True)
                print(f"{env or 'bundle: '}vmplug from {got.stdout.strip()}")
            trace = g.workdir / "trace_start.py"
            trace.write_text(_TRACE)
            vmplug = Path(sys.executable).parent / "vmplug"
            bare = ("python -c pass", "python -I -S -c pass")
            starts = ("share", "bundle", *([base] if base else []))
            kinds = (*starts, "bundle, polled", "its imports alone", *bare, "traced")
            times: dict[str, list[float]] = {k: [] for k in kinds}
            steps: dict[str, list[float]] = {}
            for i in range(args.rounds):
                for kind in kinds:  # the share first: the cold case
                    if kind == "its imports alone":  # with the bundle
                        cmd = _BARE.format(python=sys.executable, code=repr(RUN_IMPORTS))
                    elif kind.startswith("python"):
                        flags = " -I -S" if "-I" in kind else ""
                        cmd = _BARE.format(python=f"{sys.executable}{flags}", code="pass")
                    elif kind == "traced":
                        cmd = _TRACED.format(d=GUEST_DIR, w=g.workdir, python=sys.executable,
                                             trace=trace)  # fmt: skip
                    else:
                        script = _POLLED if kind == "bundle, polled" else _START
                        env = {
                            "share": "env VMPLUG_LAB_BUNDLE=0",
                            base: f"env PYTHONPATH={REVISION_DIR}",
                        }.get(kind, "")
                        log = f"/tmp/start-{i}"
                        cmd = script.format(d=GUEST_DIR, w=g.workdir, env=env, vmplug=vmplug,
                                            log=log)  # fmt: skip
                    res = g.run(cmd, timeout=900, check=True)
                    if kind == "traced":
                        lines = [ln.split(" ", 2) for ln in res.stdout.strip().splitlines()]
                        for delta, _at, what in lines:
                            steps.setdefault(what, []).append(float(delta))
                        total = float(lines[-1][1])
                        times[kind].append(total)
                        print(f"round {i + 1}: {'bundle, traced':22} {'fork -> first rescan':22}"
                              f" {total:6.2f} s  (load {_load()})")  # fmt: skip
                        continue
                    ms = float(res.stdout.split()[-1])
                    times[kind].append(ms / 1000)
                    what = (
                        "alone" if kind.startswith(("python", "its")) else "start -> first rescan"
                    )
                    print(f"round {i + 1}: {kind:22} {what:22} {ms / 1000:6.2f} s"
                          f"  (load {_load()})")  # fmt: skip
            med = statistics.median
            share, bundle = times["share"], times["bundle"]
            polled = med(times["bundle, polled"])
            bare_s = times["python -c pass"]
            print(
                f"cold: share {share[0]:.2f} s / bundle {bundle[0]:.2f} s = "
                f"{share[0] / bundle[0]:.2f}x;  median share {med(share):.2f} s"
                f" / bundle {med(bundle):.2f} s = "
                f"{med(share) / med(bundle):.2f}x (goal bundle < 5 s: "
                f"{'met' if med(bundle) < 5 else 'NOT met'})"
            )
            if base:
                b = med(times[base])
                print(
                    f"before/after: {base} {b:.2f} s / bundle now {med(bundle):.2f} s = "
                    f"{b / med(bundle):.2f}x (medians of {args.rounds}, same boot and rounds)"
                )
            print(
                f"measure: the same bundle start polled (grep + sleep forked every 50 ms, the"
                f" earlier measure) {polled:.2f} s = {polled / med(bundle):.2f}x the read one"
            )
            print(
                f"bound: python -c pass in the guest {med(bare_s):.2f} s "
                f"(-I -S {med(times['python -I -S -c pass']):.2f} s); "
                f"bundle start / python -c pass = {med(bundle) / med(bare_s):.2f}x"
            )
            imports = med(times["its imports alone"])
            print(
                f"  of it, vmplug run's imports alone (bundle) {imports:.2f} s = "
                f"{imports / med(bundle):.0%} of the start; the rest (config, first read, API "
                f"up) {med(bundle) - imports:.2f} s"
            )
            traced = med(times["traced"])
            print(f"breakdown (bundle, on the daemon's own clock from its fork; median of "
                  f"{args.rounds}; total {traced:.2f} s):")  # fmt: skip
            for what, deltas in steps.items():
                d = med(deltas)
                print(f"  {d:6.3f} s {d / traced:4.0%}  {what}")
            print(f"total {time.monotonic() - t0:.0f} s, load average {_load()} at the end")
        finally:
            lab.close()


if __name__ == "__main__":
    main()
