"""Guest-layer checks through the QEMU guest agent (``org.qemu.guest_agent.0``).

Windows: ``Get-PnpDevice`` through ``guest-exec`` -> devices with a problem
code; ``powercfg`` -> USB selective suspend.  Linux: the guest's
``/sys/bus/usb/devices`` through ``guest-file-open``/``guest-file-read`` ->
what the guest sees and which interfaces have no driver.  No channel: how to
add one and install the agent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.doctor.qemu_info import QemuInstance, find_processes, query_qmp
from vmplug.doctor.windows import (
    ADVICE,
    PNP_COMMAND,
    POWERCFG_ARGS,
    PnpDevice,
    parse_pnp_json,
    parse_selective_suspend,
    usb_ids,
)
from vmplug.wire.errors import AgentError
from vmplug.wire.qga import GuestAgent, commands

LAYER = "guest"

ADD_CHANNEL = """\
QEMU arguments:
  -chardev socket,id=qga0,path=/run/vmplug/{name}-qga.sock,server=on,wait=off
  -device virtio-serial-pci,id=vser0
  -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
dockurr/windows (compose), appended to ARGUMENTS, with ./qmp bind-mounted at /qmp:
  -chardev socket,id=qga0,path=/qmp/qga.sock,server=on,wait=off
  -device virtio-serial-pci,id=vser0
  -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
  (on one line, space-separated)
libvirt (virsh edit {name}, under <devices>):
  <channel type='unix'>
    <target type='virtio' name='org.qemu.guest_agent.0'/>
  </channel>
In the guest:
  Windows: install the virtio-win guest tools (virtio-win-guest-tools.exe, or
  guest-agent\\qemu-ga-x86_64.msi from the virtio-win ISO); the service is "QEMU Guest Agent"
  Debian/Ubuntu: apt install qemu-guest-agent   Fedora/RHEL: dnf install qemu-guest-agent"""

INSTALL_AGENT = """\
the channel exists but no agent answers on it; install and start it in the guest:
  Windows: virtio-win guest tools (qemu-ga-x86_64.msi), service "QEMU Guest Agent"
  Debian/Ubuntu: apt install qemu-guest-agent && systemctl enable --now qemu-guest-agent"""


def _targets(ctx: DoctorContext) -> list[tuple[str, str | None, QemuInstance | None]]:
    if ctx.qga_socket:
        # Only the QEMU behind this socket is looked at (over QMP), not every VM here.
        real = os.path.realpath(ctx.qga_socket)
        inst = next(
            (
                q
                for q in find_processes(ctx.proc_root)
                if q.qga_path and os.path.realpath(q.qga_path) == real
            ),
            None,
        )
        if inst is not None:
            query_qmp(inst, ctx.timeout)
        return [(inst.name if inst else (ctx.vm or "guest"), ctx.qga_socket, inst)]
    return [(q.name, q.qga_path, q) for q in ctx.qemus]


def _f(check: str, sev: Severity, title: str, vm: str, **kw: object) -> Finding:
    kw.setdefault("subject", vm)
    return Finding(LAYER, check, sev, f"VM {vm}: {title}", **kw)  # type: ignore[arg-type]


def check_guest(ctx: DoctorContext) -> Iterator[Finding]:
    """What the guest itself says about its USB devices."""
    targets = _targets(ctx)
    if not targets:
        yield Finding(LAYER, "guest.agent", Severity.OK, "no VM to look into")
        return
    for vm, path, inst in targets:
        if path is None:
            yield _f(
                "guest.agent",
                Severity.INFO,
                "no guest agent channel (org.qemu.guest_agent.0): the guest cannot be checked",
                vm,
                evidence=("no virtserialport name=org.qemu.guest_agent.0 on the command line",),
                fix=ADD_CHANNEL.format(name=vm.replace(" ", "-")),
            )
            continue
        try:
            agent = GuestAgent(path, timeout=max(ctx.timeout, 1.0))
        except AgentError as exc:
            yield _f(
                "guest.agent",
                Severity.WARNING,
                "the guest agent does not answer",
                vm,
                evidence=(f"{path}: {exc}",),
                fix=INSTALL_AGENT,
            )
            continue
        with agent:
            try:
                agent.ping()
                info = agent.info()
            except AgentError as exc:
                yield _f(
                    "guest.agent",
                    Severity.WARNING,
                    "the guest agent connected but does not answer guest-ping/guest-info",
                    vm,
                    evidence=(f"{path}: {exc}",),
                    fix=INSTALL_AGENT,
                )
                continue
            osinfo = agent.osinfo()
            health = agent_findings(vm, path, info, osinfo)
            yield from health
            if any(f.severity >= Severity.ERROR for f in health):
                continue
            usable = set(_enabled(info))
            if str(osinfo.get("id", "")) == "mswindows":
                if {"guest-exec", "guest-exec-status"} <= usable:
                    yield from _windows(agent, vm)
            elif {"guest-file-open", "guest-file-read"} <= usable:
                yield from _linux(ctx, agent, vm, inst)


# ---------------------------------------------------------------- the agent's own health

#: What vmplug's guest checks call, and what for.
NEEDED_COMMANDS: dict[str, str] = {
    "guest-sync": "make the channel ours (every client needs it)",
    "guest-ping": "the agent's liveness",
    "guest-info": "the agent's version and commands",
    "guest-get-osinfo": "tell a Windows guest from a Linux one",
    "guest-file-open": "read a Linux guest's /sys/bus/usb",
    "guest-file-read": "read a Linux guest's /sys/bus/usb",
    "guest-file-close": "read a Linux guest's /sys/bus/usb",
    "guest-exec": "run Get-PnpDevice, Get-Service and powercfg in a Windows guest",
    "guest-exec-status": "collect what guest-exec ran",
}
#: guest-get-osinfo came with QEMU 2.10; guest-exec with 2.5.
MIN_VERSION = (2, 10)


def _enabled(info: dict[str, Any]) -> list[str]:
    return [name for name, on in commands(info).items() if on]


def parse_version(text: str) -> tuple[int, ...] | None:
    """``7.2.22`` / ``100.0.0`` (virtio-win's builds) -> a tuple; None when unreadable."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def unblock_fix(os_id: str, blocked: Sequence[str]) -> str:
    """How to enable ``blocked`` again in the guest, for its kind of OS."""
    names = ",".join(blocked)
    if os_id == "mswindows":
        return (
            "in the guest (admin PowerShell): the QEMU-GA service's command line blocks them\n"
            "  (Get-ItemProperty HKLM:\\SYSTEM\\CurrentControlSet\\Services\\QEMU-GA).ImagePath\n"
            f"  remove {names} from its -b/--block-rpcs (or --blacklist) list, or add them to\n"
            "  --allow-rpcs, with Set-ItemProperty ... -Name ImagePath -Value '<the new line>';\n"
            "  check block-rpcs= in qemu-ga.conf next to qemu-ga.exe, then\n"
            "  Restart-Service QEMU-GA"
        )
    return (
        "in the guest: the agent runs with these commands blocked; find where\n"
        "  ps -o args= -C qemu-ga        (look for -b/--block-rpcs, --blacklist, --allow-rpcs)\n"
        "  Fedora/RHEL: /etc/sysconfig/qemu-ga   BLACKLIST_RPC= / FILTER_RPC_ARGS=\n"
        "  any distribution: /etc/qemu/qemu-ga.conf   block-rpcs= (blacklist= before 8.1)\n"
        f"remove {names} there (or add them to --allow-rpcs), then\n"
        "  systemctl restart qemu-guest-agent"
    )


def agent_findings(
    vm: str, path: str, info: dict[str, Any], osinfo: dict[str, Any]
) -> list[Finding]:
    """The agent's health from its own answers (``guest-info``, ``guest-get-osinfo``):
    version, and which of the commands vmplug needs are missing or disabled."""
    out: list[Finding] = []
    version = str(info.get("version", "?"))
    os_id = str(osinfo.get("id", ""))
    os_name = osinfo.get("pretty-name") or osinfo.get("name") or os_id or "?"
    cmds = commands(info)
    evidence = (
        f"{path}: guest-ping answered; guest-info: qemu-ga {version}, "
        f"{sum(cmds.values())} of {len(cmds)} commands enabled",
        f"guest-get-osinfo: {os_name} {osinfo.get('kernel-release', '')}".rstrip()
        if osinfo
        else "guest-get-osinfo: no answer",
    )
    out.append(_f("guest.agent", Severity.OK, "guest agent answers", vm, evidence=evidence))
    parsed = parse_version(version)
    if parsed is not None and parsed < MIN_VERSION:
        out.append(
            _f(
                "guest.agent-version",
                Severity.WARNING,
                f"qemu-ga {version} is older than {'.'.join(map(str, MIN_VERSION))}: "
                "it has no guest-get-osinfo, so the doctor cannot tell the guest's OS",
                vm,
                evidence=(f"guest-info: version {version}",),
                fix="update the agent in the guest: Windows: the virtio-win guest tools "
                "(qemu-ga-x86_64.msi); Linux: the distribution's qemu-guest-agent package",
            )
        )
    relevant = ["guest-sync", "guest-ping", "guest-info", "guest-get-osinfo"]
    relevant += (
        ["guest-exec", "guest-exec-status"]
        if os_id == "mswindows"
        else ["guest-file-open", "guest-file-read", "guest-file-close"]
    )
    missing = [c for c in relevant if c not in cmds]
    blocked = [c for c in relevant if cmds.get(c) is False]
    if blocked:
        out.append(
            _f(
                "guest.agent-commands",
                Severity.WARNING,
                "the guest agent has commands vmplug needs disabled: "
                + ", ".join(f"{c} ({NEEDED_COMMANDS[c]})" for c in blocked),
                vm,
                evidence=tuple(f"guest-info: {c} enabled=false" for c in blocked),
                fix=unblock_fix(os_id, blocked),
            )
        )
    if missing and cmds:
        out.append(
            _f(
                "guest.agent-commands",
                Severity.WARNING,
                f"qemu-ga {version} does not have " + ", ".join(missing),
                vm,
                evidence=tuple(f"guest-info: no {c} in supported_commands" for c in missing),
                fix="update the agent in the guest (virtio-win guest tools; qemu-guest-agent)",
            )
        )
    if not blocked and not (missing and cmds):
        needed = [c for c in relevant if c in cmds]
        out.append(
            _f(
                "guest.agent-commands",
                Severity.OK,
                "every agent command vmplug uses is enabled",
                vm,
                evidence=(f"guest-info: enabled {', '.join(needed)}",),
            )
        )
    return out


def _linux(
    ctx: DoctorContext, agent: GuestAgent, vm: str, inst: QemuInstance | None
) -> Iterator[Finding]:
    devs = linux_usb_devices(agent)
    listing = tuple(
        f"{d.port} {d.vidpid} {d.product or ''} {d.speed or '?'} Mbit/s: "
        + (", ".join(f"if{i.number} {i.driver or 'NO DRIVER'}" for i in d.interfaces) or "-")
        for d in devs
    )
    yield _f(
        "guest.linux-usb",
        Severity.OK,
        f"the guest sees {sum(1 for d in devs if not d.is_root_hub)} USB devices "
        "(/sys/bus/usb/devices, read with guest-file-read)",
        vm,
        evidence=listing,
    )
    for d in devs:
        if d.is_root_hub:
            continue
        loose = [i for i in d.interfaces if not i.driver]
        if loose:
            yield _f(
                "guest.linux-driver",
                Severity.WARNING,
                f"{d.port} ({d.vidpid} {d.product or ''}): no driver in the guest for interface "
                + ", ".join(f"{i.number} (class {i.cls:02x})" for i in loose),
                vm,
                evidence=tuple(
                    f"/sys/bus/usb/devices/{d.port}:1.{i.number}/uevent: no DRIVER=" for i in loose
                ),
                fix="load the driver in the guest (modprobe; the device's kernel module or "
                "userspace driver), or check the device works at all on the host",
                subject=d.port,
            )
    if inst is not None and inst.qom_hosts:
        seen = {d.vidpid for d in devs}
        for h in inst.qom_hosts:
            if not h.attached:
                continue
            dev = next((x for x in ctx.devices if h.matches(x)), None)
            if dev is not None and dev.vidpid not in seen:
                yield _f(
                    "guest.linux-usb",
                    Severity.WARNING,
                    f"QEMU holds {dev.port} ({dev.vidpid}) for the guest but the guest "
                    "does not see it",
                    vm,
                    evidence=(h.describe(), "QOM attached = true", *listing),
                    fix="check the guest's kernel log (dmesg) for USB errors",
                )


def _windows(agent: GuestAgent, vm: str) -> Iterator[Finding]:
    cmd = ["-NoProfile", "-NonInteractive", "-Command", PNP_COMMAND]
    rc, out, err = agent.exec("powershell.exe", cmd, timeout=120)
    if rc != 0:
        yield _f(
            "guest.windows-pnp",
            Severity.WARNING,
            f"Get-PnpDevice failed (exit {rc})",
            vm,
            evidence=(err.strip()[:500],),
        )
    else:
        yield from windows_findings(parse_pnp_json(out), vm)
    rc, out, err = agent.exec("powercfg.exe", POWERCFG_ARGS, timeout=60)
    yield from selective_suspend_findings(out if rc == 0 else "", vm, err)


def windows_findings(devices: Sequence[PnpDevice], vm: str) -> Iterator[Finding]:
    """Findings for ``Get-PnpDevice`` results: one per device with a problem code."""
    bad = 0
    for d in devices:
        if d.problem == 0:
            continue
        bad += 1
        sev = Severity.WARNING if d.problem in (22, 45) else Severity.ERROR
        ids = usb_ids(d.instance_id)
        yield _f(
            "guest.windows-pnp",
            sev,
            f"{d.name}{' (' + ids + ')' if ids else ''}: Code {d.problem} "
            f"{d.problem_name}: {d.problem_text}",
            vm,
            evidence=(
                f"Get-PnpDevice: InstanceId={d.instance_id} Class={d.cls} Status={d.status} "
                f"Present={d.present} ConfigManagerErrorCode={d.problem}",
            ),
            fix=ADVICE.get(d.problem, "see Device Manager's properties of the device in the guest"),
            subject=d.instance_id,
        )
    if not bad:
        yield _f(
            "guest.windows-pnp",
            Severity.OK,
            f"{len(devices)} USB/audio/HID devices in Windows, none with a problem code",
            vm,
        )


def selective_suspend_findings(text: str, vm: str, err: str = "") -> Iterator[Finding]:
    values = parse_selective_suspend(text)
    if values is None:
        yield _f(
            "guest.windows-suspend",
            Severity.INFO,
            "could not read the USB selective suspend setting",
            vm,
            evidence=(err.strip()[:300] or text.strip()[:300] or "(no output)",),
        )
        return
    ac, dc = values
    ev = (f"powercfg {' '.join(POWERCFG_ARGS)}: AC {ac:#010x} DC {dc:#010x}",)
    if ac or dc:
        yield _f(
            "guest.windows-suspend",
            Severity.WARNING,
            "USB selective suspend is enabled in the guest's power plan: audio and MIDI "
            "devices may drop out when idle",
            vm,
            evidence=ev,
            fix="in the guest (admin PowerShell):\n"
            f"  powercfg /SETACVALUEINDEX SCHEME_CURRENT {POWERCFG_ARGS[2]} {POWERCFG_ARGS[3]} 0\n"
            f"  powercfg /SETDCVALUEINDEX SCHEME_CURRENT {POWERCFG_ARGS[2]} {POWERCFG_ARGS[3]} 0\n"
            "  powercfg /SETACTIVE SCHEME_CURRENT",
        )
    else:
        yield _f("guest.windows-suspend", Severity.OK, "USB selective suspend off", vm, evidence=ev)


CHECKS = (CheckSpec(LAYER, "guest.agent", check_guest),)


# ---------------------------------------------------------------- a Linux guest's USB devices
# (the agent cannot list directories: root hubs ``usbN``, then each hub's ports up
# to its ``maxchild``, recursively, with file reads only)


@dataclass(frozen=True)
class GuestInterface:
    number: int
    cls: int
    subclass: int
    protocol: int
    driver: str | None


@dataclass(frozen=True)
class GuestUsbDevice:
    port: str
    vendor_id: int
    product_id: int
    device_class: int
    speed: str | None
    product: str | None
    driver: str | None
    interfaces: tuple[GuestInterface, ...] = field(default=())

    @property
    def vidpid(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    @property
    def is_root_hub(self) -> bool:
        return self.port.startswith("usb")

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "id": self.vidpid,
            "class": self.device_class,
            "speed": self.speed,
            "product": self.product,
            "driver": self.driver,
            "interfaces": [
                {"number": i.number, "class": i.cls, "driver": i.driver} for i in self.interfaces
            ],
        }


def _uevent(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def _triple(text: str) -> tuple[int, int, int]:
    """``TYPE=``/``INTERFACE=`` of a uevent: decimal ``class/subclass/protocol``."""
    parts = [int(p, 10) for p in text.split("/")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


SYS_USB = "/sys/bus/usb/devices"


def _read_device(agent: GuestAgent, name: str) -> GuestUsbDevice | None:
    ev = _uevent(agent.read_text(f"{SYS_USB}/{name}/uevent"))
    if ev.get("DEVTYPE") != "usb_device" or "PRODUCT" not in ev:
        return None
    vid, pid, _ = ev["PRODUCT"].split("/")
    cls = _triple(ev.get("TYPE", "0/0/0"))[0]
    ifaces: list[GuestInterface] = []
    cfg = agent.read_text(f"{SYS_USB}/{name}/bConfigurationValue")
    count = agent.read_text(f"{SYS_USB}/{name}/bNumInterfaces")
    # a root hub "usbN" names its interfaces "N-0:C.I"
    iname = f"{name[3:]}-0" if name.startswith("usb") else name
    if cfg and count and count.strip().isdigit():
        for i in range(int(count)):
            iev = _uevent(agent.read_text(f"{SYS_USB}/{iname}:{cfg}.{i}/uevent"))
            if "INTERFACE" in iev:
                c, s, p = _triple(iev["INTERFACE"])
                ifaces.append(GuestInterface(i, c, s, p, iev.get("DRIVER")))
    return GuestUsbDevice(
        port=name,
        vendor_id=int(vid, 16),
        product_id=int(pid, 16),
        device_class=cls,
        speed=agent.read_text(f"{SYS_USB}/{name}/speed"),
        product=agent.read_text(f"{SYS_USB}/{name}/product"),
        driver=ev.get("DRIVER"),
        interfaces=tuple(ifaces),
    )


def linux_usb_devices(agent: GuestAgent, max_bus: int = 16) -> list[GuestUsbDevice]:
    """Every USB device of a Linux guest, root hubs included, by walking hub ports."""
    out: list[GuestUsbDevice] = []

    def walk(hub: str, bus: int) -> None:
        maxchild = agent.read_text(f"{SYS_USB}/{hub}/maxchild")
        if not maxchild or not maxchild.isdigit():
            return
        for port in range(1, int(maxchild) + 1):
            child = f"{bus}-{port}" if hub.startswith("usb") else f"{hub}.{port}"
            dev = _read_device(agent, child)
            if dev is None:
                continue
            out.append(dev)
            if dev.device_class == 9:
                walk(child, bus)

    for bus in range(1, max_bus + 1):
        root = _read_device(agent, f"usb{bus}")
        if root is None:
            continue
        out.append(root)
        walk(f"usb{bus}", bus)
    return out
