# ruff: noqa: PTH110, PTH115, PTH117, PTH118, PTH119, PTH208
# (/proc, /dev and sysfs walks use plain os calls on string paths, like host/sysfs.py)
"""Find QEMU processes and read what they were told and what they hold.

Three sources, merged per VM:

* ``/proc/*/cmdline`` of ``qemu-system-*`` processes: the command line says
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

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.model import UsbDevice

QGA_PORT_NAME = "org.qemu.guest_agent.0"
_QEMU_BIN = re.compile(r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm|kvm)$")

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
#: Options whose value we read; every other option's value is skipped as a word.
_WITH_VALUE = {"-device", "-M", "-machine", "-qmp", "-qmp-pretty", "-chardev", "-mon", "-name"}
_MATCH_KEYS = ("hostbus", "hostaddr", "hostport", "hostdevice", "vendorid", "productid")


def split_opts(text: str) -> list[str]:
    """QemuOpts items: split on ``,``, where ``,,`` is a literal comma."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def _json_opts(text: str) -> dict[str, str]:
    """A JSON ``-device`` (libvirt writes them so): values as QemuOpts would spell them."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            out[key] = "on" if value else "off"
        elif isinstance(value, int) and key in ("vendorid", "productid"):
            out[key] = f"0x{value:04x}"
        else:
            out[key] = str(value)
    return out


def parse_opts(text: str, implied: str) -> dict[str, str]:
    """``driver,k=v,flag`` -> {implied: driver, k: v, flag: "on"}."""
    out: dict[str, str] = {}
    for n, item in enumerate(split_opts(text)):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if n == 0:
                out[implied] = item
            else:
                out[item.removeprefix("no")] = "off" if item.startswith("no") else "on"
            continue
        out[key] = value
    return out


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
    inst = QemuInstance(name="?", argv=list(argv))
    chardevs: dict[str, dict[str, str]] = {}
    mons: list[dict[str, str]] = []
    serialports: list[dict[str, str]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in _WITH_VALUE and i + 1 < len(argv):
            val = argv[i + 1]
            i += 2
            if opt == "-device":
                props = _json_opts(val) if val.startswith("{") else parse_opts(val, "driver")
                drv = props.get("driver", "")
                if drv in CONTROLLER_KINDS:
                    inst.controllers.append((drv, CONTROLLER_KINDS[drv]))
                elif drv == "usb-host":
                    inst.usb_hosts.append(UsbHostArg(props.get("id"), props))
                elif drv == "virtserialport":
                    serialports.append(props)
            elif opt in ("-M", "-machine"):
                props = parse_opts(val, "type")
                inst.machine = props.get("type", inst.machine)
                if props.get("usb") in ("on", "yes", "true"):
                    inst.usb_flag = True
            elif opt in ("-qmp", "-qmp-pretty"):
                if val.startswith("unix:"):
                    inst.qmp_paths.append(_abs(split_opts(val[5:])[0], cwd))
            elif opt == "-chardev":
                props = parse_opts(val, "backend")
                if "id" in props:
                    chardevs[props["id"]] = props
            elif opt == "-mon":
                mons.append(parse_opts(val, "chardev"))
            elif opt == "-name":
                inst.name = parse_opts(val, "guest").get("guest", inst.name)
            continue
        if opt == "-usb":
            inst.usb_flag = True
        i += 1
    for mon in mons:
        cd = chardevs.get(mon.get("chardev", ""))
        if mon.get("mode") != "control" or not cd or cd.get("backend") != "socket":
            continue
        if "path" in cd:
            inst.qmp_paths.append(_abs(cd["path"], cwd))
        elif "fd" in cd:
            inst.monitor_fd = True  # libvirt passes its monitor socket as a descriptor
    for port in serialports:
        cd = chardevs.get(port.get("chardev", ""))
        if port.get("name") == QGA_PORT_NAME and cd and "path" in cd:
            inst.qga_path = _abs(cd["path"], cwd)
    return inst


def _abs(path: str, cwd: str | None) -> str:
    return path if os.path.isabs(path) or cwd is None else os.path.join(cwd, path)


def find_processes(proc_root: Path) -> list[QemuInstance]:
    """Every QEMU process under ``proc_root`` with its command line parsed."""
    out: list[QemuInstance] = []
    try:
        pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
    except OSError:
        return out
    for pid in pids:
        try:
            raw = (proc_root / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
        if not argv or not _QEMU_BIN.match(os.path.basename(argv[0])):
            continue
        cwd = None
        with contextlib.suppress(OSError):
            cwd = os.readlink(proc_root / str(pid) / "cwd")
        inst = parse_cmdline(argv, cwd)
        inst.pid = pid
        inst.source = f"{proc_root}/{pid}/cmdline"
        if inst.name == "?":
            inst.name = f"pid {pid}"
        # a socket inside a container's mount namespace: reach it through /proc/PID/root
        inst.qmp_paths = [reachable(p, proc_root, pid) for p in inst.qmp_paths]
        if inst.qga_path:
            inst.qga_path = reachable(inst.qga_path, proc_root, pid)
        out.append(inst)
    return out


def reachable(path: str, proc_root: Path, pid: int) -> str:
    if os.path.exists(path):
        return path
    inside = f"{proc_root}/{pid}/root{path}"
    return inside if os.path.exists(inside) else path


class QmpProbeError(RuntimeError):
    """QMP answered with an error, or not in time."""


class QmpProbe:
    """A short synchronous QMP session: greeting, capabilities, a few queries.

    The doctor asks a handful of questions and leaves; the daemon's
    long-lived client (:mod:`vmplug.vms.qmp`) is asyncio and event-driven.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._n = 0
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QmpProbeError(f"{path}: not a QMP greeting")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpProbeError(f"{self.path}: timed out waiting for QMP")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise QmpProbeError(f"{self.path}: QEMU closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpProbeError(f"{self.path}: unexpected QMP message {msg!r}")
        return msg

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        self._n += 1
        tag = f"doctor-{self._n}"
        req: dict[str, Any] = {"execute": command, "id": tag}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._message(deadline)
            if msg.get("id") != tag:
                continue  # an event
            if "error" in msg:
                err = msg["error"]
                raise QmpProbeError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")


def query_qmp(inst: QemuInstance, timeout: float) -> None:
    """Fill ``qom_hosts`` and ``pci_controllers`` from the first QMP socket that answers.

    A QMP socket serves one client at a time: one that another client holds
    (vmplug's daemon, libvirt) does not greet us before ``timeout``.
    """
    errors: list[str] = []
    for path in inst.qmp_paths:
        try:
            client = QmpProbe(path, timeout)
        except (OSError, QmpProbeError) as exc:
            errors.append(f"{path}: {_why(exc)}")
            continue
        try:
            inst.qom_hosts = _qom_hosts(client, timeout)
            inst.pci_controllers = _pci_controllers(client, timeout)
            inst.qmp_used = path
            inst.qmp_error = None
            return
        except (OSError, QmpProbeError, ValueError, KeyError, TypeError) as exc:
            errors.append(f"{path}: {_why(exc)}")
        finally:
            client.close()
    inst.qmp_error = "; ".join(errors) if errors else "no QMP socket on its command line"


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if "timed out" in text:
        return text + " (the socket is busy: a QMP socket serves one client at a time)"
    return text


def _qom_hosts(client: Any, timeout: float) -> list[UsbHostArg]:
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


def _pci_controllers(client: Any, timeout: float) -> list[tuple[str, str]]:
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
