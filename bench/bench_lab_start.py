"""`vmplug run` start-up inside the lab guest: modules from the guest's tmpfs
(:mod:`vmplug_lab.pybundle`, unpacked at boot) vs over the 9p share.

One guest boot (the demo's: hub, keyboard, tablet, the demo config); then,
in turn, ``vmplug run`` started with the bundle (which only the venv's Python
reads, from a ``.pth`` line) and without it (``VMPLUG_LAB_BUNDLE=0``: every
import over 9p), each timed in the guest from the start to the daemon's first
``rescan:`` log line, and stopped (SIGTERM).  Beside them, in the same round,
what bounds it: the same interpreter doing nothing (``python -c pass``, and
``-I -S``), timed in the guest.  The first start over the share is the cold
one (the guest's page cache empty), as ``vmplug demo``'s first daemon start
is; later ones are warmer.  Prints each time, the ratios, the boot time and
the load average.

Run: .venv/bin/python -m bench.bench_lab_start [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vmplug_lab.demo import GUEST_DIR, DemoLab
from vmplug_lab.guest import lab_unavailable_reason

_START = """\
rm -f {d}/vmplug.sock {d}/vmplug.db*
t0=$(date +%s%N)
{env} {vmplug} --config {w}/vmplug.toml run --socket {d}/vmplug.sock --db {d}/vmplug.db \
  --events kernel >{log} 2>&1 &
pid=$!
while ! grep -q "rescan:" {log}; do
  kill -0 $pid 2>/dev/null || {{ echo died; cat {log}; exit 1; }}
  sleep 0.05
done
t1=$(date +%s%N)
kill -TERM $pid; wait $pid
echo $(( (t1 - t0) / 1000000 ))
"""

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


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
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
            where = "import vmplug, sys; print(vmplug.__file__)"
            for env in ("", "VMPLUG_LAB_BUNDLE=0 "):  # that each kind imports where it says
                got = g.run(f"{env}{sys.executable} -c {where!r}", timeout=300, check=True)
                print(f"{env or 'bundle: '}vmplug from {got.stdout.strip()}")
            vmplug = Path(sys.executable).parent / "vmplug"
            bare = ("python -c pass", "python -I -S -c pass")
            kinds = ("share", "bundle", "its imports alone", *bare)
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(args.rounds):
                for kind in kinds:  # the share first: the cold case
                    if kind == "its imports alone":  # with the bundle
                        cmd = _BARE.format(python=sys.executable, code=repr(RUN_IMPORTS))
                    elif kind.startswith("python"):
                        flags = " -I -S" if "-I" in kind else ""
                        cmd = _BARE.format(python=f"{sys.executable}{flags}", code="pass")
                    else:
                        env = "env VMPLUG_LAB_BUNDLE=0" if kind == "share" else ""
                        cmd = _START.format(
                            d=GUEST_DIR, w=g.workdir, env=env, vmplug=vmplug, log=f"/tmp/{kind}{i}"
                        )
                    res = g.run(cmd, timeout=900, check=True)
                    ms = float(res.stdout.split()[-1])
                    times[kind].append(ms / 1000)
                    what = "start -> first rescan" if kind in ("share", "bundle") else "alone"
                    print(f"round {i + 1}: {kind:22} {what:22} {ms / 1000:6.2f} s"
                          f"  (load {_load()})")  # fmt: skip
            share, bundle = times["share"], times["bundle"]
            bare_s = times["python -c pass"]
            med = statistics.median
            print(
                f"cold: share {share[0]:.2f} s / bundle {bundle[0]:.2f} s = "
                f"{share[0] / bundle[0]:.2f}x;  median share {med(share):.2f} s"
                f" / bundle {med(bundle):.2f} s = "
                f"{med(share) / med(bundle):.2f}x (goal bundle < 5 s: "
                f"{'met' if med(bundle) < 5 else 'NOT met'})"
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
            print(f"total {time.monotonic() - t0:.0f} s, load average {_load()} at the end")
        finally:
            lab.close()


if __name__ == "__main__":
    main()
