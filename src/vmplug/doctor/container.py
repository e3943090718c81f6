# ruff: noqa: PTH116, PTH120
# (/proc, /dev and sysfs walks use plain os calls on string paths, like host/sysfs.py)
"""Container-layer checks: how a QEMU container (dockurr/windows) gets USB devices."""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterator
from typing import Any

from vmplug.doctor.container_info import ContainerSpec, host_path, qmp_socket
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.wire.proc import parse_opts

LAYER = "container"
USB_OFF = ("n", "no", "0", "off", "false", "disabled", "none")


def _gc() -> Any:
    """vmplug.generate.compose, imported only when a container needs it (ruamel is slow)."""
    from vmplug.generate import compose  # noqa: PLC0415

    return compose


def compose_fix() -> str:
    """The compose pieces `vmplug generate compose` writes (see generate/compose.py)."""
    gc = _gc()
    return f"""\
    volumes:
      - {gc.USB_BIND}        # a bind mount: replugged devices appear
      - ./qmp:{gc.QMP_CONTAINER_DIR}                    # vmplug's QMP socket, for the host
    device_cgroup_rules:
      - '{gc.USB_CGROUP_RULE}'                  # may open USB device nodes, also future ones
# (and no /dev/bus/usb under devices:) -- or let vmplug write it:
#   vmplug generate compose DEVICE... --merge docker-compose.yml"""


def _f(check: str, sev: Severity, title: str, spec: ContainerSpec, **kw: object) -> Finding:
    ev = kw.pop("evidence", ())
    return Finding(
        LAYER,
        check,
        sev,
        f"{spec.name}: {title}",
        evidence=(f"source: {spec.source}", *ev),  # type: ignore[misc]
        subject=spec.name,
        **kw,  # type: ignore[arg-type]
    )


def _usb_bind(spec: ContainerSpec) -> tuple[str, str] | None:
    for src, dst in spec.binds:
        if src.rstrip("/") in ("/dev/bus/usb", "/dev/bus", "/dev") and dst.rstrip("/") in (
            "/dev/bus/usb",
            "/dev/bus",
            "/dev",
        ):
            return (src, dst)
    return None


def _cgroup_ok(rules: list[str]) -> str | None:
    for rule in rules:
        m = re.match(r"^\s*([abc])\s+(\*|\d+):(\*|\d+)\s+([rwm]+)\s*$", rule)
        if not m:
            continue
        kind, major, _minor, perms = m.groups()
        if kind in ("a", "c") and major in ("*", "189") and "r" in perms and "w" in perms:
            return rule
    return None


def _qemu_args(spec: ContainerSpec) -> list[str]:
    return spec.env.get("ARGUMENTS", "").split()


def _usb_hosts(spec: ContainerSpec) -> list[dict[str, str]]:
    args = _qemu_args(spec)
    out = []
    for i, a in enumerate(args):
        if a in ("-device", "--device") and i + 1 < len(args):
            props = parse_opts(args[i + 1], "driver")
            if props.get("driver") == "usb-host":
                out.append(props)
    return out


def _specs(ctx: DoctorContext) -> tuple[list[ContainerSpec], list[Finding]]:
    scan = ctx.containers
    pre: list[Finding] = []
    specs = [c for c in scan.containers if c.uses_usb()]
    if not scan.containers:
        if not scan.api_reached and not ctx.compose_files and not ctx.inspect_files:
            pre.append(
                Finding(
                    LAYER,
                    "container.engine",
                    Severity.INFO,
                    "no Docker or Podman API socket here, and no --compose or --inspect given: "
                    "container checks skipped",
                    evidence=tuple(scan.notes),
                    fix="for a container setup, run where the engine runs, or pass "
                    "--compose docker-compose.yml (or --inspect FILE from `docker inspect`)",
                )
            )
        else:
            pre.append(
                Finding(
                    LAYER,
                    "container.engine",
                    Severity.OK,
                    "no containers",
                    evidence=tuple(scan.notes),
                )
            )
    elif not specs:
        pre.append(
            Finding(
                LAYER,
                "container.engine",
                Severity.OK,
                f"{len(scan.containers)} containers, none passes USB devices",
                evidence=tuple(scan.notes),
            )
        )
    return specs, pre


def _usb_device_nodes(spec: ContainerSpec, dev_root: str) -> list[str]:
    """The USB device nodes among a container's ``devices:``, also those given
    by a symlink (``/dev/focusrite_4i4`` from a udev rule: the engine resolves
    it once, at container start, to the ``/dev/bus/usb`` node of that moment;
    its inspect document keeps the name as given)."""
    found: list[str] = []
    for dev in spec.devices:
        if dev.startswith("/dev/bus/usb"):
            found.append(dev)
        elif dev.startswith("/dev/"):
            real = os.path.realpath(posixpath.join(dev_root, dev[len("/dev/") :]))
            rel = os.path.relpath(real, os.path.realpath(dev_root))
            if rel.startswith("bus/usb/"):
                found.append(f"{dev} -> /dev/{rel}")
    return found


def check_devices(ctx: DoctorContext) -> Iterator[Finding]:
    """``/dev/bus/usb`` as ``devices:`` (made once at start) instead of a bind mount."""
    specs, pre = _specs(ctx)
    yield from pre
    for spec in specs:
        as_devices = _usb_device_nodes(spec, str(ctx.dev_root))
        bind = _usb_bind(spec)
        if as_devices:
            yield _f(
                "container.devices",
                Severity.ERROR,
                "/dev/bus/usb is passed as devices: its nodes are created once, at container "
                "start, so a replugged device (new device number) never appears inside",
                spec,
                evidence=tuple(f"devices: {d}" for d in as_devices),
                fix=compose_fix(),
            )
        elif bind is None:
            yield _f(
                "container.devices",
                Severity.ERROR if _usb_hosts(spec) else Severity.WARNING,
                "no /dev/bus/usb bind mount: QEMU in the container cannot open host USB devices",
                spec,
                evidence=tuple(f"bind {s}:{d}" for s, d in spec.binds) or ("no bind mounts",),
                fix=compose_fix(),
            )
        else:
            yield _f(
                "container.devices",
                Severity.OK,
                "/dev/bus/usb is bind-mounted (replugged devices appear)",
                spec,
                evidence=(f"bind {bind[0]}:{bind[1]}",),
            )


def check_cgroup(ctx: DoctorContext) -> Iterator[Finding]:
    """The device cgroup must allow USB nodes (``c 189:* rwm``) unless privileged."""
    specs, _ = _specs(ctx)
    for spec in specs:
        if spec.privileged:
            yield _f("container.cgroup", Severity.OK, "privileged: every device allowed", spec)
            continue
        rule = _cgroup_ok(spec.cgroup_rules)
        if rule:
            yield _f(
                "container.cgroup",
                Severity.OK,
                f"device cgroup rule {rule!r} allows USB nodes",
                spec,
            )
            continue
        if spec.podman and spec.cgroup_rules_unknown:
            yield _f(
                "container.cgroup",
                Severity.INFO,
                "Podman does not say whether the container has a device cgroup rule "
                "(its Docker-compatible inspect gives DeviceCgroupRules: null, also for a "
                "container made with --device-cgroup-rule): without one, opening "
                "/dev/bus/usb nodes fails with EPERM",
                spec,
                evidence=("HostConfig.DeviceCgroupRules: null", "HostConfig.Runtime: oci"),
                fix=f"make sure the service has:\n    device_cgroup_rules:\n      - "
                f"'{_gc().USB_CGROUP_RULE}'\n(podman run: --device-cgroup-rule="
                f"'{_gc().USB_CGROUP_RULE}'; vmplug doctor --compose FILE checks the file)",
            )
            continue
        sev = Severity.ERROR if _usb_bind(spec) else Severity.WARNING
        yield _f(
            "container.cgroup",
            sev,
            f"no device_cgroup_rules '{_gc().USB_CGROUP_RULE}' and not privileged: opening "
            "/dev/bus/usb nodes fails with EPERM",
            spec,
            evidence=(f"DeviceCgroupRules: {spec.cgroup_rules}", "Privileged: false"),
            fix=f"    device_cgroup_rules:\n      - '{_gc().USB_CGROUP_RULE}'",
        )


ROOTLESS_FIX = """\
let the host user open the device nodes, and keep that group in the container:
  vmplug generate udev DEVICE --group kvm --install   # the node's group on the host
  usermod -aG kvm USER                                # the user podman runs as
  # compose service (Podman only: Docker has no keep-groups):
  group_add:
    - keep-groups
or run the container with rootful Podman (sudo podman compose up, or the system podman.socket)"""


def check_rootless_podman(ctx: DoctorContext) -> Iterator[Finding]:
    """Rootless Podman: device_cgroup_rules does nothing (the container gets no device
    cgroup of its own); a /dev/bus/usb node opens only if the host user may open it."""
    scan = ctx.containers
    for engine in scan.engines:
        if not engine.rootless_podman:
            continue
        theirs = [c.name for c in scan.containers if c.rootless_podman and c.uses_usb()]
        files = [c for c in scan.containers if not c.rootless_podman and c.uses_usb()]
        about = f": {', '.join(theirs)}" if theirs else ""
        if files and not theirs:
            about = f" (where {', '.join(c.name for c in files)} would run)"
        yield Finding(
            LAYER,
            "container.rootless-podman",
            Severity.WARNING,
            f"{engine.address} is rootless Podman {engine.version}{about}: device_cgroup_rules "
            "does nothing there; a container opens /dev/bus/usb nodes only as far as the "
            "host user may",
            evidence=engine.evidence,
            fix=ROOTLESS_FIX,
            subject=engine.address,
        )


def check_selinux(ctx: DoctorContext) -> Iterator[Finding]:
    """SELinux enforcing: container_t may not open usb_device_t without label=disable."""
    specs, _ = _specs(ctx)
    if not specs:
        return
    try:
        enforce = ctx.selinux_enforce.read_text().strip()
    except OSError:
        enforce = None
    for spec in specs:
        disabled = any(
            re.sub(r"[:=]", "=", o.replace(" ", "")) == "label=disable" for o in spec.security_opt
        )
        if enforce != "1":
            state = "not enforcing" if enforce == "0" else f"absent ({ctx.selinux_enforce})"
            yield _f(
                "container.selinux",
                Severity.OK,
                f"SELinux {state}",
                spec,
                evidence=(f"{ctx.selinux_enforce} = {enforce}",),
            )
        elif spec.privileged or disabled:
            yield _f(
                "container.selinux",
                Severity.OK,
                "SELinux enforcing, labels disabled for this container",
                spec,
                evidence=(f"SecurityOpt: {spec.security_opt}", f"Privileged: {spec.privileged}"),
            )
        else:
            yield _f(
                "container.selinux",
                Severity.WARNING,
                "SELinux is enforcing and the container keeps its labels: the container "
                "process (container_t) is denied opening USB nodes (usb_device_t)",
                spec,
                evidence=(f"{ctx.selinux_enforce} = 1", f"SecurityOpt: {spec.security_opt}"),
                fix="    security_opt:\n      - label=disable\n"
                "# (check with: ausearch -m avc -ts recent | grep usb)",
            )


#: QEMU's USB host controllers (``-device DRIVER``): what the image's ``USB`` names.
XHCI_DRIVERS = ("qemu-xhci", "nec-usb-xhci")
CONTROLLER_DRIVERS = (
    *XHCI_DRIVERS,
    "usb-ehci",
    "ich9-usb-ehci1",
    "ich9-usb-ehci2",
    "ich9-usb-uhci1",
    "ich9-usb-uhci2",
    "ich9-usb-uhci3",
    "ich9-usb-uhci4",
    "ich9-usb-uhci5",
    "ich9-usb-uhci6",
    "piix3-usb-uhci",
    "piix4-usb-uhci",
    "vt82c686b-usb-uhci",
    "pci-ohci",
    "sysbus-ohci",
)
#: The image's default controller (qemus/qemu ``src/config.sh``: ``: "${USB:=...}"``).
IMAGE_USB = "qemu-xhci,id=xhci,p2=7,p3=7"
USB_ON = ("", "y", "yes", "1", "on", "true", "enabled")


def image_controller(spec: ContainerSpec) -> str | None:
    """The ``-device`` the image's scripts make of ``USB`` (``configureUsb``:
    ``-device $USB``; empty means the default, ``no`` none)."""
    value = spec.env.get("USB")
    if value is None or value.strip().lower() in USB_ON:
        return IMAGE_USB
    if value.strip().lower() in USB_OFF:
        return None
    return value.strip()


def _controllers(spec: ContainerSpec) -> list[tuple[str, dict[str, str]]]:
    """(where, properties) of every USB controller the container's QEMU gets."""
    out: list[tuple[str, dict[str, str]]] = []
    image = image_controller(spec)
    if image is not None:
        props = parse_opts(image, "driver")
        if props.get("driver") in CONTROLLER_DRIVERS:
            out.append(("USB", props))
    args = _qemu_args(spec)
    for i, a in enumerate(args):
        if a in ("-device", "--device") and i + 1 < len(args):
            props = parse_opts(args[i + 1], "driver")
            if props.get("driver") in CONTROLLER_DRIVERS:
                out.append(("ARGUMENTS", props))
    return out


def check_usb_env(ctx: DoctorContext) -> Iterator[Finding]:
    """``USB=N`` starts QEMU without its USB controller; ``USB`` set to a device
    (``0x1234:0x5678``) is passed as ``-device 0x1234:0x5678`` and QEMU does not start."""
    specs, _ = _specs(ctx)
    for spec in specs:
        value = spec.env.get("USB")
        image = image_controller(spec)
        driver = parse_opts(image, "driver").get("driver", "") if image else ""
        state = []
        if spec.running is False:
            state.append(f"container not running (ExitCode {spec.exit_code})")
        if value is not None and image is None:
            yield _f(
                "container.usb-env",
                Severity.ERROR,
                f"USB={value}: the image starts QEMU without a USB controller, so no usb-host "
                "device has a bus",
                spec,
                evidence=(f"environment USB={value}",),
                fix="remove USB from environment: (the image's default is a qemu-xhci "
                f"controller), or set USB: {IMAGE_USB}",
            )
        elif image is not None and driver not in CONTROLLER_DRIVERS:
            wanted = re.fullmatch(r"(?:0x)?([0-9a-fA-F]{4}):(?:0x)?([0-9a-fA-F]{4})", image)
            device = (
                f"vendorid=0x{wanted.group(1).lower()},productid=0x{wanted.group(2).lower()}"
                if wanted
                else "vendorid=0xVVVV,productid=0xPPPP"
            )
            ids = f"{wanted.group(1).lower()}:{wanted.group(2).lower()}" if wanted else "VVVV:PPPP"
            yield _f(
                "container.usb-env",
                Severity.ERROR,
                f"USB={value} is not a USB controller: the image passes USB to QEMU as "
                f"'-device {image}' (its controller), so QEMU does not start "
                f"({driver!r} is not a device model) and no device is passed",
                spec,
                evidence=(
                    f"environment USB={value}",
                    f"the image's scripts: -device {image}",
                    *state,
                ),
                fix=f"USB names the image's USB controller, not a device: remove USB (default "
                f"{IMAGE_USB}) and pass the device by a vmplug rule:\n"
                f"  vmplug generate compose {ids} --merge docker-compose.yml\n"
                f'or in environment: ARGUMENTS: "-device usb-host,bus=xhci.0,{device}"',
            )
        else:
            yield _f(
                "container.usb-env",
                Severity.OK,
                "USB controller on" + (f" (USB={value})" if value else " (image default)"),
                spec,
            )


def _vm_for(ctx: DoctorContext, spec: ContainerSpec) -> Any:
    for vm in ctx.config.vms.values() if ctx.config is not None else ():
        if vm.container and vm.container == spec.name:
            return vm
    return None


def check_controllers(ctx: DoctorContext) -> Iterator[Finding]:
    """Two USB controllers (the image's ``USB`` and another in ``ARGUMENTS``):
    vmplug attaches to a single xHCI bus only; with two it needs ``usb_bus``."""
    specs, _ = _specs(ctx)
    for spec in specs:
        ctrls = _controllers(spec)
        xhci = [(w, p) for w, p in ctrls if p.get("driver") in XHCI_DRIVERS]
        ehci = [(w, p) for w, p in ctrls if "ehci" in p.get("driver", "")]
        if len(ctrls) < 2:
            continue
        names = [f"{p.get('id', '?')}.0 ({p.get('driver')}, from {w})" for w, p in ctrls]
        evidence = tuple(
            f"{w}: -device " + ",".join(f"{k}={v}" if k != "driver" else v for k, v in p.items())
            for w, p in ctrls
        )
        ids = [p["id"] for _, p in ctrls if p.get("id")]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            yield _f(
                "container.controllers",
                Severity.ERROR,
                f"{len(ctrls)} USB controllers with the same id {twice[0]!r}: QEMU does not "
                f"start (\"Duplicate ID '{twice[0]}' for device\")",
                spec,
                evidence=evidence,
                fix="remove the controller from ARGUMENTS: the image adds its own "
                f"(USB, default {IMAGE_USB}); for more ports set USB to it, e.g. "
                "USB: qemu-xhci,id=xhci,p2=15,p3=15",
            )
            continue
        vm = _vm_for(ctx, spec)
        bus = getattr(vm, "usb_bus", None) if vm is not None else None
        image = next((p for w, p in ctrls if w == "USB"), None)
        image_bus = f"{image.get('id', 'xhci')}.0" if image else f"{ctrls[0][1].get('id')}.0"
        if bus:
            yield _f(
                "container.controllers",
                Severity.OK,
                f"{len(ctrls)} USB controllers; vmplug attaches on usb_bus = {bus!r} "
                f"([vm.{vm.name}])",
                spec,
                evidence=evidence,
            )
        elif len(xhci) == 1 or (not xhci and len(ehci) == 1):
            kind, (_, one) = ("xHCI", xhci[0]) if xhci else ("EHCI", ehci[0])
            yield _f(
                "container.controllers",
                Severity.OK,
                f"{len(ctrls)} USB controllers; vmplug attaches on the one {kind} bus, "
                f"{one.get('id', '?')}.0 (vms.base.pick_usb_bus)",
                spec,
                evidence=evidence,
            )
        else:
            yield _f(
                "container.controllers",
                Severity.WARNING,
                f"{len(ctrls)} USB controllers: {', '.join(names)}; vmplug attaches only on a "
                "single xHCI bus and refuses to choose between these (no usb_bus for "
                "this container in the config)",
                spec,
                evidence=evidence,
                fix=f"in vmplug's config, [vm.{vm.name if vm else spec.name}]: usb_bus = "
                f'"{image_bus}" (the image\'s own controller, where vmplug generate compose '
                "puts the devices); or drop the second controller from ARGUMENTS",
            )


def check_qmp(ctx: DoctorContext) -> Iterator[Finding]:
    """A QMP socket for vmplug, in a folder bind-mounted from the host."""
    specs, _ = _specs(ctx)
    for spec in specs:
        found = qmp_socket(spec)
        if found is None:
            yield _f(
                "container.qmp",
                Severity.WARNING,
                "no QMP socket for vmplug (the image's own monitor is private to its scripts)",
                spec,
                evidence=(
                    f"ARGUMENTS={spec.env.get('ARGUMENTS', '')!r}",
                    f"QMP={spec.env.get('QMP', '')!r}",
                ),
                fix=f'    environment:\n      ARGUMENTS: "-qmp unix:{_gc().QMP_CONTAINER_SOCKET},'
                f'server=on,wait=off ..."\n    volumes:\n      - ./qmp:{_gc().QMP_CONTAINER_DIR}',
            )
            continue
        where, path = found
        host = host_path(spec, path)
        if host is None:
            yield _f(
                "container.qmp",
                Severity.WARNING,
                f"QMP socket {path} is not in a folder bind-mounted from the host: "
                "vmplug on the host cannot reach it",
                spec,
                evidence=(f"{where}: -qmp unix:{path}", *(f"bind {s}:{d}" for s, d in spec.binds)),
                fix=f"    volumes:\n      - ./qmp:{os.path.dirname(path) or '/qmp'}",
            )
            continue
        evidence = [f"{where}: -qmp unix:{path}", f"host path {host}"]
        try:
            is_sock = stat.S_ISSOCK(os.stat(host).st_mode)
        except OSError:
            is_sock = None
        if is_sock is None and spec.running:
            yield _f(
                "container.qmp",
                Severity.WARNING,
                f"QMP socket should be at {host} on the host but is not there",
                spec,
                evidence=tuple(evidence),
                fix="restart the container; check the bind mount's host folder exists",
            )
        else:
            if is_sock:
                evidence.append(f"{host}: a socket")
            where_now = "is" if is_sock else "will be (once the container runs)"
            if spec.running is False:
                # a socket file a QEMU that is gone left behind answers no one
                evidence.append(f"container not running (ExitCode {spec.exit_code})")
                where_now = "will be (once the container runs)"
            yield _f(
                "container.qmp",
                Severity.OK,
                f"vmplug's QMP socket {where_now} reachable from the host at {host}",
                spec,
                evidence=tuple(evidence),
            )


def check_arguments(ctx: DoctorContext) -> Iterator[Finding]:
    """``usb-host`` in ARGUMENTS matched by ``hostaddr``/``hostdevice``: lost on replug."""
    specs, _ = _specs(ctx)
    for spec in specs:
        hosts = _usb_hosts(spec)
        bad = [h for h in hosts if h.get("hostaddr") or h.get("hostdevice")]
        if bad:
            yield _f(
                "container.arguments",
                Severity.WARNING,
                f"{len(bad)} usb-host in ARGUMENTS matched by device address: QEMU never "
                "takes the device again after a replug (new address)",
                spec,
                evidence=tuple(
                    "-device " + ",".join(f"{k}={v}" for k, v in h.items()) for h in bad
                ),
                fix="match by vendorid/productid, or hostbus+hostport: "
                "vmplug generate compose DEVICE --merge docker-compose.yml",
            )
        elif hosts:
            yield _f(
                "container.arguments",
                Severity.OK,
                f"{len(hosts)} usb-host in ARGUMENTS, none by address",
                spec,
            )


CHECKS = (
    CheckSpec(LAYER, "container.devices", check_devices),
    CheckSpec(LAYER, "container.cgroup", check_cgroup),
    CheckSpec(LAYER, "container.rootless-podman", check_rootless_podman),
    CheckSpec(LAYER, "container.selinux", check_selinux),
    CheckSpec(LAYER, "container.usb-env", check_usb_env),
    CheckSpec(LAYER, "container.controllers", check_controllers),
    CheckSpec(LAYER, "container.qmp", check_qmp),
    CheckSpec(LAYER, "container.arguments", check_arguments),
)
