"""The VM side: QEMU over QMP (:mod:`vmplug.vms.qmp`) and backend-neutral types."""

from vmplug.vms.base import (
    ID_PREFIX,
    ObservedDevice,
    UsbBus,
    UsbHostSpec,
    VmConfigError,
    VmDisconnected,
    VmError,
    VmState,
    VmTimeout,
)

__all__ = [
    "ID_PREFIX",
    "ObservedDevice",
    "UsbBus",
    "UsbHostSpec",
    "VmConfigError",
    "VmDisconnected",
    "VmError",
    "VmState",
    "VmTimeout",
]
