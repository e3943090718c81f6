"""QEMU-layer checks: the process, its USB controller, how usb-host matches, what it holds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.doctor.qemu_info import QemuInstance, UsbHostArg
from vmplug.model import HIGH_SPEED, UsbDevice

LAYER = "qemu"
QMP_FIX = "-qmp unix:/run/vmplug/{name}.qmp,server=on,wait=off   # a QMP socket of vmplug's own"


def _f(check: str, sev: Severity, title: str, inst: QemuInstance, **kw: object) -> Finding:
    ev = kw.pop("evidence", ())
    kw.setdefault("subject", inst.name)
    src = f"{inst.source}" + (f" (pid {inst.pid})" if inst.pid else "")
    return Finding(
        LAYER,
        check,
        sev,
        f"VM {inst.name}: {title}",
        evidence=(f"source: {src}", *ev),  # type: ignore[misc]
        **kw,  # type: ignore[arg-type]
    )


def _qemu_fix(devs: list[UsbDevice], by_port: bool = False) -> str | None:
    """`vmplug generate qemu` arguments for these devices, when it can express them."""
    from vmplug.generate.qemu import plan_qemu, render_args  # noqa: PLC0415

    try:
        return render_args(plan_qemu(devs, by_port=by_port))
    except Exception:
        return None


def check_process(ctx: DoctorContext) -> Iterator[Finding]:
    """QEMU processes found, and whether vmplug can talk QMP to each."""
    qemus = ctx.qemus
    if not qemus:
        expected = bool(ctx.vm) or bool(ctx.config and ctx.config.vms)
        yield Finding(
            LAYER,
            "qemu.process",
            Severity.WARNING if expected else Severity.INFO,
            "no QEMU process found"
            + (f" for VM {ctx.vm}" if ctx.vm else "")
            + f" (looked in {ctx.proc_root} and the configured QMP sockets)",
            fix="start the VM; for a VM in a container run the doctor on the container's host",
        )
        return
    for inst in qemus:
        evidence = [" ".join(inst.argv)[:400]] if inst.argv else []
        if inst.qmp_used:
            yield _f(
                "qemu.process",
                Severity.OK,
                f"QEMU found, QMP answers on {inst.qmp_used}",
                inst,
                evidence=tuple(evidence),
            )
        elif not inst.qmp_paths and inst.monitor_fd:
            yield _f(
                "qemu.process",
                Severity.INFO,
                "QEMU's only QMP monitor is libvirt's (a file descriptor): reach this VM "
                "through libvirt",
                inst,
                evidence=tuple(evidence),
                fix='configure it as a libvirt VM in vmplug ([vm.NAME] libvirt = "DOMAIN"), '
                "or add a QMP socket of vmplug's own (libvirt XML, from vmplug generate "
                "libvirt --qmp PATH)",
            )
        elif not inst.qmp_paths:
            yield _f(
                "qemu.process",
                Severity.WARNING,
                "QEMU has no QMP unix socket: vmplug cannot attach devices to it",
                inst,
                evidence=tuple(evidence),
                fix=QMP_FIX.format(name=inst.name.replace(" ", "-")),
            )
        else:
            yield _f(
                "qemu.process",
                Severity.WARNING,
                "QMP does not answer",
                inst,
                evidence=(*evidence, f"QMP: {inst.qmp_error}"),
                fix="give vmplug a QMP socket of its own (QEMU accepts several -qmp): "
                + QMP_FIX.format(name=inst.name.replace(" ", "-")),
            )


def _matched(ctx: DoctorContext, inst: QemuInstance) -> list[UsbDevice]:
    return [d for d in ctx.devices if any(h.matches(d) for h in inst.hosts())]


def check_controller(ctx: DoctorContext) -> Iterator[Finding]:
    """A USB controller that can carry the devices: xHCI/EHCI for high speed."""
    for inst in ctx.qemus:
        kinds = inst.controller_kinds()
        evidence = tuple(f"controller {d} ({k})" for d, k in kinds)
        if inst.usb_flag:
            evidence += (f"-usb on machine {inst.machine or 'pc (default)'}",)
        hosts = inst.hosts()
        if not kinds:
            yield _f(
                "qemu.controller",
                Severity.ERROR if hosts else Severity.WARNING,
                "no USB controller: usb-host devices have no bus",
                inst,
                evidence=evidence,
                fix=_qemu_fix(_matched(ctx, inst)) or "-device qemu-xhci,id=xhci,p2=8,p3=8",
            )
            continue
        fast = {k for _, k in kinds} & {"xhci", "ehci"}
        if fast:
            yield _f(
                "qemu.controller",
                Severity.OK,
                f"USB controller {', '.join(sorted(fast))}",
                inst,
                evidence=evidence,
            )
            continue
        devs = _matched(ctx, inst) + [d for d in ctx.selected if d not in _matched(ctx, inst)]
        high = [d for d in devs if (d.speed_mbps or 0) >= HIGH_SPEED]
        fix = _qemu_fix(devs) or "-device qemu-xhci,id=xhci,p2=8,p3=8   # instead of -usb / UHCI"
        if high:
            yield _f(
                "qemu.controller",
                Severity.ERROR,
                "only a USB 1.1 controller (UHCI/OHCI) for high-speed device(s) "
                + ", ".join(f"{d.port} ({d.vidpid}, {d.speed_mbps:g} Mbit/s)" for d in high)
                + ": they fail or crawl at 12 Mbit/s",
                inst,
                evidence=evidence,
                fix=fix,
            )
        else:
            yield _f(
                "qemu.controller",
                Severity.WARNING,
                "only a USB 1.1 controller (UHCI/OHCI): 12 Mbit/s for everything, "
                "no high-speed device will work",
                inst,
                evidence=evidence,
                fix=fix,
            )


def _host_at(ctx: DoctorContext, h: UsbHostArg) -> UsbDevice | None:
    return next((d for d in ctx.devices if h.matches(d)), None)


def check_match_by_address(ctx: DoctorContext) -> Iterator[Finding]:
    """usb-host by hostaddr/hostdevice: never grabbed again after a replug."""
    for inst in ctx.qemus:
        bad = [h for h in inst.hosts() if h.by_address()]
        if not bad:
            if inst.hosts():
                yield _f(
                    "qemu.usb-host-match",
                    Severity.OK,
                    f"{len(inst.hosts())} usb-host, none matched by device address",
                    inst,
                )
            continue
        for h in bad:
            dev = _host_at(ctx, h)
            evidence = [h.describe()]
            if h.attached is not None:
                evidence.append(f"QOM attached = {str(h.attached).lower()}")
            if dev is None or h.attached is False:
                m = h.match()
                same_bus = [
                    d
                    for d in ctx.devices
                    if not d.is_root_hub and str(d.busnum) == m.get("hostbus")
                ]
                evidence += [
                    f"host bus {m.get('hostbus')}: {d.port} is device {d.devnum} ({d.vidpid})"
                    for d in same_bus
                ]
                yield _f(
                    "qemu.usb-host-match",
                    Severity.ERROR,
                    f"{h.id or 'usb-host'} is bound to a device address that is gone "
                    "(replugged devices get a new address): QEMU will never take it again",
                    inst,
                    evidence=tuple(evidence),
                    fix="device_del it and add it by port or id instead, e.g. "
                    "`vmplug attach DEVICE --vm VM`, or on the command line "
                    "(vmplug generate qemu DEVICE): "
                    "-device usb-host,hostbus=B,hostport=P   (or vendorid=0xVVVV,productid=0xPPPP)",
                    subject=h.id,
                )
            else:
                yield _f(
                    "qemu.usb-host-match",
                    Severity.WARNING,
                    f"{h.id or 'usb-host'} holds {dev.port} by device address: "
                    "lost at the next replug",
                    inst,
                    evidence=tuple(evidence),
                    fix=_qemu_fix([dev], by_port=True) or "-device usb-host,hostbus=B,hostport=P",
                    subject=h.id,
                )


def check_duplicates(ctx: DoctorContext) -> Iterator[Finding]:
    """vendorid:productid usb-host that several devices (or several usb-host) share."""
    for inst in ctx.qemus:
        by_pair: dict[tuple[int, int], list[UsbHostArg]] = defaultdict(list)
        for h in inst.hosts():
            pair = h.vidpid()
            if pair is not None:
                by_pair[pair].append(h)
        bad = False
        for (vid, pid), hosts in sorted(by_pair.items()):
            devs = [d for d in ctx.devices if d.vendor_id == vid and d.product_id == pid]
            if len(hosts) > 1 or len(devs) > 1:
                bad = True
                evidence = [h.describe() for h in hosts] + [
                    f"host {d.port}: {vid:04x}:{pid:04x} device {d.devnum}"
                    + (f" serial {d.serial}" if d.serial else "")
                    for d in devs
                ]
                yield _f(
                    "qemu.duplicate-ids",
                    Severity.WARNING,
                    f"{vid:04x}:{pid:04x}: {len(hosts)} usb-host by vendorid:productid and "
                    f"{len(devs)} host devices with that id: each usb-host catches one device, "
                    "whichever QEMU finds first",
                    inst,
                    evidence=tuple(evidence),
                    fix=_qemu_fix(devs, by_port=True)
                    or "match each by port: -device usb-host,hostbus=B,hostport=P",
                )
        if not bad and by_pair:
            yield _f(
                "qemu.duplicate-ids",
                Severity.OK,
                "every vendorid:productid usb-host names a single device",
                inst,
            )


def check_attached(ctx: DoctorContext) -> Iterator[Finding]:
    """Over QMP: which usb-host devices hold their device and which wait."""
    for inst in ctx.qemus:
        if inst.qom_hosts is None:
            continue
        if not inst.qom_hosts:
            yield _f("qemu.attached", Severity.OK, "no usb-host devices", inst)
            continue
        for h in inst.qom_hosts:
            who = "vmplug's" if h.ours else "not vmplug's"
            if h.attached:
                dev = _host_at(ctx, h)
                yield _f(
                    "qemu.attached",
                    Severity.OK,
                    f"{h.id} ({who}) holds " + (dev.port if dev else "its device"),
                    inst,
                    evidence=(h.describe(), "QOM attached = true"),
                    subject=h.id,
                )
                continue
            dev = _host_at(ctx, h)
            if dev is not None and not h.by_address():
                yield _f(
                    "qemu.attached",
                    Severity.WARNING,
                    f"{h.id} ({who}) waits although {dev.port} ({dev.vidpid}) matches it: "
                    "another usb-host or program holds it, or QEMU may not open it",
                    inst,
                    evidence=(h.describe(), "QOM attached = false"),
                    fix="see the host layer (holders, devnode) for this device",
                    subject=h.id,
                )
            elif not h.by_address():
                yield _f(
                    "qemu.attached",
                    Severity.INFO,
                    f"{h.id} ({who}) waits for its device (not plugged in)",
                    inst,
                    evidence=(h.describe(), "QOM attached = false"),
                    subject=h.id,
                )


CHECKS = (
    CheckSpec(LAYER, "qemu.process", check_process),
    CheckSpec(LAYER, "qemu.controller", check_controller),
    CheckSpec(LAYER, "qemu.usb-host-match", check_match_by_address),
    CheckSpec(LAYER, "qemu.duplicate-ids", check_duplicates),
    CheckSpec(LAYER, "qemu.attached", check_attached),
)
