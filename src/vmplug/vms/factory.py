"""Which backend drives a configured VM: the one place that knows every kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmplug.config import VmConfig

if TYPE_CHECKING:
    from vmplug.engine.daemon import VmBackend


def make_backend(vm: VmConfig, on_change: Callable[[str, str], None]) -> VmBackend:
    """A backend for ``vm``; ``on_change(vm_name, reason)`` hears what happens to it."""
    from vmplug.vms.qmp import QmpVm  # noqa: PLC0415

    backend: VmBackend = QmpVm(
        vm.name,
        vm.qmp,
        shared=vm.shared,
        usb_bus=vm.usb_bus,
        add_controller=vm.add_controller,
        on_change=on_change,
    )
    return backend
