"""Which backend drives a configured VM: the one place that knows every kind."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
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


@contextlib.asynccontextmanager
async def one_shot(vm: VmConfig, timeout: float = 10.0) -> AsyncIterator[VmBackend]:
    """A started backend for one operation without the daemon (``vmplug attach``
    when no daemon runs), reachable or a :class:`~vmplug.vms.base.VmDisconnected`;
    stopped on exit.  A QMP socket is used per operation (shared), as the daemon
    may start at any moment and wants it."""
    from vmplug.vms.base import VmDisconnected  # noqa: PLC0415

    config = dataclasses.replace(vm, shared=True) if vm.kind == "qmp" else vm
    backend = make_backend(config, lambda _vm, _reason: None)
    await backend.start()
    try:
        wait = getattr(backend, "wait_connected", None)
        if wait is not None and not await wait(timeout):
            why = getattr(backend, "error", None) or f"{vm.where} did not answer in {timeout:g} s"
            raise VmDisconnected(vm.name, why)
        yield backend
    finally:
        await backend.stop()
