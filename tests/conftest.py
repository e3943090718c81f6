"""Fixtures and hooks more than one test directory uses.

Directory-specific fixtures stay in that directory's conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.qemu_proc import XHCI, QemuFactory, QemuProcess, qemu_available

if TYPE_CHECKING:
    from tests.support.apirig import ApiRig


#: The lab proofs that take more than 10 minutes on 2 cores (real Docker and
#: Podman in the lab guest, a second guest for remote devices) stay out of the
#: default run, which must stay under 30 minutes: VMPLUG_LONG_LAB=1 runs them.
LONG_LAB = os.environ.get("VMPLUG_LONG_LAB") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not LONG_LAB:
        long = pytest.mark.skip(reason="a lab proof of over 10 minutes: VMPLUG_LONG_LAB=1 runs it")
        for item in items:
            if item.get_closest_marker("long_lab"):
                item.add_marker(long)
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
async def rig(tmp_path: Path) -> AsyncIterator[ApiRig]:
    """A daemon with its API and real QEMU VMs (tests/api, tests/web).

    Not started: ``await rig.up()``.  Everything is stopped at teardown.
    """
    from tests.support.apirig import ApiRig  # noqa: PLC0415 - only the API tests pay for it

    r = ApiRig(tmp_path)
    try:
        yield r
    finally:
        await r.close()
