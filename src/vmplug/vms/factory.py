"""Which backend drives a configured VM: the one place that knows every kind.

Each branch assigns a concrete backend to a :class:`~vmplug.vms.base.VmBackend`
variable, so mypy checks here that every kind meets the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from vmplug.config import VmConfig
from vmplug.vms.base import OnVmEvent, VmBackend, VmDisconnected, VmEvent

#: How the daemon gets a backend for a configured VM (tests and benches inject their own).
VmFactory = Callable[[VmConfig, OnVmEvent], VmBackend]


def make_backend(vm: VmConfig, on_change: OnVmEvent) -> VmBackend:
    """A backend for ``vm`` by its kind (qmp, libvirt, container, proxmox);
    ``on_change`` hears a :class:`~vmplug.vms.base.VmEvent` for what happens to it."""
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


#: The daemon's default :data:`VmFactory`.
default_vm_factory: VmFactory = make_backend


def _ignore(_event: VmEvent) -> None:
    """A one-shot command acts and leaves: nothing listens to the VM meanwhile."""


@contextlib.asynccontextmanager
async def one_shot(vm: VmConfig, timeout: float = 10.0) -> AsyncIterator[VmBackend]:
    """A started backend for one operation without the daemon (``vmplug attach``
    when no daemon runs), reachable or a :class:`~vmplug.vms.base.VmDisconnected`;
    stopped on exit.  A QMP socket is used per operation (shared), as the daemon
    may start at any moment and wants it."""
    config = dataclasses.replace(vm, shared=True) if vm.kind == "qmp" else vm
    backend = make_backend(config, _ignore)
    await backend.start()
    try:
        if not await backend.wait_connected(timeout):
            why = getattr(backend, "error", None) or f"{vm.where} did not answer in {timeout:g} s"
            raise VmDisconnected(vm.name, why)
        yield backend
    finally:
        await backend.stop()
