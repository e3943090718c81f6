"""Doctor tests: real QEMU processes (via tests/qemu/qemu_proc.py), real sockets,
captured sysfs trees and kernel logs, Docker- and Microsoft-shaped documents."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "qemu"))

from qemu_proc import BASE_ARGS, QEMU, XHCI, QemuProcess, qemu_available

__all__ = ["BASE_ARGS", "QEMU", "XHCI", "QemuProcess", "qemu_available"]

FIXTURES = Path(__file__).parent.parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
DOCTOR = FIXTURES / "doctor"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if qemu_available():
        return
    skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed")
    for item in items:
        if item.get_closest_marker("qemu"):
            item.add_marker(skip)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Any]:
    """Make QEMU processes; every one is killed by PID at teardown."""
    made: list[QemuProcess] = []

    def make(extra_args: list[str], **kw: Any) -> QemuProcess:
        proc = QemuProcess(tmp_path, extra_args, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()
