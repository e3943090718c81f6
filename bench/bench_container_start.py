"""Container start -> USB devices attached in its QEMU, on a real engine in the lab guest.

The KPI from the field: "device detection within 10 s of container start".
Inside the lab guest (:mod:`vmplug_lab.containers`): the engine (Debian's
``dockerd`` 20.10 or ``podman system service``), the compose service
``vmplug generate compose --by-port`` writes, brought up by the real
``docker-compose`` 1.29, and ``vmplug run`` finding the container through the
engine's API.  Then, with the guest's one clock (``scripts/ctstart.py``):

* **container** -- ``POST /containers/windows/stop`` (and wait until its QEMU
  is gone), then ``POST /containers/windows/start`` -> both usb-host devices
  ``attached`` in the container's QEMU (QOM, on a QMP socket of its own);
* **bare VM** -- the very QEMU command line the container's entry script ran
  (from its log), started directly in the guest, timed the same way.

``--full`` first runs the whole matrix the lab test keeps a subset of, each
step timed: replug, engine restart of the container, ``docker-compose up
--force-recreate``, the engine killed -9 and started again, vmplug restarted.

Prints median / p90 / max of each and the load averages.  Takes 8-15 minutes
under TCG.  Not part of the test suite.  Run: ``python -m bench.bench_container_start``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmplug_lab.containers import KBD, PORTS, ContainerLab
from vmplug_lab.guest import LabError, lab_unavailable_reason

BOTH = sorted(PORTS.values())


def _stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "n": len(s),
        "median": statistics.median(s),
        "p90": s[min(len(s) - 1, round(0.9 * (len(s) - 1)))],
        "max": s[-1],
        "min": s[0],
    }


def _load(lab: ContainerLab) -> dict[str, str]:
    host = " ".join(f"{x:.2f}" for x in os.getloadavg())
    guest = lab.guest.run("cat /proc/loadavg", timeout=30).stdout.split()[:3]
    return {"host": host, "guest": " ".join(guest)}


def _held(lab: ContainerLab, what: str, t0: float, min_conn: int = 0) -> float:
    secs, st = lab.expect(BOTH, 120.0, min_conn)
    if secs is None:
        raise LabError(f"{what}: {st.describe()}")
    return time.monotonic() - t0


def full_matrix(lab: ContainerLab, say: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.monotonic()
    lab.guest.unplug(KBD.id)
    lab.expect([PORTS["tablet1"]], 60.0)
    t0 = time.monotonic()
    lab.guest.hotplug(KBD)
    out["replug"] = _held(lab, "replug", t0)
    conn = lab.state().conn
    t0 = time.monotonic()
    lab.cli("restart -t 10 windows")
    out["engine restart of the container"] = _held(lab, "restart", t0, conn)
    conn = lab.state().conn
    t0 = time.monotonic()
    lab.up(recreate=True)
    out["compose up --force-recreate"] = _held(lab, "force-recreate", t0, conn)
    t0 = time.monotonic()
    lab.engine.kill(signal.SIGKILL)
    lab.engine.start()
    out["engine killed and started"] = _held(lab, "engine restart", t0)
    t0 = time.monotonic()
    lab.stop_daemon()
    lab.start_daemon()
    out["vmplug restart"] = _held(lab, "vmplug restart", t0)
    for k, v in out.items():
        say(f"  {k}: back in {v:.1f} s (wall clock, host side)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("docker", "podman"), default="docker")
    ap.add_argument("--starts", type=int, default=10, help="timed starts of each (default 10)")
    ap.add_argument("--full", action="store_true", help="run the whole restart matrix first")
    ap.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = ap.parse_args()
    if args.starts < 1:
        print("--starts must be at least 1", file=sys.stderr)
        return 2
    reason = lab_unavailable_reason()
    if reason:
        print(f"the lab guest cannot run here: {reason}", file=sys.stderr)
        return 1
    start = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {line}", file=sys.stderr, flush=True)

    wd = Path(tempfile.mkdtemp(prefix="vmplug-bench-ct-", dir="/tmp"))
    lab = ContainerLab(wd, args.engine)
    summary: dict[str, Any] = {"engine": args.engine}
    try:
        say(f"booting the lab guest, starting {args.engine}, importing the image")
        lab.boot()
        say(f"setup: {lab.timings}")
        lab.generate()
        lab.up()
        lab.start_watcher()
        lab.start_daemon()
        if lab.expect(BOTH, 120.0)[0] is None:
            raise LabError("cold start: devices not attached")
        say("cold start: both devices attached")
        summary["load_before"] = _load(lab)
        if args.full:
            summary["matrix"] = full_matrix(lab, say)
        argv = lab.qemu_argv()
        container: list[float] = []
        for i in range(args.starts):
            rec = lab.time_container_start()
            if rec["dt"] is None:
                raise LabError(f"container start {i + 1}: devices never attached: {rec}")
            container.append(float(rec["dt"]))
            say(f"container start {i + 1}: attached after {rec['dt']:.2f} s")
        lab.cli("stop -t 5 windows")
        bare: list[float] = []
        for i in range(args.starts):
            rec = lab.time_bare_vm(argv)
            if rec["dt"] is None:
                raise LabError(f"bare VM start {i + 1}: devices never attached: {rec}")
            bare.append(float(rec["dt"]))
            say(f"bare VM start {i + 1}: attached after {rec['dt']:.2f} s")
        summary["load_after"] = _load(lab)
        summary["container"] = _stats(container)
        summary["bare_vm"] = _stats(bare)
        summary["setup"] = lab.timings
    except LabError as exc:
        say(f"lab error: {exc}")
        return 1
    finally:
        lab.close()
    print(f"\nstart -> both usb-host devices attached, {args.engine} in the lab guest (TCG)")
    print(f"{'':10} {'n':>3} {'median':>8} {'p90':>8} {'max':>8} {'min':>8}")
    for name in ("container", "bare_vm"):
        s = summary[name]
        print(
            f"{name:10} {s['n']:3d} {s['median']:7.2f}s {s['p90']:7.2f}s"
            f" {s['max']:7.2f}s {s['min']:7.2f}s"
        )
    ratio = summary["container"]["median"] / summary["bare_vm"]["median"]
    print(
        f"container / bare VM (median): {ratio:.2f}; KPI 10 s: "
        f"{'met' if summary['container']['p90'] < 10 else 'NOT met'} at p90"
    )
    print(f"load average before: {summary['load_before']}, after: {summary['load_after']}")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
