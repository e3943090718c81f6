"""Benchmark the store and the health computation.

    .venv/bin/python bench/bench_store.py [--dir DIR] [--writes 10000]

1. ``record_event`` latency over N writes (median, p99, max), three ways in the
   same run: WAL + synchronous=NORMAL one transaction per write (what the
   daemon does), WAL + synchronous=FULL one transaction per write (fsync per
   commit), and NORMAL batched 100 writes per transaction (amortised).
2. Health for 100 devices over a 100k-entry history: load the journal, then
   one pass for all devices (``health_by_device``) against the alternative of
   one ``device_health`` per device, and against one SQL query per device.

The database lives under ``--dir`` (default: a fresh directory in /var/tmp,
which is disk here; /tmp may be tmpfs, where fsync costs nothing and FULL
looks as cheap as NORMAL).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vmplug.history.health import device_health, health_by_device
from vmplug.history.store import Store


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs"


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def _event(store: Store, i: int) -> None:
    store.record_event(
        "device-add",
        identity=f"1235:821a/serial={i % 100}",
        port=f"3-1.{i % 4}",
        vm="windows",
        detail={"busnum": 3, "devnum": i % 127},
    )


def bench_writes(directory: Path, label: str, n: int, *, synchronous: str, batch: int) -> None:
    path = directory / f"writes-{synchronous.lower()}-{batch}.db"
    store = Store(path, synchronous=synchronous)
    for i in range(100):  # warm-up: statement cache, file growth
        _event(store, i)
    times: list[float] = []
    t_all = time.perf_counter()
    if batch == 1:
        for i in range(n):
            t0 = time.perf_counter()
            _event(store, i)
            times.append(time.perf_counter() - t0)
    else:
        for start in range(0, n, batch):
            t0 = time.perf_counter()
            with store.batch():
                for i in range(start, min(n, start + batch)):
                    _event(store, i)
            times.append((time.perf_counter() - t0) / batch)
    total = time.perf_counter() - t_all
    store.close()
    times.sort()
    unit = "per write" if batch == 1 else f"per write, amortised over {batch}/txn"
    print(
        f"  {label:<34} median {_fmt_us(statistics.median(times))}  "
        f"p99 {_fmt_us(_percentile(times, 0.99))}  max {_fmt_us(times[-1])}  "
        f">1ms: {sum(t > 1e-3 for t in times)}  ({n} writes, {n / total:,.0f}/s, {unit})"
    )


def build_history(store: Store, n_events: int, n_devices: int, n_vms: int, seed: int) -> float:
    """Write a plausible journal: replugs, VM restarts, lost attachments, retries."""
    rng = random.Random(seed)
    vms = [f"vm{i}" for i in range(n_vms)]
    devs = [f"1235:{i:04x}/serial=S{i}" for i in range(n_devices)]
    target = {d: vms[i % n_vms] for i, d in enumerate(devs)}
    t = 1_700_000_000.0
    written = 0

    def ev(kind: str, ident: str | None = None, vm: str | None = None) -> None:
        nonlocal written
        store.record_event(kind, identity=ident, vm=vm, port="3-1", ts=t)
        written += 1

    def act(kind: str, ident: str, ok: bool = True) -> None:
        nonlocal written
        store.record_action(
            kind,
            identity=ident,
            qemu_id="vmplug-0",
            vm=target[ident],
            result="ok" if ok else "error",
            error_class=None if ok else "GenericError",
            ts=t,
        )
        written += 1

    with store.batch():
        ev("daemon-start")
        for vm in vms:
            ev("vm-up", vm=vm)
        for d in devs:
            ev("device-add", d, target[d])
            act("attach", d)
        while written < n_events:
            t += rng.expovariate(1 / 5.0)
            r = rng.random()
            if r < 0.02:  # VM restart: every device of that VM comes back
                vm = rng.choice(vms)
                ev("vm-down", vm=vm)
                t += rng.uniform(5, 60)
                ev("vm-up", vm=vm)
                for d in devs:
                    if target[d] == vm:
                        t += rng.uniform(0.1, 2)
                        act("attach", d)
            elif r < 0.15:  # QEMU lost it; a few failed attempts
                d = rng.choice(devs)
                ev("attachment-lost", d, target[d])
                for _ in range(rng.randint(0, 3)):
                    t += rng.uniform(0.5, 4)
                    act("attach", d, ok=False)
                t += rng.uniform(0.5, 4)
                act("attach", d)
            else:  # replug
                d = rng.choice(devs)
                ev("device-remove", d, target[d])
                t += rng.uniform(0.5, 30)
                ev("device-add", d, target[d])
                ev("device-bind", d, target[d])
                t += rng.uniform(0.2, 3)
                act("attach", d)
    return t


def _timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    best = float("inf")
    out: object = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_health(directory: Path, n_events: int, n_devices: int) -> None:
    path = directory / "history.db"
    store = Store(path)
    t0 = time.perf_counter()
    end = build_history(store, n_events, n_devices, n_vms=4, seed=42)
    print(f"  built {store.count():,} entries in {time.perf_counter() - t0:.2f} s")
    start = end - 7 * 86400.0

    load_s, loaded = _timed(lambda: store.history(limit=None))
    entries = store.history(limit=None)
    assert isinstance(loaded, list)
    one_pass_s, result = _timed(lambda: health_by_device(entries, start, end))
    assert isinstance(result, dict)
    idents = sorted(result)
    per_device_s, _ = _timed(
        lambda: {i: device_health(entries, i, start, end) for i in idents}, repeat=1
    )
    sql_s, by_sql = _timed(
        lambda: {i: device_health(store.history(i, limit=None), i, start, end) for i in idents},
        repeat=1,
    )
    assert isinstance(by_sql, dict)
    assert by_sql == result, "per-device SQL path disagrees with the one-pass result"
    store.close()

    uptimes = sorted(h.uptime for h in result.values() if h.uptime is not None)
    print(f"  load history(limit=None):              {load_s * 1e3:8.1f} ms")
    print(
        f"  health_by_device, one pass, {len(result)} devices: {one_pass_s * 1e3:8.1f} ms "
        f"({one_pass_s / len(entries) * 1e6:.2f} µs/entry)"
    )
    print(f"  alternative: device_health x {len(idents)}:     {per_device_s * 1e3:8.1f} ms")
    print(f"  alternative: SQL filter + health x {len(idents)}: {sql_s * 1e3:8.1f} ms")
    print(
        f"  (sanity: median uptime {statistics.median(uptimes):.5f}, "
        f"failures total {sum(h.failures for h in result.values())})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--writes", type=int, default=10_000)
    parser.add_argument(
        "--full-writes",
        type=int,
        default=2_000,
        help="writes for the synchronous=FULL run (one fsync each: slow on real disks)",
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    own_dir = args.dir is None
    directory: Path = args.dir or Path(tempfile.mkdtemp(prefix="vmplug-bench-", dir="/var/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        print(f"record_event latency (db in {directory}):")
        bench_writes(
            directory,
            "WAL NORMAL, 1 txn/write (daemon)",
            args.writes,
            synchronous="NORMAL",
            batch=1,
        )
        bench_writes(
            directory, "WAL FULL,   1 txn/write", args.full_writes, synchronous="FULL", batch=1
        )
        bench_writes(directory, "WAL NORMAL, batched", args.writes, synchronous="NORMAL", batch=100)
        print(f"health, {args.devices} devices over {args.events:,} entries (7-day window):")
        bench_health(directory, args.events, args.devices)
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
