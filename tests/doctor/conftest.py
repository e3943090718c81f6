"""Doctor tests: real QEMU processes (tests/support/qemu_proc.py, the
``qemu`` fixture of tests/conftest.py), real sockets,
captured sysfs trees and kernel logs, Docker- and Microsoft-shaped documents."""

from __future__ import annotations

from pathlib import Path

from tests.support.qemu_proc import BASE_ARGS, QEMU, XHCI, QemuProcess, qemu_available

__all__ = ["BASE_ARGS", "QEMU", "XHCI", "QemuProcess", "qemu_available"]

FIXTURES = Path(__file__).parent.parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
DOCTOR = FIXTURES / "doctor"
