"""Fixtures for tests that run real QEMU processes (marker ``qemu``); the ``qemu``
fixture itself is tests/conftest.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from vmplug.vms.qmp import QmpVm


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
