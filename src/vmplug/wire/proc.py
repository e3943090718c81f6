# ruff: noqa: PTH115, PTH117, PTH118, PTH119, PTH208
# (/proc walks use plain os calls on string paths, like host/sysfs.py)
"""QEMU processes in ``/proc`` and what their command lines say.

One scan (:func:`scan_qemu`) and one parser (:func:`parse_args`) for every
reader: ``vmplug vms`` and ``init`` (discover), the doctor, the container
backend (a container's ``ARGUMENTS``).  The parser reads the options vmplug
cares about -- ``-qmp``/``-qmp-pretty``, ``-chardev`` + ``-mon``, ``-device``
(QemuOpts or libvirt's JSON), ``-name``, ``-machine``/``-M``, ``-usb``,
``-spice`` -- and steps over the values of the others it knows, so a
kernel command line after ``-append`` is never read as options.  It accepts
``-opt value``, ``--opt value`` and ``-opt=value``.

QemuOpts values split on ``,`` where ``,,`` is a literal comma.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

#: the guest agent's virtio-serial port name
QGA_PORT_NAME = "org.qemu.guest_agent.0"
_QEMU_BIN = re.compile(r"^(qemu-system-[A-Za-z0-9_.-]+|qemu-kvm[A-Za-z0-9_.-]*|kvm)$")
#: options whose value this parser reads
_READ = {
    "device",
    "M",
    "machine",
    "qmp",
    "qmp-pretty",
    "chardev",
    "mon",
    "name",
    "spice",
}
#: other options that take a value (stepped over, so the value is never an option)
_SKIP = {
    "accel", "append", "bios", "blockdev", "boot", "cpu", "D", "d", "display", "drive",
    "dtb", "fsdev", "global", "incoming", "initrd", "k", "kernel", "L", "m", "mem-path",
    "monitor", "netdev", "nic", "numa", "object", "parallel", "pidfile", "rtc", "runas",
    "sandbox", "serial", "smbios", "smp", "trace", "usbdevice", "uuid", "vga", "vnc",
    "watchdog-action", "audiodev", "iscsi", "overcommit", "msg", "action", "fw_cfg",
    "add-fd", "set", "virtfs", "chroot", "plugin", "semihosting-config", "icount",
}  # fmt: skip


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


def parse_opts(text: str, implied: str) -> dict[str, str]:
    """``driver,k=v,flag`` -> {implied: driver, k: v, flag: "on"} (``noflag``: "off")."""
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


def json_opts(text: str) -> dict[str, str]:
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


def device_opts(text: str) -> dict[str, str]:
    """A ``-device`` value in either spelling, ``driver`` as a key."""
    return json_opts(text) if text.startswith("{") else parse_opts(text, "driver")


def unix_path(value: str) -> str | None:
    """The unix socket path of a ``-qmp`` value (``unix:PATH,server=on``; also
    ``socket,path=PATH``), or None (tcp, stdio, a descriptor...)."""
    if value.startswith("unix:"):
        return split_opts(value[5:])[0] or None
    props = parse_opts(value, "backend")
    if props.get("backend") == "socket":
        return props.get("path") or None
    return None


def split_arguments(text: str) -> list[str]:
    """dockurr's ``ARGUMENTS``: its entry script expands the variable unquoted,
    so the shell splits it on white space and honours no quotes."""
    return text.split()


@dataclass
class QemuArgv:
    """What a QEMU command line says (options as given, in order)."""

    words: list[str]
    name: str | None = None
    machine: str | None = None
    #: ``-usb`` or ``-machine usb=on``
    usb_flag: bool = False
    #: every ``-device``, parsed (``driver`` is a key)
    devices: list[dict[str, str]] = field(default_factory=list)
    #: ``-chardev`` by id (``backend`` is a key)
    chardevs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: every ``-mon`` (``chardev``, ``mode``)
    monitors: list[dict[str, str]] = field(default_factory=list)
    #: every ``-qmp``/``-qmp-pretty`` value
    qmp: list[str] = field(default_factory=list)
    #: the last ``-spice`` value, parsed
    spice: dict[str, str] | None = None

    @property
    def qmp_paths(self) -> list[str]:
        """Unix QMP sockets, as written (maybe relative): ``-qmp`` ones first, then
        ``-chardev socket,path=`` used by ``-mon mode=control``; no repeats."""
        paths = [p for p in map(unix_path, self.qmp) if p]
        for mon in self.control_chardevs():
            if "path" in mon:
                paths.append(mon["path"])
        return list(dict.fromkeys(paths))

    def control_chardevs(self) -> list[dict[str, str]]:
        """The socket chardevs behind ``-mon mode=control``."""
        out = []
        for mon in self.monitors:
            cd = self.chardevs.get(mon.get("chardev", ""))
            if mon.get("mode") == "control" and cd and cd.get("backend") == "socket":
                out.append(cd)
        return out

    @property
    def monitor_fd(self) -> bool:
        """A QMP monitor was handed over as a file descriptor (libvirt does this)."""
        return any("fd" in cd and "path" not in cd for cd in self.control_chardevs())

    @property
    def libvirt_managed(self) -> bool:
        """libvirt names its monitor chardev ``charmonitor``."""
        return self.chardevs.get("charmonitor", {}).get("backend") == "socket"

    @property
    def qga_path(self) -> str | None:
        """The unix socket of the guest agent's port (``org.qemu.guest_agent.0``)."""
        for dev in self.devices:
            if dev.get("driver") != "virtserialport" or dev.get("name") != QGA_PORT_NAME:
                continue
            cd = self.chardevs.get(dev.get("chardev", ""))
            if cd and "path" in cd:
                return cd["path"]
        return None

    def drivers(self, driver: str) -> list[dict[str, str]]:
        return [d for d in self.devices if d.get("driver") == driver]


def parse_args(words: list[str] | tuple[str, ...]) -> QemuArgv:
    """Read a QEMU command line, without the program name (``argv[1:]``)."""
    out = QemuArgv(words=list(words))
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            continue
        opt, eq, inline = word.lstrip("-").partition("=")
        if opt == "usb" and not eq:
            out.usb_flag = True
            continue
        if opt not in _READ:
            if opt in _SKIP and not eq:
                i += 1
            continue
        if eq:
            val = inline
        elif i < len(words):
            val = words[i]
            i += 1
        else:
            break
        if opt == "device":
            out.devices.append(device_opts(val))
        elif opt in ("M", "machine"):
            props = parse_opts(val, "type")
            out.machine = props.get("type", out.machine)
            if props.get("usb") in ("on", "yes", "true"):
                out.usb_flag = True
        elif opt in ("qmp", "qmp-pretty"):
            out.qmp.append(val)
        elif opt == "chardev":
            props = parse_opts(val, "backend")
            if "id" in props:
                out.chardevs[props["id"]] = props
        elif opt == "mon":
            out.monitors.append(parse_opts(val, "chardev"))
        elif opt == "name":
            out.name = parse_opts(val, "guest").get("guest") or out.name
        elif opt == "spice":
            out.spice = parse_opts(val, "port")
    return out


# ---------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class QemuProcess:
    """One ``qemu-system-*`` process: its command line, working directory and,
    for a QEMU in another mount namespace (a container), its root."""

    pid: int
    argv: tuple[str, ...]
    args: QemuArgv = field(hash=False, compare=False)
    proc_root: str = "/proc"
    cwd: str | None = None
    #: ``/proc/PID/root`` when the process sees another root than ours
    root: str | None = None

    @property
    def source(self) -> str:
        return f"{self.proc_root}/{self.pid}/cmdline"

    def reach(self, path: str) -> str | None:
        """Where a path of this process is for us: relative to its working
        directory, and through ``/proc/PID/root`` when it lives in a container
        (the same file, whatever the mounts); None when it cannot be told."""
        if not os.path.isabs(path):
            if self.cwd is None:
                return None
            path = os.path.normpath(os.path.join(self.cwd, path))
        return self.root + path if self.root else path


def scan_qemu(proc_root: Path | str = "/proc") -> list[QemuProcess]:
    """Every QEMU process under ``proc_root``, by PID, with its command line parsed."""
    root_dir = str(proc_root)
    out: list[QemuProcess] = []
    try:
        pids = sorted(int(p) for p in os.listdir(root_dir) if p.isdigit())
    except OSError:
        return out
    for pid in pids:
        base = f"{root_dir}/{pid}"
        try:
            with open(f"{base}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        argv = tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)
        if not argv or not _QEMU_BIN.match(os.path.basename(argv[0])):
            continue
        cwd = root = None
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"{base}/cwd")
        with contextlib.suppress(OSError):
            if os.readlink(f"{base}/root") != "/":
                root = f"{base}/root"
        out.append(
            QemuProcess(
                pid=pid,
                argv=argv,
                args=parse_args(argv[1:]),
                proc_root=root_dir,
                cwd=cwd,
                root=root,
            )
        )
    return out


__all__ = [
    "QGA_PORT_NAME",
    "QemuArgv",
    "QemuProcess",
    "device_opts",
    "json_opts",
    "parse_args",
    "parse_opts",
    "scan_qemu",
    "split_arguments",
    "split_opts",
    "unix_path",
]
