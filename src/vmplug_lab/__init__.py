"""vmplug_lab: a throwaway Linux guest under QEMU/TCG with emulated USB devices.

Used by the lab tests, by ``python -m vmplug_lab.capture_all`` (re-makes the
sysfs fixtures) and later by ``vmplug demo``.  See :mod:`vmplug_lab.guest`.
"""

from vmplug_lab.guest import (
    GuestProcess,
    LabDevice,
    LabError,
    LabGuest,
    LabUnavailable,
    RunResult,
    find_kernel,
    lab_unavailable_reason,
)
from vmplug_lab.topologies import TOPOLOGIES

__all__ = [
    "TOPOLOGIES",
    "GuestProcess",
    "LabDevice",
    "LabError",
    "LabGuest",
    "LabUnavailable",
    "RunResult",
    "find_kernel",
    "lab_unavailable_reason",
]
