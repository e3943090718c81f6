"""Fixtures for tests that run real QEMU processes (marker ``qemu``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu_proc import XHCI, QemuProcess, qemu_available

from vmplug.vms.qmp import QmpVm

QemuFactory = Callable[..., QemuProcess]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if qemu_available():
        return
    skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed")
    for item in items:
        if item.get_closest_marker("qemu"):
            item.add_marker(skip)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuFactory]:
    """Make QEMU processes: ``qemu(extra_args=[...], machine=..., qmp_sockets=2)``.

    Not started: call ``.start()``.  Every process made here is killed by PID
    and reaped at teardown, whatever the test did.
    """
    made: list[QemuProcess] = []

    def make(extra_args: Sequence[str] = XHCI, **kw: Any) -> QemuProcess:
        kw.setdefault("name", f"vm{len(made)}")
        proc = QemuProcess(tmp_path, extra_args, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()


@pytest.fixture
async def make_vm() -> AsyncIterator[Callable[..., QmpVm]]:
    """Make QmpVm objects (``make_vm(name, address, **kw)``); all stopped at teardown."""
    made: list[QmpVm] = []

    def make(name: str, address: str, **kw: Any) -> QmpVm:
        vm = QmpVm(name, address, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        await vm.stop()
