"""The VM side: the contract every backend meets (:mod:`vmplug.vms.base`), the
backends (QMP, Proxmox, container, libvirt) and the factory that picks one."""

from vmplug.vms.base import (
    ID_PREFIX,
    AttachSpec,
    Binding,
    ObservedDevice,
    OnVmEvent,
    UsbBus,
    UsbHostSpec,
    VmBackend,
    VmConfigError,
    VmDisconnected,
    VmError,
    VmEvent,
    VmEventKind,
    VmState,
    VmTimeout,
)

__all__ = [
    "ID_PREFIX",
    "AttachSpec",
    "Binding",
    "ObservedDevice",
    "OnVmEvent",
    "UsbBus",
    "UsbHostSpec",
    "VmBackend",
    "VmConfigError",
    "VmDisconnected",
    "VmError",
    "VmEvent",
    "VmEventKind",
    "VmState",
    "VmTimeout",
]
