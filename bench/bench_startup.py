"""Start-up cost of the ``vmplug`` command, each figure over interpreter start.

Whole processes, timed from outside, in turn (A B A B ...) so that a drift of
the shared machine hits both sides alike; CPU time (user + sys of the finished
child, from ``getrusage``) is the figure to quote on a loaded machine, wall
time is printed beside it, and the load average with them.

* ``vmplug --version`` vs ``python -c pass`` (goal: < 30 ms over it);
* ``vmplug list --json`` on the 1,000-device tree of :mod:`bench.bench_list`
  vs ``python -c pass`` (goal: < 100 ms of work over it);
* ``vmplug run`` on that tree (one VM, the demo's config, no VM running):
  peak RSS and cpu from start to its first ``rescan:`` line, stopped with
  SIGINT there, vs the same with Rich imported first, as ``vmplug run`` did
  before issue 16 (goal: peak RSS < 40 MB); the same on the 11-device capture,
  without and with ``[api] listen``; and beside them what bounds it, each a
  whole interpreter's peak RSS: bare asyncio, and asyncio with aiohttp's
  server (which the daemon's unix-socket API is built on, with or without
  ``[api]``).

Run: .venv/bin/python -m bench.bench_startup [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_list import BUSES, build_tree

ROOT = Path(__file__).resolve().parent.parent
VMPLUG = str(Path(sys.executable).with_name("vmplug"))  # the console script users run
BASE = [sys.executable, "-c", "pass"]


def _run(cmd: list[str]) -> tuple[float, float]:
    """(cpu, wall) seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def _pair(cmd: list[str], runs: int) -> dict[str, float]:
    """Medians of ``cmd`` and of ``python -c pass``, run in turn, and the ratio."""
    _run(cmd), _run(BASE)  # warm-up: page cache, .pyc
    a_cpu, a_wall, b_cpu, b_wall = [], [], [], []
    for _ in range(runs):
        c, w = _run(cmd)
        a_cpu.append(c)
        a_wall.append(w)
        c, w = _run(BASE)
        b_cpu.append(c)
        b_wall.append(w)
    med = statistics.median
    return {
        "cpu": med(a_cpu),
        "wall": med(a_wall),
        "base_cpu": med(b_cpu),
        "base_wall": med(b_wall),
        "over_cpu": med(a - b for a, b in zip(a_cpu, b_cpu, strict=True)),
        "over_wall": med(a - b for a, b in zip(a_wall, b_wall, strict=True)),
        "ratio_cpu": med(a / b for a, b in zip(a_cpu, b_cpu, strict=True) if b > 0),
    }


def _row(name: str, r: dict[str, float], goal_ms: float) -> None:
    print(
        f"{name:<34} cpu {r['cpu'] * 1e3:6.1f} ms (python -c pass {r['base_cpu'] * 1e3:5.1f}) "
        f"over it {r['over_cpu'] * 1e3:6.1f} ms cpu, {r['over_wall'] * 1e3:6.1f} ms wall; "
        f"ratio {r['ratio_cpu']:.2f}x; goal < {goal_ms:.0f} ms over: "
        f"{'met' if r['over_cpu'] * 1e3 < goal_ms else 'NOT met'}"
    )


_RUN = """
import sys
if sys.argv[1] == "rich":
    import rich.markup, rich.table  # the alternative: what cli/daemon imported before
from vmplug.cli import main
main(sys.argv[2:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon(tree: Path, tmp: Path, rich: bool, api: bool = False) -> tuple[float, float]:
    """(peak RSS MiB, cpu s) of one ``vmplug run``, stopped at its first rescan."""
    conf = tmp / "vmplug.toml"
    listen = f'\n[api]\nlisten = "127.0.0.1:{_free_port()}"\n' if api else ""
    conf.write_text(f'[vm.demo]\nqmp = "{tmp}/vm.sock"\n\n[[rule]]\nattach = "demo"\n'
                    f"match = 'id 0627:0001'\n{listen}")  # fmt: skip
    for stale in tmp.glob("db*"):
        stale.unlink()
    args = ["--config", str(conf), "--sysfs-root", str(tree), "run", "--socket",
            str(tmp / "api.sock"), "--db", str(tmp / "db"), "--events", "kernel"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, "rich" if rich else "-", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "rescan:" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.stderr.read()
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def _peak_rss(code: str) -> float:
    """Peak RSS (MiB) of a whole ``python -c code``."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus")
    _row("vmplug --version", _pair([VMPLUG, "--version"], args.runs), 30)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "sysfs"
        n = build_tree(tree)
        cmd = [VMPLUG, "--sysfs-root", str(tree), "list", "--json"]
        _row(f"vmplug list --json ({n}+{BUSES} devs)", _pair(cmd, args.runs), 100)
        rss: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(max(3, args.runs // 3)):
            for rich in (False, True):
                r, c = _daemon(tree, Path(tmp), rich)
                rss[rich].append(r)
                cpu[rich].append(c)
        med = statistics.median
        print(
            f"vmplug run to first rescan ({n}+{BUSES} devs): peak RSS {med(rss[False]):.1f} MiB,"
            f" cpu {med(cpu[False]):.3f} s; with Rich (before) {med(rss[True]):.1f} MiB,"
            f" {med(cpu[True]):.3f} s; ratio RSS {med(rss[False]) / med(rss[True]):.3f}x,"
            f" cpu {med(cpu[False]) / med(cpu[True]):.3f}x; goal < 40 MB: "
            f"{'met' if med(rss[False]) * 1.048576 < 40 else 'NOT met'}"
        )
        small = ROOT / "tests" / "fixtures" / "sysfs" / "mixed"
        runs = max(3, args.runs // 3)
        plain = med(_daemon(small, Path(tmp), False)[0] for _ in range(runs))
        with_api = med(_daemon(small, Path(tmp), False, api=True)[0] for _ in range(runs))
    bare = med(_peak_rss("import asyncio") for _ in range(runs))
    web = med(_peak_rss("import asyncio, aiohttp.web") for _ in range(runs))
    print(
        f"vmplug run to first rescan (capture, 11 devs): peak RSS {plain:.1f} MiB without [api],"
        f" {with_api:.1f} MiB with [api] listen; bound: bare asyncio {bare:.1f} MiB,"
        f" asyncio + aiohttp.web alone {web:.1f} MiB (the unix-socket API's server);"
        f" run / aiohttp.web alone {plain / web:.2f}x"
    )
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
