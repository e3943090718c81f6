"""Guest-layer checks through the QEMU guest agent (``org.qemu.guest_agent.0``).

Windows: ``Get-PnpDevice`` through ``guest-exec`` -> devices with a problem
code; ``powercfg`` -> USB selective suspend.  Linux: the guest's
``/sys/bus/usb/devices`` through ``guest-file-open``/``guest-file-read`` ->
what the guest sees and which interfaces have no driver.  No channel: how to
add one and install the agent.
"""

from __future__ import annotations

import os
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
from vmplug.wire.qga import GuestAgent

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
            info = agent.info()
            osinfo = agent.osinfo()
            os_id = str(osinfo.get("id", ""))
            os_name = osinfo.get("pretty-name") or osinfo.get("name") or os_id or "?"
            evidence = (
                f"{path}: qemu-ga {info.get('version', '?')}",
                f"guest-get-osinfo: {os_name} {osinfo.get('kernel-release', '')}".rstrip(),
            )
            yield _f("guest.agent", Severity.OK, "guest agent answers", vm, evidence=evidence)
            if os_id == "mswindows":
                yield from _windows(agent, vm)
            else:
                yield from _linux(ctx, agent, vm, inst)


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
