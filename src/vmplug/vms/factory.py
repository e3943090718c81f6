"""Which backend drives a configured VM: the one place that knows every kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmplug.config import VmConfig

if TYPE_CHECKING:
    from vmplug.engine.daemon import VmBackend


def make_backend(vm: VmConfig, on_change: Callable[[str, str], None]) -> VmBackend:
    """A backend for ``vm`` by its kind (qmp, libvirt, container, proxmox);
    ``on_change(vm_name, reason)`` hears what happens to it."""
    backend: VmBackend
    kind = vm.kind
    if kind == "libvirt":
        from vmplug.vms.libvirt import LibvirtVm  # noqa: PLC0415

        backend = LibvirtVm(
            vm.name, vm.libvirt, uri=vm.uri, persist=vm.persist, on_change=on_change
        )
    elif kind == "container":
        from vmplug.vms.container import ContainerVm  # noqa: PLC0415

        backend = ContainerVm(
            vm.name,
            vm.container,
            uri=vm.uri,
            shared=vm.shared,
            usb_bus=vm.usb_bus,
            add_controller=vm.add_controller,
            on_change=on_change,
        )
    elif kind == "proxmox" and vm.proxmox is not None:
        from vmplug.vms.proxmox import ProxmoxVm  # noqa: PLC0415

        backend = ProxmoxVm(
            vm.name,
            vm.proxmox,
            usb_bus=vm.usb_bus,
            add_controller=vm.add_controller,
            on_change=on_change,
        )
    else:
        from vmplug.vms.qmp import QmpVm  # noqa: PLC0415

        backend = QmpVm(
            vm.name,
            vm.qmp,
            shared=vm.shared,
            usb_bus=vm.usb_bus,
            add_controller=vm.add_controller,
            on_change=on_change,
        )
    return backend
