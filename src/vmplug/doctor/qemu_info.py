# ruff: noqa: PTH117, PTH118
# (/proc, /dev and sysfs walks use plain os calls on string paths, like host/sysfs.py)
"""Find QEMU processes and read what they were told and what they hold.

Three sources, merged per VM:

* ``/proc/*/cmdline`` of ``qemu-system-*`` processes (:mod:`vmplug.wire.proc`
  scans and parses them): the command line says
  which USB controllers exist (``-device qemu-xhci``, ``-usb``), how each
  ``usb-host`` matches its device, and where the QMP and guest-agent sockets
  are (``-qmp unix:…``, ``-chardev socket,…`` + ``-mon``/``virtserialport``);
* QMP sockets from the config (``[vm.NAME] qmp``) or ``--qmp``;
* over QMP: ``qom-list /machine/peripheral`` (which ``usb-host`` devices
  exist, ``attached`` or waiting, their match properties) and ``query-pci``
  (the controllers, also for a QEMU inside a container we cannot see).

A socket of a process in another mount namespace (a container) is reached
through ``/proc/PID/root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.model import UsbDevice
from vmplug.wire.errors import WireError, WireTimeout
from vmplug.wire.proc import parse_args, scan_qemu
from vmplug.wire.qmp import SyncQmp

#: -device driver -> controller kind
CONTROLLER_KINDS = {
    "qemu-xhci": "xhci",
    "nec-usb-xhci": "xhci",
    "usb-ehci": "ehci",
    "ich9-usb-ehci1": "ehci",
    "ich9-usb-ehci2": "ehci",
    "piix3-usb-uhci": "uhci",
    "piix4-usb-uhci": "uhci",
    "vt82c686b-usb-uhci": "uhci",
    **{f"ich9-usb-uhci{i}": "uhci" for i in range(1, 7)},
    "pci-ohci": "ohci",
    "sysbus-ohci": "ohci",
}
#: query-pci vendor/device ids of QEMU's USB controllers -> (driver, kind)
PCI_CONTROLLERS = {
    (0x1B36, 0x000D): ("qemu-xhci", "xhci"),
    (0x1033, 0x0194): ("nec-usb-xhci", "xhci"),
    (0x8086, 0x24CD): ("usb-ehci", "ehci"),
    (0x8086, 0x293A): ("ich9-usb-ehci1", "ehci"),
    (0x8086, 0x293C): ("ich9-usb-ehci2", "ehci"),
    (0x8086, 0x7020): ("piix3-usb-uhci", "uhci"),
    (0x8086, 0x7112): ("piix4-usb-uhci", "uhci"),
    **{(0x8086, 0x2934 + i): (f"ich9-usb-uhci{i + 1}", "uhci") for i in range(6)},
    (0x106B, 0x003F): ("pci-ohci", "ohci"),
}
_MATCH_KEYS = ("hostbus", "hostaddr", "hostport", "hostdevice", "vendorid", "productid")


@dataclass(frozen=True, slots=True)
class UsbHostArg:
    """One ``usb-host`` device: from the command line or from QOM."""

    id: str | None
    props: dict[str, str] = field(hash=False)
    attached: bool | None = None  # None: unknown (no QMP)
    source: str = "cmdline"

    @property
    def ours(self) -> bool:
        return bool(self.id and self.id.startswith("vmplug-"))

    def match(self) -> dict[str, str]:
        return {k: v for k, v in self.props.items() if k in _MATCH_KEYS and v not in ("", "0")}

    def by_address(self) -> bool:
        m = self.match()
        return "hostaddr" in m or "hostdevice" in m

    def vidpid(self) -> tuple[int, int] | None:
        m = self.match()
        if "vendorid" in m and "productid" in m and not ({"hostbus", "hostport"} & set(m)):
            try:
                return int(m["vendorid"], 0), int(m["productid"], 0)
            except ValueError:
                return None
        return None

    def describe(self) -> str:
        m = ",".join(f"{k}={v}" for k, v in self.match().items()) or "(no match properties)"
        return f"usb-host{',id=' + self.id if self.id else ''},{m}"

    def matches(self, dev: UsbDevice) -> bool:
        """Would QEMU's usb-host with these properties take ``dev``?"""
        m = self.match()
        if not m or dev.is_root_hub:
            return False
        try:
            if "hostdevice" in m:
                parts = m["hostdevice"].rstrip("/").split("/")
                if dev.busnum != int(parts[-2], 10) or dev.devnum != int(parts[-1], 10):
                    return False
            if "hostbus" in m and dev.busnum != int(m["hostbus"], 0):
                return False
            if "hostaddr" in m and dev.devnum != int(m["hostaddr"], 0):
                return False
            if "hostport" in m and dev.port.partition("-")[2] != m["hostport"]:
                return False
            if "vendorid" in m and dev.vendor_id != int(m["vendorid"], 0):
                return False
            if "productid" in m and dev.product_id != int(m["productid"], 0):
                return False
        except (ValueError, IndexError):
            return False
        return True


@dataclass
class QemuInstance:
    """One VM as far as the doctor could see it."""

    name: str
    pid: int | None = None
    argv: list[str] = field(default_factory=list)
    source: str = "proc"
    machine: str | None = None
    usb_flag: bool = False
    controllers: list[tuple[str, str]] = field(default_factory=list)  # (driver, kind)
    usb_hosts: list[UsbHostArg] = field(default_factory=list)
    qmp_paths: list[str] = field(default_factory=list)
    qga_path: str | None = None
    #: the QMP monitor was handed over as a file descriptor (libvirt does this)
    monitor_fd: bool = False
    #: filled by :func:`query_qmp`
    qmp_used: str | None = None
    qmp_error: str | None = None
    qom_hosts: list[UsbHostArg] | None = None
    pci_controllers: list[tuple[str, str]] | None = None

    def controller_kinds(self) -> list[tuple[str, str]]:
        found = list(self.controllers)
        if self.pci_controllers is not None:
            known = {d for d, _ in found}
            found += [c for c in self.pci_controllers if c[0] not in known]
        if self.usb_flag and not any(k != "?" for _, k in found):
            found.append(machine_default_usb(self.machine))
        return found

    def hosts(self) -> list[UsbHostArg]:
        """QOM's view when we have it (it includes device_add'ed ones), else the cmdline's."""
        return self.qom_hosts if self.qom_hosts is not None else self.usb_hosts


def machine_default_usb(machine: str | None) -> tuple[str, str]:
    """What ``-usb`` (``machine usb=on``) creates on x86 machine types."""
    m = (machine or "pc").lower()
    if "q35" in m:
        return ("ich9-usb-ehci1 (-usb)", "ehci")
    if m.startswith("pc") or "i440fx" in m:
        return ("piix3-usb-uhci (-usb)", "uhci")
    return (f"machine {m} default (-usb)", "?")


def parse_cmdline(argv: list[str], cwd: str | None = None) -> QemuInstance:
    """What a QEMU command line says about USB, QMP and the guest agent."""
    args = parse_args(argv[1:])
    inst = QemuInstance(name=args.name or "?", argv=list(argv))
    inst.machine = args.machine
    inst.usb_flag = args.usb_flag
    for props in args.devices:
        drv = props.get("driver", "")
        if drv in CONTROLLER_KINDS:
            inst.controllers.append((drv, CONTROLLER_KINDS[drv]))
        elif drv == "usb-host":
            inst.usb_hosts.append(UsbHostArg(props.get("id"), props))
    inst.qmp_paths = [_abs(p, cwd) for p in args.qmp_paths]
    inst.monitor_fd = args.monitor_fd
    if args.qga_path:
        inst.qga_path = _abs(args.qga_path, cwd)
    return inst


def _abs(path: str, cwd: str | None) -> str:
    return path if os.path.isabs(path) or cwd is None else os.path.join(cwd, path)


def find_processes(proc_root: Path) -> list[QemuInstance]:
    """Every QEMU process under ``proc_root`` with its command line parsed
    (:func:`vmplug.wire.proc.scan_qemu`); a socket inside a container's mount
    namespace is reached through ``/proc/PID/root``."""
    out: list[QemuInstance] = []
    for proc in scan_qemu(proc_root):
        inst = parse_cmdline(list(proc.argv), proc.cwd)
        inst.pid = proc.pid
        inst.source = proc.source
        if inst.name == "?":
            inst.name = f"pid {proc.pid}"
        inst.qmp_paths = [proc.reach(p) or p for p in inst.qmp_paths]
        if inst.qga_path:
            inst.qga_path = proc.reach(inst.qga_path) or inst.qga_path
        out.append(inst)
    return out


def query_qmp(inst: QemuInstance, timeout: float) -> None:
    """Fill ``qom_hosts`` and ``pci_controllers`` from the first QMP socket that answers.

    A QMP socket serves one client at a time: one that another client holds
    (vmplug's daemon, libvirt) does not greet us before ``timeout``.
    """
    errors: list[str] = []
    for path in inst.qmp_paths:
        try:
            client = SyncQmp(path, timeout, name="doctor")
        except WireError as exc:
            errors.append(f"{path}: {_why(exc)}")
            continue
        try:
            inst.qom_hosts = _qom_hosts(client, timeout)
            inst.pci_controllers = _pci_controllers(client, timeout)
            inst.qmp_used = path
            inst.qmp_error = None
            return
        except (WireError, ValueError, KeyError, TypeError) as exc:
            errors.append(f"{path}: {_why(exc)}")
        finally:
            client.close()
    inst.qmp_error = "; ".join(errors) if errors else "no QMP socket on its command line"


def _why(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, WireError) and exc.address:
        text = text.removeprefix(f"{exc.address}: ")
    if isinstance(exc, WireTimeout):
        return text + " (the socket is busy: a QMP socket serves one client at a time)"
    return text


def _qom_hosts(client: SyncQmp, timeout: float) -> list[UsbHostArg]:
    out: list[UsbHostArg] = []
    items = client.execute("qom-list", {"path": "/machine/peripheral"}, timeout=timeout) or []
    for item in items:
        if item.get("type") != "child<usb-host>":
            continue
        path = f"/machine/peripheral/{item['name']}"
        props: dict[str, str] = {"driver": "usb-host"}
        for key in _MATCH_KEYS:
            try:
                value = client.execute("qom-get", {"path": path, "property": key}, timeout=timeout)
            except Exception:  # noqa: S112 - an older QEMU lacks the property: skip it
                continue
            if value in (None, "", 0):
                continue  # QOM says 0 / "" for a property that was not set
            if isinstance(value, int) and key in ("vendorid", "productid"):
                props[key] = f"0x{value:04x}"
            else:
                props[key] = str(value)
        attached = bool(
            client.execute("qom-get", {"path": path, "property": "attached"}, timeout=timeout)
        )
        out.append(UsbHostArg(item["name"], props, attached=attached, source="qom"))
    return out


def _pci_controllers(client: SyncQmp, timeout: float) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            if d.get("class_info", {}).get("class") == 0x0C03:
                ids = d.get("id", {})
                key = (int(ids.get("vendor", 0)), int(ids.get("device", 0)))
                out.append(PCI_CONTROLLERS.get(key, (f"pci {key[0]:04x}:{key[1]:04x}", "?")))
            bridge = d.get("pci_bridge", {})
            walk(bridge.get("devices", []))

    for bus in client.execute("query-pci", timeout=timeout) or []:
        walk(bus.get("devices", []))
    return out
