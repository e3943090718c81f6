"""Does a connection flood stop the daemon routing devices?  Replug latency with and
without one, and the daemon's memory and file descriptors through it.

Setup: a real ``vmplug run`` (subprocess, default ``[api]`` bounds unless
``--api`` says otherwise) over the captured ``mixed`` sysfs tree with replayed
uevents, one real QEMU (TCG, qemu-xhci) that the rules give the keyboard
2-2.4.2, its API on a unix socket and loopback TCP (tests/support/floodrig.py).

Printed:
* the replug latency (device directory back and uevents sent -> QEMU holds
  the device, read on QEMU's own second QMP socket), median and worst of
  ``--replugs``, without a flood;
* the same during a flood from a separate process: ``--streams`` /v1/events
  streams and ``--half-open`` half-open requests held open, and nonstop new
  connections sending 9 KiB request lines; and the ratio of the two medians;
* the daemon's RSS and open fds before, during and after the flood.

Run (from the repository root):
  .venv/bin/python -m bench.bench_flood [--replugs 10] [--streams 1000] [--half-open 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.support.floodrig import FloodRig, median, proc_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--replugs", type=int, default=10)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--half-open", type=int, default=1000)
    ap.add_argument("--api", default="", help='extra [api] lines, e.g. "max_streams = 2000"')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmplug-bench-flood") as tmp:
        rig = FloodRig(Path(tmp), api=args.api.replace("\\n", "\n"))
        try:
            rig.start()
            rig.replugs(2)  # warm up: first attach paths, imports
            quiet = rig.replugs(args.replugs)
            rss0, fds0 = proc_figures(rig.pid)
            log0 = len(rig.log.read_bytes().splitlines())
            t0 = time.monotonic()
            rig.flood(args.streams, args.half_open)
            opened = time.monotonic() - t0
            rss1, fds1 = proc_figures(rig.pid)
            loud = rig.replugs(args.replugs)
            rss2, fds2 = proc_figures(rig.pid)
            flood_log = len(rig.log.read_bytes().splitlines()) - log0
            report = rig.stop_flood()
            time.sleep(3.0)  # the flood's last connections close; memory is trimmed
            rss3, fds3 = proc_figures(rig.pid)
            after = rig.replugs(3)
        finally:
            rig.close()
    ratio = median(loud) / median(quiet)
    print(f"flood: {args.streams} event streams + {args.half_open} half-open requests held")
    print(f"  opened in {opened:.1f} s: {rig.flood_report}")
    print(f"  then nonstop new connections with 9 KiB request lines: {report}")
    print(f"  the daemon's log during the flood: {flood_log} lines")
    print(f"replug -> attached, {args.replugs} replugs each (QEMU's own view):")
    print(
        f"  no flood:     median {median(quiet) * 1000:7.1f} ms, worst {max(quiet) * 1000:7.1f} ms"
    )
    print(f"  during flood: median {median(loud) * 1000:7.1f} ms, worst {max(loud) * 1000:7.1f} ms")
    print(f"  ratio (median during / median without): {ratio:.2f}")
    print(f"  after the flood: median {median(after) * 1000:.1f} ms ({len(after)} replugs)")
    print("daemon RSS and open fds:")
    print(f"  before the flood     {rss0:6.1f} MB  {fds0:5d} fds")
    print(f"  flood standing       {rss1:6.1f} MB  {fds1:5d} fds")
    print(f"  end of flood replugs {rss2:6.1f} MB  {fds2:5d} fds")
    print(f"  3 s after the flood  {rss3:6.1f} MB  {fds3:5d} fds")


if __name__ == "__main__":
    main()
