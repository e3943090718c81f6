"""QmpVm at fleet scale: 20 real QEMUs with 25 usb-host devices each.

Printed in one run:
* time until all 20 long-lived sessions are up;
* observe() of all 20 VMs at once: cold (first look of a session: every
  property of every device) and warm (the match properties are cached per
  session; only `attached` is read again);
* the same cold read for one VM with the qom-gets issued one after another,
  the alternative that concurrent issue avoids;
* observe() in shared mode (a connection per operation, nothing cached);
* CPU used by this process while 20 connected VMs sit idle, and while 20
  VMs are gone and QmpVm retries with backoff.

Run from the repository root:
    .venv/bin/python -m bench.bench_qmp [--vms 20] [--devices 25] [--idle 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from tests.support.qemu_proc import QemuProcess
from vmplug.vms.qmp import STATIC_PROPS, QmpVm

ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def device_args(vm: int, devices: int) -> list[str]:
    args = ["-device", "qemu-xhci,id=xhci"]
    for d in range(devices):
        args += [
            "-device",
            f"usb-host,id=vmplug-{vm:06x}{d:06x},vendorid=0x1235,productid=0x{d + 1:04x}",
        ]
    return args


def _qemu_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


PIDS: list[int] = []


async def observe_all(vms: list[QmpVm], label: str = "") -> tuple[float, int]:
    c0, q0 = _cpu(), _qemu_cpu(PIDS)
    t0 = time.perf_counter()
    seen = await asyncio.gather(*(vm.observe() for vm in vms))
    took = time.perf_counter() - t0
    if label:
        print(
            f"  {label}: {took * 1e3:.1f} ms wall; CPU: this process {(_cpu() - c0) * 1e3:.0f} ms, "
            f"the QEMUs {(_qemu_cpu(PIDS) - q0) * 1e3:.0f} ms"
        )
    return took, sum(len(s) for s in seen)


async def sequential_cold(sock: str, devices: int) -> float:
    """One VM, every property read with one qom-get after another."""
    client = QMPClient("bench")
    await client.connect(sock)
    try:
        t0 = time.perf_counter()
        listing = await client.execute("qom-list", {"path": "/machine/peripheral"})
        assert isinstance(listing, list)
        ids = [c["name"] for c in listing if c["type"] == "child<usb-host>"]
        assert len(ids) == devices
        for dev in ids:
            for prop in ("attached", *STATIC_PROPS):
                path = f"/machine/peripheral/{dev}"
                await client.execute("qom-get", {"path": path, "property": prop})
        return time.perf_counter() - t0
    finally:
        await client.disconnect()


async def main(n_vms: int, devices: int, idle: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="vmplug-bench-"))
    sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-b", dir="/tmp"))
    procs = [
        QemuProcess(work, device_args(i, devices), qmp_sockets=2, sock_dir=sock_dir, name=f"vm{i}")
        for i in range(n_vms)
    ]
    vms: list[QmpVm] = []
    try:
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        took = time.perf_counter() - t0
        print(f"{n_vms} QEMUs with {devices} usb-host each started in {took:.2f} s")

        vms = [QmpVm(f"vm{i}", p.qmp_path) for i, p in enumerate(procs)]
        t0 = time.perf_counter()
        for vm in vms:
            await vm.start()
        ok = await asyncio.gather(*(vm.wait_connected(10) for vm in vms))
        assert all(ok)
        print(f"all {n_vms} sessions up in {(time.perf_counter() - t0) * 1e3:.1f} ms")

        PIDS[:] = [p.pid for p in procs]
        cold, count = await observe_all(vms, "cold")
        assert count == n_vms * devices, count
        print(
            f"observe {n_vms} VMs x {devices} devices, cold (all properties): {cold * 1e3:.1f} ms"
        )
        warm = []
        for _ in range(10):
            took, count = await observe_all(vms)
            assert count == n_vms * devices
            warm.append(took)
        print(
            f"observe {n_vms} VMs x {devices} devices, warm (attached only): "
            f"median {statistics.median(warm) * 1e3:.1f} ms, max {max(warm) * 1e3:.1f} ms"
        )
        single_cold = await sequential_cold(str(procs[0].qmp_paths[1]), devices)
        one = QmpVm("one", str(procs[0].qmp_paths[1]), shared=True)
        t0 = time.perf_counter()
        assert len(await one.observe()) == devices
        one_concurrent = time.perf_counter() - t0
        print(
            f"one VM cold, {devices * (1 + len(STATIC_PROPS))} qom-gets one after another: "
            f"{single_cold * 1e3:.1f} ms; issued together (+connect): {one_concurrent * 1e3:.1f} ms"
        )
        shared = [QmpVm(f"s{i}", str(p.qmp_paths[1]), shared=True) for i, p in enumerate(procs)]
        took, count = await observe_all(shared, "shared")
        assert count == n_vms * devices
        print(f"observe {n_vms} VMs, shared mode (connect per operation): {took * 1e3:.1f} ms")

        c0, t0 = _cpu(), time.perf_counter()
        await asyncio.sleep(idle)
        used, wall = _cpu() - c0, time.perf_counter() - t0
        print(
            f"idle, {n_vms} connected VMs: {used * 1e3:.1f} ms CPU in {wall:.1f} s "
            f"({used / wall * 100:.3f} % of one core)"
        )
        assert all(vm.connected for vm in vms)

        for p in procs:
            p.stop()
            for path in p.qmp_paths:
                path.unlink(missing_ok=True)
        await asyncio.sleep(0.5)
        assert not any(vm.connected for vm in vms)
        c0, t0 = _cpu(), time.perf_counter()
        await asyncio.sleep(idle)
        used, wall = _cpu() - c0, time.perf_counter() - t0
        print(
            f"idle, {n_vms} VMs gone (backoff, stat of the socket path): {used * 1e3:.1f} ms CPU "
            f"in {wall:.1f} s ({used / wall * 100:.3f} % of one core)"
        )
    finally:
        for vm in vms:
            await vm.stop()
        for p in procs:
            p.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--devices", type=int, default=25)
    ap.add_argument("--idle", type=float, default=10.0)
    a = ap.parse_args()
    asyncio.run(main(a.vms, a.devices, a.idle))
