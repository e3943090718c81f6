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
from pathlib import Path
from typing import Any

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.doctor.qemu_info import QemuInstance, find_processes, query_qmp
from vmplug.doctor.windows import (
    ADVICE,
    PCI_DEVICES,
    PNP_COMMAND,
    POWERCFG_ARGS,
    SERVICE_COMMAND,
    SERVICES,
    VIRTIO_COMMAND,
    PnpDevice,
    WinService,
    parse_pnp_json,
    parse_selective_suspend,
    parse_services_json,
    pci_ids,
    usb_ids,
    virtio_advice,
)
from vmplug.generate.spice import ANY, FilterRule
from vmplug.model import UsbDevice
from vmplug.wire.errors import AgentError, WireError
from vmplug.wire.qga import GuestAgent, commands
from vmplug.wire.qmp import SyncQmp

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
  Windows: virtio-win guest tools (qemu-ga-x86_64.msi), service "QEMU Guest Agent";
    installed but stopped: Set-Service QEMU-GA -StartupType Automatic; Start-Service QEMU-GA
    (it needs the VirtIO Serial driver, vioserial: Device Manager shows no Code 28 for it)
  Debian/Ubuntu: apt install qemu-guest-agent && systemctl enable --now qemu-guest-agent
    (it starts only once /dev/virtio-ports/org.qemu.guest_agent.0 exists in the guest)"""


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
    for check, command, judge in (
        ("guest.windows-services", SERVICE_COMMAND, _judge_services),
        ("guest.windows-virtio", VIRTIO_COMMAND, _judge_virtio),
    ):
        cmd = ["-NoProfile", "-NonInteractive", "-Command", command]
        rc, out, err = agent.exec("powershell.exe", cmd, timeout=120)
        if rc != 0:
            yield _f(
                check,
                Severity.WARNING,
                f"PowerShell failed in the guest (exit {rc})",
                vm,
                evidence=(command, err.strip()[:500]),
            )
            continue
        try:
            yield from judge(out, vm)
        except ValueError as exc:  # json.JSONDecodeError included
            yield _f(
                check,
                Severity.WARNING,
                "PowerShell's output in the guest is not the JSON asked for",
                vm,
                evidence=(command, f"{exc}", out.strip()[:300]),
            )


def _judge_services(text: str, vm: str) -> Iterator[Finding]:
    yield from service_findings(parse_services_json(text), vm)


def _judge_virtio(text: str, vm: str) -> Iterator[Finding]:
    yield from virtio_findings(parse_pnp_json(text), vm)


def service_findings(services: Sequence[WinService], vm: str) -> Iterator[Finding]:
    """The guest additions' services (``Get-Service``): the agent must start with
    Windows; two SPICE agents fight over the one vdagent port."""
    by_name = {s.name.lower(): s for s in services}
    ev = tuple(
        f"Get-Service {s.name} ({s.display}): Status={s.status} StartType={s.start}"
        for s in services
    )
    bad = False
    ga = by_name.get("qemu-ga")
    if ga is not None and ga.start != "Automatic":
        bad = True
        yield _f(
            "guest.windows-services",
            Severity.WARNING,
            f"the QEMU Guest Agent service starts {ga.start}, not with Windows: after a "
            "reboot nothing answers on the agent channel",
            vm,
            evidence=ev,
            fix="in the guest (admin PowerShell):\n"
            "  Set-Service -Name QEMU-GA -StartupType Automatic\n  Start-Service QEMU-GA",
            subject="QEMU-GA",
        )
    agents = [by_name[n] for n in ("spice-agent", "vdservice") if n in by_name]
    running = [a for a in agents if a.status == "Running"]
    if len(running) > 1:
        bad = True
        yield _f(
            "guest.windows-services",
            Severity.WARNING,
            "two SPICE agents run (spice-agent and the older vdservice): they fight over "
            "the one vdagent port (com.redhat.spice.0)",
            vm,
            evidence=ev,
            fix="in the guest (admin PowerShell): keep the newer one\n"
            "  Stop-Service vdservice\n  Set-Service -Name vdservice -StartupType Disabled",
            subject="vdservice",
        )
    if not bad:
        yield _f(
            "guest.windows-services",
            Severity.OK,
            "the guest additions' services are set up as they should be"
            if services
            else "none of " + ", ".join(SERVICES) + " is installed",
            vm,
            evidence=ev,
        )


def virtio_findings(devices: Sequence[PnpDevice], vm: str) -> Iterator[Finding]:
    """QEMU's paravirtual PCI devices (virtio 1AF4, Red Hat 1B36: the xHCI
    controller) as Windows sees them: one finding per device with a problem code."""
    bad = 0
    listing: list[str] = []
    for d in devices:
        ids = pci_ids(d.instance_id)
        if ids is None:
            continue
        what, driver = PCI_DEVICES.get(ids, (f"PCI {ids[0]:04x}:{ids[1]:04x}", "?"))
        listing.append(f"{d.name} ({what}, {driver}): Code {d.problem}")
        if d.problem == 0:
            continue
        bad += 1
        yield _f(
            "guest.windows-virtio",
            Severity.WARNING if d.problem in (22, 45) else Severity.ERROR,
            f"{d.name} ({what}): Code {d.problem} {d.problem_name}: {d.problem_text}",
            vm,
            evidence=(
                f"Get-PnpDevice: InstanceId={d.instance_id} Class={d.cls} Status={d.status} "
                f"ConfigManagerErrorCode={d.problem}",
            ),
            fix=virtio_advice(ids),
            subject=d.instance_id,
        )
    if not bad:
        yield _f(
            "guest.windows-virtio",
            Severity.OK,
            f"{len(listing)} VirtIO/QEMU PCI devices in Windows, each with its driver",
            vm,
            evidence=tuple(listing),
        )


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


# ---------------------------------------------------------------- SPICE USB redirection
# A VM with spicevmc ``usbredir`` channels takes whatever USB devices a SPICE
# client (remote-viewer, virt-viewer, spicy) redirects.  A client running on
# the host that vmplug passes a device from grabs that same device through
# libusb: with an auto-redirect filter that allows it, at once on connect and
# on every replug, fighting QEMU's usb-host for it.

#: SPICE clients whose command lines carry spice-gtk's usbredir options.
SPICE_CLIENTS = ("remote-viewer", "virt-viewer", "spicy")
#: spice-gtk's options (``spice-option.c``): both take a usbredir filter string.
CLIENT_FILTER_OPTIONS = (
    "--spice-usbredir-auto-redirect-filter",
    "--spice-usbredir-redirect-on-connect",
)
#: ``SPICE_CHANNEL_USBREDIR`` (spice-protocol ``enums.h``): query-spice's channel-type.
SPICE_CHANNEL_USBREDIR = 9


class FilterSyntaxError(ValueError):
    """A usbredir filter string that usbredirfilter_string_to_rules would refuse."""


def parse_filter(text: str, separator: str | None = None) -> tuple[FilterRule, ...]:
    """A usbredir filter (``class,vendor,product,version,allow|…``), parsed as
    ``usbredirfilter_string_to_rules`` does: numbers in C syntax (``0x…``,
    ``-1`` = any), ``,`` between fields for SPICE clients, ``:`` for QEMU's
    ``usb-redir,filter=`` (``separator`` None: whichever the text uses); empty
    rules between ``|`` are skipped, as usbredir skips them."""
    sep = separator or (":" if ":" in text and "," not in text else ",")
    rules: list[FilterRule] = []
    for n, raw in enumerate(text.strip().split("|"), 1):
        part = raw.strip()
        if not part:
            continue
        fields = part.split(sep)
        if len(fields) != 5:
            raise FilterSyntaxError(
                f"filter rule {n} {part!r}: expected 5 fields class{sep}vendor{sep}product"
                f"{sep}version{sep}allow, got {len(fields)}"
            )
        try:
            nums = [int(f.strip(), 0) for f in fields]
        except ValueError:
            raise FilterSyntaxError(
                f"filter rule {n} {part!r}: fields must be numbers (0x1235, 1235 or -1)"
            ) from None
        limits = (0xFF, 0xFFFF, 0xFFFF, 0xFFFF)
        for value, top, name in zip(
            nums[:4], limits, ("class", "vendor", "product", "version"), strict=True
        ):
            if value < -1 or value > top:
                raise FilterSyntaxError(f"filter rule {n} {part!r}: {name} {value} out of range")
        rules.append(FilterRule(nums[0], nums[1], nums[2], nums[3], bool(nums[4])))
    return tuple(rules)


@dataclass(frozen=True)
class Passed:
    """A device vmplug (or a usb-host) passes through to a VM: what a filter is judged by."""

    vendor_id: int
    product_id: int
    label: str
    device: UsbDevice | None = None

    @property
    def ids(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"


def _check1(rules: Sequence[FilterRule], cls: int | None, p: Passed) -> tuple[bool, int] | None:
    version = p.device.bcd_device if p.device is not None else None
    for i, r in enumerate(rules):
        if r.cls != ANY and (cls is None or r.cls != cls):
            continue
        if r.vendor not in (ANY, p.vendor_id):
            continue
        if r.product not in (ANY, p.product_id):
            continue
        if r.version != ANY and (version is None or r.version != version):
            continue
        return r.allow, i
    return None


def filter_verdict(rules: Sequence[FilterRule], p: Passed) -> tuple[bool, int | None]:
    """Would this filter let the device be redirected, and by which rule
    (``usbredirfilter_check``: the device class unless 0x00/0xef, then each
    interface class, each must be allowed; no rule matching: denied)."""
    classes: list[int | None] = []
    dev = p.device
    if dev is None:
        classes = [None]
    else:
        if dev.device_class not in (None, 0x00, 0xEF):
            classes.append(dev.device_class)
        classes += [i.cls for i in dev.interfaces]
        if not classes:
            classes = [None]
    decided: int | None = None
    for cls in classes:
        got = _check1(rules, cls, p)
        if got is None:
            return False, None
        if not got[0]:
            return False, got[1]
        decided = got[1]
    return True, decided


def blocking_filter(passed: Sequence[Passed], rest: Sequence[FilterRule], sep: str) -> str:
    """``rest`` with a block rule for each passed device put first."""
    rules = [FilterRule(ANY, p.vendor_id, p.product_id, ANY, False) for p in passed]
    seen = {(r.vendor, r.product) for r in rules}
    rules += [r for r in rest if (r.vendor, r.product, r.allow) not in {(*k, False) for k in seen}]
    if not rest:
        rules.append(FilterRule(ANY, ANY, ANY, ANY, True))
    return "|".join(sep.join(r.fields()) for r in rules)


@dataclass(frozen=True)
class RedirChannel:
    """One ``usb-redir`` device of a VM, from QOM and query-chardev."""

    id: str
    chardev: str | None
    backend: str | None  # query-chardev ``filename``: "spicevmc", "unix:…", "tcp:…"
    filter: str | None  # QEMU's own usb-redir filter (":" between fields)
    attached: bool | None

    @property
    def spice(self) -> bool:
        return self.backend == "spicevmc"

    @property
    def ours(self) -> bool:
        return self.id.startswith("vmplug-")


@dataclass
class SpiceState:
    """What QMP says about a VM's SPICE server and its usbredir channels."""

    enabled: bool = False
    where: str | None = None
    redirs: list[RedirChannel] = field(default_factory=list)
    #: spicevmc chardevs no usb-redir uses (vdagent, webdav, a half-removed redir)
    other_spicevmc: list[str] = field(default_factory=list)
    connected_usbredir: int = 0


def read_spice(client: Any, timeout: float) -> SpiceState:
    """``query-spice``, ``query-chardev`` and every ``child<usb-redir>`` under
    ``/machine/peripheral`` (``chardev``, ``filter``, ``attached``)."""
    state = SpiceState()
    try:
        spice = client.execute("query-spice", timeout=timeout) or {}
    except Exception:  # a QEMU built without SPICE has no query-spice
        spice = {}
    state.enabled = bool(spice.get("enabled"))
    if state.enabled:
        state.where = f"{spice.get('host', '?')}:{spice.get('port', spice.get('tls-port', '?'))}"
    state.connected_usbredir = sum(
        1
        for c in spice.get("channels", []) or []
        if c.get("channel-type") == SPICE_CHANNEL_USBREDIR
    )
    backends = {
        c["label"]: str(c.get("filename", ""))
        for c in client.execute("query-chardev", timeout=timeout) or []
    }
    used: set[str] = set()
    for item in client.execute("qom-list", {"path": "/machine/peripheral"}, timeout=timeout) or []:
        if item.get("type") != "child<usb-redir>":
            continue
        path = f"/machine/peripheral/{item['name']}"

        def get(prop: str, path: str = path) -> Any:
            try:
                return client.execute("qom-get", {"path": path, "property": prop}, timeout=timeout)
            except Exception:  # an older QEMU lacks the property
                return None

        chardev = get("chardev") or None
        if chardev:
            used.add(str(chardev))
        attached = get("attached")
        state.redirs.append(
            RedirChannel(
                id=str(item["name"]),
                chardev=str(chardev) if chardev else None,
                backend=backends.get(str(chardev)) if chardev else None,
                filter=str(get("filter") or "") or None,
                attached=attached if isinstance(attached, bool) else None,
            )
        )
    state.other_spicevmc = [
        label for label, fn in backends.items() if fn == "spicevmc" and label not in used
    ]
    return state


@dataclass(frozen=True)
class ClientFilter:
    """A SPICE client's usbredir filter: where it was read, and its rules."""

    source: str
    option: str
    text: str
    rules: tuple[FilterRule, ...]


def client_filters(proc_root: Path) -> tuple[list[ClientFilter], list[str]]:
    """The usbredir filters on the command lines of SPICE clients running here
    (``/proc/PID/cmdline``), and what could not be parsed."""
    found: list[ClientFilter] = []
    bad: list[str] = []
    try:
        pids = sorted(int(p.name) for p in proc_root.iterdir() if p.name.isdigit())
    except OSError:
        return found, bad
    for pid in pids:
        try:
            raw = (proc_root / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
        if not argv or Path(argv[0]).name not in SPICE_CLIENTS:
            continue
        for i, arg in enumerate(argv):
            for opt in CLIENT_FILTER_OPTIONS:
                if arg.startswith(opt + "="):
                    value: str | None = arg[len(opt) + 1 :]
                elif arg == opt:
                    value = argv[i + 1] if i + 1 < len(argv) else None
                else:
                    continue
                if value is None:
                    continue
                where = f"{Path(argv[0]).name} (pid {pid})"
                try:
                    found.append(ClientFilter(where, opt, value, parse_filter(value, ",")))
                except FilterSyntaxError as exc:
                    bad.append(f"{where} {opt}: {exc}")
    return found, bad


def passed_devices(ctx: DoctorContext, inst: QemuInstance) -> list[Passed]:
    """What this VM takes from the host: its usb-host devices (by the present
    device they match, else their vendorid/productid) and what vmplug's rules
    attach to it."""
    out: dict[str, Passed] = {}
    try:
        devices = ctx.devices
    except Exception:  # no sysfs here: judge by the usb-host's own ids
        devices = []
    for h in inst.hosts():
        dev = next((d for d in devices if h.matches(d)), None)
        if dev is not None and dev.vendor_id is not None and dev.product_id is not None:
            p = Passed(dev.vendor_id, dev.product_id, f"{dev.port} ({h.describe()})", dev)
        elif (vp := h.vidpid()) is not None:
            p = Passed(vp[0], vp[1], h.describe())
        else:
            continue
        out.setdefault(p.ids, p)
    if ctx.config is not None:
        for dev in devices:
            rc = ctx.config.decide(dev)
            if rc is None or rc.attach != inst.name or dev.vendor_id is None:
                continue
            if dev.product_id is None:
                continue
            p = Passed(dev.vendor_id, dev.product_id, f"{dev.port} (rule {rc.index + 1})", dev)
            out.setdefault(p.ids, p)
    return list(out.values())


REMOVE_CHANNEL = """\
or remove the SPICE USB redirection channel from the VM:
  QEMU: drop  -chardev spicevmc,name=usbredir,id={chardev}
        and   -device usb-redir,chardev={chardev},…
  libvirt (virsh edit VM): delete  <redirdev bus='usb' type='spicevmc'>…</redirdev>"""


def spice_findings(
    vm: str,
    state: SpiceState,
    passed: Sequence[Passed],
    clients: Sequence[ClientFilter],
) -> Iterator[Finding]:
    """Judge a VM's SPICE USB redirection against what it passes through."""
    spice_redirs = [r for r in state.redirs if r.spice and not r.ours]
    if not spice_redirs:
        if state.enabled:
            yield _f(
                "guest.spice-usbredir",
                Severity.OK,
                f"SPICE on {state.where}, no spicevmc usbredir channel: nothing redirects "
                "USB into this VM but vmplug",
                vm,
                evidence=tuple(
                    f"usb-redir {r.id}: chardev {r.chardev} ({r.backend})" for r in state.redirs
                ),
            )
        return
    listing = tuple(
        f"usb-redir {r.id}: chardev {r.chardev} (query-chardev: {r.backend})"
        + (f", filter {r.filter}" if r.filter else ", no filter")
        + (f", attached={str(r.attached).lower()}" if r.attached is not None else "")
        for r in spice_redirs
    ) + (
        (f"query-spice: {state.connected_usbredir} usbredir channel(s) of a client connected",)
        if state.connected_usbredir
        else ()
    )
    if not passed:
        yield _f(
            "guest.spice-usbredir",
            Severity.INFO,
            f"{len(spice_redirs)} SPICE USB redirection channel(s) (SPICE on {state.where}); "
            "no device is passed through to this VM, so nothing competes",
            vm,
            evidence=listing,
        )
        return
    for p in passed:
        open_on = []
        for r in spice_redirs:
            rules: tuple[FilterRule, ...] = ()
            if r.filter:
                try:
                    rules = parse_filter(r.filter, ":")
                except FilterSyntaxError:
                    rules = ()
            if not rules or filter_verdict(rules, p)[0]:
                open_on.append((r, rules))
        for c in clients:
            allowed, idx = filter_verdict(c.rules, p)
            if not allowed:
                continue
            rule = c.text.split("|")[idx] if idx is not None else "?"
            yield _f(
                "guest.spice-usbredir",
                Severity.ERROR,
                f"{c.source} redirects {p.ids} ({p.label}) into this VM over SPICE while "
                "vmplug passes it through: the two fight over the device",
                vm,
                evidence=(
                    f"{c.source}: {c.option}={c.text}",
                    f"rule {(idx or 0) + 1} ({rule}) allows {p.ids}",
                    *listing,
                ),
                fix=f"start the client with the device blocked first:\n  {c.option}="
                f"'{blocking_filter(passed, c.rules, ',')}'\n"
                + REMOVE_CHANNEL.format(chardev=spice_redirs[0].chardev),
                subject=p.ids,
            )
        if not open_on:
            yield _f(
                "guest.spice-usbredir",
                Severity.OK,
                f"{p.ids} ({p.label}): every SPICE usbredir channel's filter blocks it",
                vm,
                evidence=listing,
                subject=p.ids,
            )
            continue
        r0 = open_on[0][0]
        yield _f(
            "guest.spice-usbredir",
            Severity.WARNING,
            f"SPICE USB redirection can take {p.ids} ({p.label}), which vmplug passes "
            f"through: channel(s) {', '.join(r.id for r, _ in open_on)} "
            "(spicevmc) let a SPICE client on this host redirect it too",
            vm,
            evidence=listing,
            fix="keep it out of SPICE: give each usb-redir a filter that blocks it\n"
            f"  -device usb-redir,chardev={r0.chardev},id={r0.id},filter="
            f"{blocking_filter(passed, open_on[0][1], ':')}\n"
            "  libvirt: <redirfilter>"
            + "".join(
                f"<usbdev vendor='0x{q.vendor_id:04x}' product='0x{q.product_id:04x}' allow='no'/>"
                for q in passed
            )
            + "<usbdev allow='yes'/></redirfilter>\n"
            "and in SPICE clients on this host:\n"
            f"  remote-viewer --spice-usbredir-auto-redirect-filter='"
            f"{blocking_filter(passed, (), ',')}'\n" + REMOVE_CHANNEL.format(chardev=r0.chardev),
            subject=p.ids,
        )


def check_spice(ctx: DoctorContext) -> Iterator[Finding]:
    """SPICE USB redirection on each VM, against the devices it passes through."""
    clients, bad = client_filters(ctx.proc_root)
    for text in bad:
        yield Finding(
            LAYER,
            "guest.spice-usbredir",
            Severity.WARNING,
            f"a SPICE client's usbredir filter does not parse: {text}",
            fix="write it as class,vendor,product,version,allow|… (vmplug generate spice)",
        )
    insts = [i for _, _, i in _targets(ctx) if i is not None] if ctx.qga_socket else ctx.qemus
    for inst in insts:
        path = inst.qmp_used or next(iter(inst.qmp_paths), None)
        if path is None or inst.qmp_error:
            continue
        if inst.argv and not any("spice" in a for a in inst.argv):
            # no SPICE server (-spice, -display spice-app): no spicevmc channel can exist
            continue
        try:
            client = SyncQmp(path, ctx.timeout, name="doctor-spice")
        except WireError:
            continue  # the qemu layer reports a QMP socket that does not answer
        try:
            state = read_spice(client, ctx.timeout)
        finally:
            client.close()
        yield from spice_findings(inst.name, state, passed_devices(ctx, inst), clients)


CHECKS = (
    CheckSpec(LAYER, "guest.agent", check_guest),
    CheckSpec(LAYER, "guest.spice-usbredir", check_spice),
)


# ---------------------------------------------------------------- guest-reported problems
# The seam for the daemon (vmplug.daemon.guestwatch): what the guest itself says
# about the devices vmplug attached to it, journaled as ``guest-problem``
# (history.store.EventKind.GUEST_PROBLEM), a trigger of the healing ladder
# (daemon.heal.decide reads ``detail.problem``/``detail.message``).

#: ``detail.problem`` values
NO_DRIVER = "no-driver"
WINDOWS_CODE = "windows-code"
NOT_SEEN = "not-seen"


@dataclass(frozen=True)
class GuestProblem:
    """One attached device the guest reports trouble with."""

    identity: str
    vidpid: str
    problem: str  # NO_DRIVER, WINDOWS_CODE or NOT_SEEN
    message: str
    code: int | None = None

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"problem": self.problem, "message": self.message}
        out["ids"] = self.vidpid
        if self.code is not None:
            out["code"] = self.code
        return out


def guest_problems(
    agent: GuestAgent, attached: Sequence[tuple[str, str]], *, os_id: str | None = None
) -> list[GuestProblem]:
    """Problems the guest behind ``agent`` has with ``attached`` ((identity,
    vendor:product) pairs vmplug holds for it in QEMU): a Linux guest whose
    kernel bound no driver to an interface, or that does not see the device at
    all; a Windows device with a Configuration Manager problem code."""
    if not attached:
        return []
    if os_id is None:
        os_id = str(agent.osinfo().get("id", ""))
    out: list[GuestProblem] = []
    if os_id == "mswindows":
        cmd = ["-NoProfile", "-NonInteractive", "-Command", PNP_COMMAND]
        rc, text, err = agent.exec("powershell.exe", cmd, timeout=120)
        if rc != 0:
            raise AgentError(f"Get-PnpDevice failed in the guest (exit {rc}): {err.strip()[:200]}")
        devices = parse_pnp_json(text)
        for identity, ids in attached:
            for d in devices:
                if d.problem and usb_ids(d.instance_id) == ids:
                    out.append(
                        GuestProblem(
                            identity,
                            ids,
                            WINDOWS_CODE,
                            f"{d.name}: Code {d.problem} {d.problem_name}",
                            d.problem,
                        )
                    )
                    break
        return out
    seen = [d for d in linux_usb_devices(agent) if not d.is_root_hub]
    for identity, ids in attached:
        copies = [d for d in seen if d.vidpid == ids]
        if not copies:
            out.append(GuestProblem(identity, ids, NOT_SEEN, f"{ids} is not in the guest's sysfs"))
            continue
        if any(all(i.driver for i in d.interfaces) for d in copies):
            continue
        g = copies[0]
        loose = ", ".join(f"{i.number} (class {i.cls:02x})" for i in g.interfaces if not i.driver)
        out.append(
            GuestProblem(
                identity, ids, NO_DRIVER, f"{g.port} {ids}: no driver for interface {loose}"
            )
        )
    return out
