"""Windows guest data: ``Get-PnpDevice`` JSON and problem codes, ``powercfg`` output.

Problem codes are Configuration Manager's ``CM_PROB_*`` values (``Cfg.h``),
as Microsoft's "Device Manager error messages" page lists them
(https://learn.microsoft.com/windows-hardware/drivers/install/device-manager-error-messages).
``Get-PnpDevice`` returns ``Win32_PnPEntity`` instances
(https://learn.microsoft.com/windows/win32/cimwin32prov/win32-pnpentity) with
PowerShell's added ``Class``, ``FriendlyName``, ``InstanceId``, ``Problem``
and ``Present``; ``ConfigManagerErrorCode`` is the same code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: code -> (CM_PROB name, what Device Manager says it means)
PROBLEM_CODES: dict[int, tuple[str, str]] = {
    1: ("CM_PROB_NOT_CONFIGURED", "This device is not configured correctly."),
    3: (
        "CM_PROB_OUT_OF_MEMORY",
        "The driver for this device might be corrupted, or the system may be low on memory "
        "or other resources.",
    ),
    9: (
        "CM_PROB_INVALID_DATA",
        "Windows cannot identify this hardware because it does not have a valid hardware "
        "identification number.",
    ),
    10: ("CM_PROB_FAILED_START", "This device cannot start."),
    12: (
        "CM_PROB_NORMAL_CONFLICT",
        "This device cannot find enough free resources that it can use.",
    ),
    14: (
        "CM_PROB_NEED_RESTART",
        "This device cannot work properly until you restart your computer.",
    ),
    16: ("CM_PROB_PARTIAL_LOG_CONF", "Windows cannot identify all the resources this device uses."),
    18: ("CM_PROB_REINSTALL", "Reinstall the drivers for this device."),
    19: (
        "CM_PROB_REGISTRY",
        "Windows cannot start this hardware device because its configuration information "
        "(in the registry) is incomplete or damaged.",
    ),
    21: ("CM_PROB_WILL_BE_REMOVED", "Windows is removing this device."),
    22: ("CM_PROB_DISABLED", "This device is disabled."),
    24: (
        "CM_PROB_DEVICE_NOT_THERE",
        "This device is not present, is not working properly, or does not have all its "
        "drivers installed.",
    ),
    28: ("CM_PROB_FAILED_INSTALL", "The drivers for this device are not installed."),
    29: (
        "CM_PROB_HARDWARE_DISABLED",
        "This device is disabled because the firmware of the device did not give it the "
        "required resources.",
    ),
    31: (
        "CM_PROB_FAILED_ADD",
        "This device is not working properly because Windows cannot load the drivers "
        "required for this device.",
    ),
    32: (
        "CM_PROB_DISABLED_SERVICE",
        "A driver (service) for this device has been disabled.",
    ),
    33: (
        "CM_PROB_TRANSLATION_FAILED",
        "Windows cannot determine which resources are required for this device.",
    ),
    34: ("CM_PROB_NO_SOFTCONFIG", "Windows cannot determine the settings for this device."),
    35: (
        "CM_PROB_BIOS_TABLE",
        "The computer's system firmware does not include enough information to properly "
        "configure and use this device.",
    ),
    36: (
        "CM_PROB_IRQ_TRANSLATION_FAILED",
        "This device is requesting a PCI interrupt but is configured for an ISA interrupt "
        "(or vice versa).",
    ),
    37: (
        "CM_PROB_FAILED_DRIVER_ENTRY",
        "Windows cannot initialize the device driver for this hardware.",
    ),
    38: (
        "CM_PROB_DRIVER_FAILED_PRIOR_UNLOAD",
        "Windows cannot load the device driver for this hardware because a previous "
        "instance of the driver is still in memory.",
    ),
    39: (
        "CM_PROB_DRIVER_FAILED_LOAD",
        "Windows cannot load the device driver for this hardware. The driver may be "
        "corrupted or missing.",
    ),
    40: (
        "CM_PROB_DRIVER_SERVICE_KEY_INVALID",
        "Windows cannot access this hardware because its service key information in the "
        "registry is missing or recorded incorrectly.",
    ),
    41: (
        "CM_PROB_LEGACY_SERVICE_NO_DEVICES",
        "Windows successfully loaded the device driver for this hardware but cannot find "
        "the hardware device.",
    ),
    42: (
        "CM_PROB_DUPLICATE_DEVICE",
        "Windows cannot load the device driver for this hardware because there is a "
        "duplicate device already running in the system.",
    ),
    43: (
        "CM_PROB_FAILED_POST_START",
        "Windows has stopped this device because it has reported problems.",
    ),
    44: ("CM_PROB_HALTED", "An application or service has shut down this hardware device."),
    45: ("CM_PROB_PHANTOM", "Currently, this hardware device is not connected to the computer."),
    46: (
        "CM_PROB_SYSTEM_SHUTDOWN",
        "Windows cannot gain access to this hardware device because the operating system is "
        "in the process of shutting down.",
    ),
    47: (
        "CM_PROB_HELD_FOR_EJECT",
        "Windows cannot use this hardware device because it has been prepared for safe "
        "removal, but it has not been removed from the computer.",
    ),
    48: (
        "CM_PROB_DRIVER_BLOCKED",
        "The software for this device has been blocked from starting because it is known to "
        "have problems with Windows.",
    ),
    49: (
        "CM_PROB_REGISTRY_TOO_LARGE",
        "Windows cannot start new hardware devices because the system hive is too large.",
    ),
    50: (
        "CM_PROB_SETPROPERTIES_FAILED",
        "Windows cannot apply all of the properties for this device.",
    ),
    51: (
        "CM_PROB_WAITING_ON_DEPENDENCY",
        "This device is currently waiting on another device or set of devices to start.",
    ),
    52: (
        "CM_PROB_UNSIGNED_DRIVER",
        "Windows cannot verify the digital signature for the drivers required for this device.",
    ),
    53: (
        "CM_PROB_USED_BY_DEBUGGER",
        "This device has been reserved for use by the Windows kernel debugger for the "
        "duration of this boot session.",
    ),
    54: ("CM_PROB_DEVICE_RESET", "This device has failed and is undergoing a reset."),
    55: ("CM_PROB_CONSOLE_LOCKED", "The device cannot start while the console is locked."),
    56: (
        "CM_PROB_NEED_CLASS_CONFIG",
        "Windows is still setting up the class configuration for this device.",
    ),
    57: ("CM_PROB_GUEST_ASSIGNMENT_FAILED", "The device could not be assigned to the guest."),
}
_BY_NAME = {name: code for code, (name, _) in PROBLEM_CODES.items()}

#: What a pass-through user should do for the codes that come up with USB devices.
ADVICE: dict[int, str] = {
    10: "the device did not start in the guest: check the host layer for USB errors "
    "(descriptor read, resets), a USB 2 device on a USB 1.1 controller, or a missing "
    "vendor driver in Windows",
    28: "install the device's Windows driver (the vendor's installer) in the guest",
    43: "Windows stopped it after it reported problems: often a reset loop through "
    "pass-through; keep host autosuspend off and use a qemu-xhci controller",
    45: "Windows remembers it but it is not connected: QEMU does not hold the device "
    "(see the qemu layer: attached or waiting)",
}

#: The PowerShell the doctor runs through guest-exec (one line, no profile).
PNP_COMMAND = (
    "Get-PnpDevice | Where-Object { $_.InstanceId -like 'USB*' -or $_.Class -in "
    "@('USB','MEDIA','AudioEndpoint','HIDClass') } | Select-Object Status,Class,"
    "FriendlyName,InstanceId,Problem,ConfigManagerErrorCode,Present | ConvertTo-Json -Depth 2"
)
#: USB selective suspend setting of the active power plan (subgroup USB settings).
POWERCFG_ARGS = [
    "/QUERY",
    "SCHEME_CURRENT",
    "2a737441-1930-4402-8d77-b2bebba308a3",
    "48e6b7a6-50f5-4782-a5d4-53bb8f07e226",
]


@dataclass(frozen=True)
class PnpDevice:
    instance_id: str
    name: str
    cls: str | None
    status: str | None
    present: bool | None
    problem: int

    @property
    def problem_name(self) -> str:
        return PROBLEM_CODES.get(self.problem, (f"CM_PROB code {self.problem}", ""))[0]

    @property
    def problem_text(self) -> str:
        return PROBLEM_CODES.get(self.problem, ("", "a problem code Windows did not document"))[1]


def _code(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if text in _BY_NAME:
        return _BY_NAME[text]
    if text.startswith("CM_PROB_") and text[8:] in {n[8:] for n in _BY_NAME}:
        return _BY_NAME[text]
    return None


def parse_pnp_json(text: str) -> list[PnpDevice]:
    """``Get-PnpDevice | Select … | ConvertTo-Json``: one object or a list of them."""
    text = text.strip().lstrip("\ufeff")
    if not text:
        return []
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    out: list[PnpDevice] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        code = _code(item.get("ConfigManagerErrorCode"))
        if code is None:
            code = _code(item.get("Problem")) or 0
        present = item.get("Present")
        out.append(
            PnpDevice(
                instance_id=str(item.get("InstanceId") or item.get("DeviceID") or "?"),
                name=str(item.get("FriendlyName") or item.get("Name") or "?"),
                cls=item.get("Class") or item.get("PNPClass"),
                status=item.get("Status"),
                present=present if isinstance(present, bool) else None,
                problem=code,
            )
        )
    return out


def usb_ids(instance_id: str) -> str | None:
    """``USB\\VID_1235&PID_821A\\…`` -> ``1235:821a``."""
    m = re.search(r"VID_([0-9A-Fa-f]{4})&PID_([0-9A-Fa-f]{4})", instance_id)
    return f"{m.group(1).lower()}:{m.group(2).lower()}" if m else None


def parse_selective_suspend(text: str) -> tuple[int, int] | None:
    """(AC, DC) setting index from ``powercfg /QUERY`` (1 = enabled), or None.

    The labels are localized; the two hex values ending the setting's block are not.
    """
    values = re.findall(r":\s*0x([0-9a-fA-F]{8})\s*$", text, flags=re.MULTILINE)
    if len(values) < 2:
        return None
    return int(values[-2], 16), int(values[-1], 16)


# ---------------------------------------------------------------- services (Get-Service)

#: Services of the guest additions the doctor looks at: name -> what it is.
SERVICES: dict[str, str] = {
    "QEMU-GA": "QEMU Guest Agent (virtio-win guest tools)",
    "spice-agent": "SPICE agent (spice-guest-tools / spice-vdagent-win)",
    "vdservice": "SPICE agent service of older spice-guest-tools (RHEV Spice Agent)",
}
#: The PowerShell the doctor runs for them (one line, no profile).
SERVICE_COMMAND = (
    "Get-Service -Name "
    + ",".join(f"'{n}'" for n in SERVICES)
    + " -ErrorAction SilentlyContinue | Select-Object Name,DisplayName,Status,StartType"
    " | ConvertTo-Json"
)
#: System.ServiceProcess.ServiceControllerStatus: ConvertTo-Json writes the number.
SERVICE_STATUS = {
    1: "Stopped",
    2: "StartPending",
    3: "StopPending",
    4: "Running",
    5: "ContinuePending",
    6: "PausePending",
    7: "Paused",
}
#: System.ServiceProcess.ServiceStartMode.
START_MODE = {0: "Boot", 1: "System", 2: "Automatic", 3: "Manual", 4: "Disabled"}


@dataclass(frozen=True)
class WinService:
    name: str
    display: str
    status: str
    start: str


def _enum(value: Any, table: dict[int, str]) -> str:
    if isinstance(value, bool) or value is None:
        return "?"
    if isinstance(value, int):
        return table.get(value, str(value))
    return str(value)


def _items(text: str) -> list[dict[str, Any]]:
    text = text.strip().lstrip("\ufeff")
    if not text:
        return []
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    return [i for i in items if isinstance(i, dict)]


def parse_services_json(text: str) -> list[WinService]:
    """``Get-Service … | Select-Object Name,DisplayName,Status,StartType |
    ConvertTo-Json``: enums as numbers (PowerShell 5.1 and 7) or names
    (``-EnumsAsStrings``); one object or a list."""
    return [
        WinService(
            name=str(i.get("Name") or "?"),
            display=str(i.get("DisplayName") or i.get("Name") or "?"),
            status=_enum(i.get("Status"), SERVICE_STATUS),
            start=_enum(i.get("StartType"), START_MODE),
        )
        for i in _items(text)
    ]


# ---------------------------------------------------------------- VirtIO and QEMU PCI devices

#: PCI ids of QEMU's paravirtual devices (virtio 1AF4, Red Hat 1B36) -> (what, Windows driver).
PCI_DEVICES: dict[tuple[int, int], tuple[str, str]] = {
    (0x1AF4, 0x1000): ("virtio-net (transitional)", "netkvm (virtio-win)"),
    (0x1AF4, 0x1041): ("virtio-net", "netkvm (virtio-win)"),
    (0x1AF4, 0x1001): ("virtio-blk (transitional)", "viostor (virtio-win)"),
    (0x1AF4, 0x1042): ("virtio-blk", "viostor (virtio-win)"),
    (0x1AF4, 0x1002): ("virtio-balloon (transitional)", "balloon (virtio-win)"),
    (0x1AF4, 0x1045): ("virtio-balloon", "balloon (virtio-win)"),
    (0x1AF4, 0x1003): ("virtio-serial (transitional)", "vioserial (virtio-win)"),
    (0x1AF4, 0x1043): ("virtio-serial", "vioserial (virtio-win)"),
    (0x1AF4, 0x1004): ("virtio-scsi (transitional)", "vioscsi (virtio-win)"),
    (0x1AF4, 0x1048): ("virtio-scsi", "vioscsi (virtio-win)"),
    (0x1AF4, 0x1005): ("virtio-rng (transitional)", "viorng (virtio-win)"),
    (0x1AF4, 0x1044): ("virtio-rng", "viorng (virtio-win)"),
    (0x1AF4, 0x1050): ("virtio-gpu", "viogpudo (virtio-win)"),
    (0x1AF4, 0x1052): ("virtio-input", "vioinput (virtio-win)"),
    (0x1AF4, 0x105A): ("virtio-fs", "viofs (virtio-win)"),
    (0x1B36, 0x000D): ("qemu-xhci USB controller", "USBXHCI (in the box since Windows 8)"),
    (0x1B36, 0x0100): ("qxl display", "qxldod (virtio-win)"),
}
#: Get-PnpDevice's filter for them (added to the USB one by the doctor).
VIRTIO_FILTER = "$_.InstanceId -like 'PCI\\VEN_1AF4*' -or $_.InstanceId -like 'PCI\\VEN_1B36*'"
VIRTIO_COMMAND = (
    f"Get-PnpDevice | Where-Object {{ {VIRTIO_FILTER} }} | Select-Object Status,Class,"
    "FriendlyName,InstanceId,Problem,ConfigManagerErrorCode,Present | ConvertTo-Json -Depth 2"
)


def pci_ids(instance_id: str) -> tuple[int, int] | None:
    """``PCI\\VEN_1AF4&DEV_1043&SUBSYS_…`` -> (0x1af4, 0x1043)."""
    m = re.match(r"PCI\\VEN_([0-9A-Fa-f]{4})&DEV_([0-9A-Fa-f]{4})", instance_id)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def virtio_advice(ids: tuple[int, int]) -> str:
    """The fix for a QEMU PCI device Windows has no working driver for."""
    what, driver = PCI_DEVICES.get(ids, (f"PCI {ids[0]:04x}:{ids[1]:04x}", "virtio-win"))
    if ids == (0x1B36, 0x000D):
        return (
            "Windows 7 has no xHCI driver: give the VM an EHCI controller instead "
            "(-device ich9-usb-ehci1,id=ehci, usb-host ...,bus=ehci.0) or install the "
            "vendor's xHCI driver; on Windows 8 and later reinstall the in-box USBXHCI driver "
            "(Device Manager -> Update driver -> Search automatically)"
        )
    serial = ids in ((0x1AF4, 0x1003), (0x1AF4, 0x1043))
    return (
        f"install the {driver} driver for {what}: run virtio-win-guest-tools.exe from the "
        "virtio-win ISO, or in an admin prompt\n"
        f"  pnputil /add-driver D:\\{driver.split()[0]}\\w10\\amd64\\*.inf /install   "
        "(D: = the virtio-win ISO; w11/2k22 ... for other versions)"
        + (
            "\nwithout it the guest agent's channel (org.qemu.guest_agent.0) does not exist"
            if serial
            else ""
        )
    )
