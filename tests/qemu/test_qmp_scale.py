"""Fleet scale: 20 QEMUs x 25 usb-host devices, observe time and idle CPU.

Numbers are printed (run with -s); bench/bench_qmp.py prints more of them.
The bounds asserted are loose: the host is shared and has two cores.
"""

from __future__ import annotations

import asyncio
import resource
import time

import pytest

from tests.support.qemu_proc import QemuFactory
from vmplug.vms.qmp import QmpVm

pytestmark = pytest.mark.qemu

N_VMS, N_DEVICES = 20, 25


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _args(vm: int) -> list[str]:
    args = ["-device", "qemu-xhci,id=xhci"]
    for d in range(N_DEVICES):
        dev = f"usb-host,id=vmplug-{vm:06x}{d:06x},vendorid=0x1235,productid=0x{d + 1:04x}"
        args += ["-device", dev]
    return args


async def test_twenty_vms_observe_and_idle(qemu: QemuFactory) -> None:
    procs = [qemu(extra_args=_args(i)) for i in range(N_VMS)]
    for proc in procs:
        proc.start()
    vms = [QmpVm(f"vm{i}", p.qmp_path) for i, p in enumerate(procs)]
    try:
        for vm in vms:
            await vm.start()
        assert all(await asyncio.gather(*(vm.wait_connected(10) for vm in vms)))

        t0 = time.perf_counter()
        seen = await asyncio.gather(*(vm.observe() for vm in vms))
        cold = time.perf_counter() - t0
        assert sum(len(s) for s in seen) == N_VMS * N_DEVICES

        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = await asyncio.gather(*(vm.observe() for vm in vms))
            warm.append(time.perf_counter() - t0)
            assert again == seen

        c0, t0 = _cpu(), time.perf_counter()
        await asyncio.sleep(3)
        idle_cpu, idle_wall = _cpu() - c0, time.perf_counter() - t0
        print(
            f"\n{N_VMS} VMs x {N_DEVICES} devices: observe cold {cold * 1e3:.0f} ms, "
            f"warm {min(warm) * 1e3:.0f}-{max(warm) * 1e3:.0f} ms; "
            f"idle {idle_cpu * 1e3:.1f} ms CPU in {idle_wall:.1f} s"
        )
        assert min(warm) < 1.0
        assert idle_cpu / idle_wall < 0.01
        assert all(vm.connected for vm in vms)
    finally:
        for vm in vms:
            await vm.stop()
