# ruff: noqa: PTH110, PTH115, PTH116, PTH118, PTH208
# (/proc, /dev and sysfs walks use plain os calls on string paths, like host/sysfs.py)
"""Host-layer checks: the device itself, the kernel's view of it, who holds it."""

from __future__ import annotations

import os
import re
import stat
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.model import CLASS_AUDIO, FULL_SPEED, HIGH_SPEED, SUPER_SPEED, UsbDevice

LAYER = "host"
_PORT = re.compile(r"^\d+-\d+(\.\d+)*$")


def _f(check: str, sev: Severity, title: str, **kw: object) -> Finding:
    return Finding(LAYER, check, sev, title, **kw)  # type: ignore[arg-type]


def _name(dev: UsbDevice) -> str:
    name = dev.display_name
    return f"{dev.port} ({dev.vidpid or '????:????'}{' ' + name if name else ''})"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---------------------------------------------------------------- present


def check_present(ctx: DoctorContext) -> Iterator[Finding]:
    """DEVICE is plugged in; when not, when it was last seen and what the kernel said."""
    if not ctx.device:
        n = sum(1 for d in ctx.devices if not d.is_root_hub)
        yield _f("host.present", Severity.OK, f"{n} USB devices under {ctx.sysfs_root}")
        return
    found = ctx.selected
    hist = ctx.history
    if found:
        for dev in found:
            evidence = [f"{dev.sysfs_path}: bus {dev.busnum} device {dev.devnum}"]
            if hist is not None:
                known = hist.known_device(dev.identity)
                if known:
                    evidence.append(
                        f"history: first seen {_when(known['first_seen'])}, "
                        f"last seen {_when(known['last_seen'])}"
                    )
                last_add = [
                    e
                    for e in hist.history(dev.identity, limit=50, include_global=False)
                    if e.kind == "device-add"
                ]
                if last_add:
                    evidence.append(f"history: present since {_when(last_add[-1].ts)}")
            yield _f(
                "host.present",
                Severity.OK,
                f"{_name(dev)} is present",
                evidence=tuple(evidence),
                subject=dev.port,
            )
        return
    evidence = [f"no device under {ctx.sysfs_root}/bus/usb/devices matches {ctx.device!r}"]
    port = None
    if hist is not None:
        for known in hist.known_devices():
            if _known_matches(known, ctx.device):
                port = known.get("port")
                evidence.append(
                    f"history: {known.get('identity')} last seen {_when(known['last_seen'])} "
                    f"at port {port} (first seen {_when(known['first_seen'])})"
                )
                break
    if port is None and _PORT.match(ctx.device):
        port = ctx.device
    if port:
        with_port = [ln for ln in _log_lines(ctx) if f"usb {port}:" in ln]
        evidence += [f"kernel: {ln}" for ln in with_port[-3:]]
    yield _f(
        "host.present",
        Severity.ERROR,
        f"{ctx.device} is not plugged in (not in the host's USB tree)",
        evidence=tuple(evidence),
        fix="plug it in (another cable, port or powered hub if it keeps dropping out); "
        "`vmplug list` shows what the host sees, `vmplug history` when it left",
        subject=ctx.device,
    )


def _known_matches(known: dict[str, object], selector: str) -> bool:
    sel = selector.strip()
    if known.get("port") == sel or known.get("serial") == sel:
        return True
    return bool(re.match(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$", sel)) and (
        str(known.get("vidpid", known.get("id", ""))).lower() == sel.lower()
        or str(known.get("identity", "")).lower().startswith(sel.lower() + "/")
    )


# ---------------------------------------------------------------- kernel log

#: (kind, severity, pattern); group 1 is the kernel device name
KERNEL_PATTERNS: tuple[tuple[str, Severity, re.Pattern[str]], ...] = (
    (
        "descriptor read error",
        Severity.ERROR,
        re.compile(r"usb (\S+): device descriptor read/\S+, error (-?\d+)"),
    ),
    (
        "not accepting address",
        Severity.ERROR,
        re.compile(r"usb (\S+): device not accepting address \d+, error (-?\d+)"),
    ),
    (
        "cannot enumerate",
        Severity.ERROR,
        re.compile(r"usb (\S+): (?:unable to enumerate USB device|cannot reset)"),
    ),
    ("over-current", Severity.ERROR, re.compile(r"usb (\S+): over-current")),
    ("disconnect", Severity.INFO, re.compile(r"usb (\S+): USB disconnect, device number \d+")),
    ("reset", Severity.INFO, re.compile(r"usb (\S+): reset \S+ USB device number \d+")),
)
#: this many resets or disconnects of one port in the log: the link is flapping
FLAPPING = 3
_HUB_PORT = re.compile(r"^usb(\d+)-port(\d+)$")


def _port_of(kname: str) -> str:
    """``usb2-port1`` (a root-hub port) -> ``2-1``; ``2-2.1`` stays."""
    m = _HUB_PORT.match(kname)
    return f"{m.group(1)}-{m.group(2)}" if m else kname


def _log_lines(ctx: DoctorContext) -> list[str]:
    return [ln for ln in ctx.kernel_log.splitlines() if "usb" in ln]


def check_kernel_log(ctx: DoctorContext) -> Iterator[Finding]:
    """USB errors, disconnects, resets and over-current in the kernel log, per port."""
    try:
        lines = _log_lines(ctx)
    except OSError as exc:
        yield _f(
            "host.kernel-log",
            Severity.INFO,
            f"cannot read the kernel log: {exc}",
            fix="run as root (or sysctl kernel.dmesg_restrict=0), or pass --kernel-log FILE "
            "(the output of `journalctl -k` or `dmesg`)",
        )
        return
    ports: set[str] | None = None
    if ctx.device:
        ports = {d.port for d in ctx.selected}
        if not ports and _PORT.match(ctx.device):
            ports = {ctx.device}
    hits: dict[tuple[str, str], list[str]] = defaultdict(list)
    sev_of: dict[str, Severity] = {}
    for ln in lines:
        for kind, sev, pat in KERNEL_PATTERNS:
            m = pat.search(ln)
            if m:
                port = _port_of(m.group(1))
                if ports is None or port in ports:
                    hits[(port, kind)].append(ln.strip())
                    sev_of[kind] = sev
                break
    if not hits:
        where = f" for {', '.join(sorted(ports))}" if ports else ""
        yield _f("host.kernel-log", Severity.OK, f"no USB errors in the kernel log{where}")
        return
    for (port, kind), found in sorted(hits.items()):
        sev = sev_of[kind]
        if kind in ("reset", "disconnect") and len(found) >= FLAPPING:
            sev = Severity.WARNING
        fix = None
        if sev >= Severity.WARNING:
            fix = (
                "a link that resets or drops repeatedly: try another cable and port, a powered "
                "hub, a port on another controller (`vmplug list --tree`); keep autosuspend off "
                "(`vmplug generate udev DEVICE`)"
            )
            if kind == "over-current":
                fix = "the device draws more than the port gives: use a powered hub"
        yield _f(
            "host.kernel-log",
            sev,
            f"{port}: {kind} in the kernel log ({len(found)}x)",
            evidence=tuple(found[-5:]),
            fix=fix,
            subject=port,
        )


# ---------------------------------------------------------------- autosuspend


def _is_audio_or_midi(dev: UsbDevice) -> bool:
    return dev.has_interface_class(CLASS_AUDIO)


def check_autosuspend(ctx: DoctorContext) -> Iterator[Finding]:
    """Audio and MIDI devices must not autosuspend (power/control = auto)."""
    pool = ctx.selected if ctx.device else [d for d in ctx.devices if not d.is_root_hub]
    audio = [d for d in pool if _is_audio_or_midi(d)]
    if not audio:
        yield _f("host.autosuspend", Severity.OK, "no audio or MIDI device to check")
        return
    for dev in audio:
        where = f"{dev.sysfs_path}/power/control"
        if dev.power_control == "auto":
            from vmplug.generate.udev import plan_udev, render_rules  # noqa: PLC0415

            try:
                rule = render_rules(plan_udev([dev]))
            except Exception:
                rule = ""
            yield _f(
                "host.autosuspend",
                Severity.WARNING,
                f"{_name(dev)}: autosuspend is on for an audio/MIDI device",
                evidence=(f"{where} = auto",),
                fix=f"echo on > {where}\n# and for good, a udev rule "
                "(vmplug generate udev " + dev.port + " --install):\n" + rule,
                subject=dev.port,
            )
        else:
            yield _f(
                "host.autosuspend",
                Severity.OK,
                f"{_name(dev)}: autosuspend off",
                evidence=(f"{where} = {dev.power_control}",),
                subject=dev.port,
            )


# ---------------------------------------------------------------- holders


def _fd_holders(proc_root: Path, wanted: set[str]) -> dict[str, list[tuple[int, str]]]:
    """For each path in ``wanted``: the (pid, comm) of processes with it open."""
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    if not wanted:
        return out
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = proc_root / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        seen: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target in wanted and target not in seen:
                seen.add(target)
                try:
                    comm = (proc_root / pid / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                out[target].append((int(pid), comm))
    return out


def _sound_nodes(dev: UsbDevice, dev_root: Path) -> list[str]:
    """The /dev/snd nodes of the ALSA card(s) on the device's interfaces."""
    nodes: list[str] = []
    if not dev.sysfs_path:
        return nodes
    for iface in dev.interfaces:
        sound = Path(f"{dev.sysfs_path}/{dev.port}:{dev.configuration}.{iface.number}/sound")
        try:
            cards = [c for c in os.listdir(sound) if c.startswith("card")]
        except OSError:
            continue
        for card in cards:
            n = card[4:]
            try:
                names = os.listdir(dev_root / "snd")
            except OSError:
                continue
            for name in names:
                if re.match(rf"^(controlC{n}|pcmC{n}D\d+[pc]|midiC{n}D\d+|hwC{n}D\d+)$", name):
                    nodes.append(str(dev_root / "snd" / name))
    return sorted(set(nodes))


def _usb_node(dev: UsbDevice, dev_root: Path) -> Path | None:
    if dev.busnum is None or dev.devnum is None:
        return None
    return dev_root / "bus" / "usb" / f"{dev.busnum:03d}" / f"{dev.devnum:03d}"


def check_holders(ctx: DoctorContext) -> Iterator[Finding]:
    """Host drivers bound to a device meant for a VM, and processes that have it open."""
    targets = ctx.targets
    if not targets:
        yield _f(
            "host.holders",
            Severity.OK,
            "no device is meant for a VM (no DEVICE, no config rule, no usb-host takes one)",
        )
        return
    for dev in targets:
        drivers = sorted({i.driver for i in dev.interfaces if i.driver and i.driver != "usbfs"})
        node = _usb_node(dev, ctx.dev_root)
        snd = _sound_nodes(dev, ctx.dev_root)
        wanted = set(snd) | ({str(node)} if node else set())
        holders = _fd_holders(ctx.proc_root, wanted)
        usb_holders = holders.get(str(node), []) if node else []
        snd_holders = sorted({h for n in snd for h in holders.get(n, [])})
        qemu_holds = any("qemu" in comm or "kvm" in comm for _, comm in usb_holders)
        others = [h for h in usb_holders if "qemu" not in h[1] and "kvm" not in h[1]]
        evidence = [
            f"{dev.sysfs_path}/{dev.port}:{dev.configuration}.{i.number}/driver -> {i.driver}"
            for i in dev.interfaces
            if i.driver
        ]
        evidence += [f"{node} open by {comm} (pid {pid})" for pid, comm in usb_holders]
        evidence += [f"sound card open by {comm} (pid {pid})" for pid, comm in snd_holders]
        if others and not qemu_holds:
            yield _f(
                "host.holders",
                Severity.ERROR,
                f"{_name(dev)}: {', '.join(c for _, c in others)} holds its USB node: "
                "QEMU cannot claim it",
                evidence=tuple(evidence),
                fix="stop " + ", ".join(f"{c} (pid {p})" for p, c in others) + " first",
                subject=dev.port,
            )
        elif drivers:
            apps = ", ".join(sorted({c for _, c in snd_holders}))
            title = f"{_name(dev)}: held by the host driver {', '.join(drivers)}"
            if apps:
                title += f", in use by {apps}"
            fix = (
                f"let a VM take it: `vmplug attach {dev.port} --vm VM` (QEMU's usb-host "
                "detaches the host driver when it claims the device); if a usb-host should "
                "already hold it, see the qemu layer for why it waits"
            )
            if apps:
                fix = (
                    f"{apps} will lose the device (and may grab it back on replug): "
                    "`systemctl --user stop pipewire pipewire-pulse wireplumber` or turn the "
                    "card off (`pactl set-card-profile <card> off`), or blacklist the driver "
                    "for this id; then let QEMU claim it"
                )
            yield _f(
                "host.holders",
                Severity.WARNING,
                title + " (not passed through)",
                evidence=tuple(evidence),
                fix=fix,
                subject=dev.port,
            )
        else:
            who = "QEMU" if qemu_holds else "nobody"
            yield _f(
                "host.holders",
                Severity.OK,
                f"{_name(dev)}: no host driver; held by {who}",
                evidence=tuple(evidence),
                subject=dev.port,
            )


# ---------------------------------------------------------------- device node


def check_devnode(ctx: DoctorContext) -> Iterator[Finding]:
    """The /dev/bus/usb/BBB/DDD node exists, is the device's, and QEMU may open it."""
    targets = ctx.targets
    if not targets:
        yield _f("host.devnode", Severity.OK, "no device is meant for a VM")
        return
    for dev in targets:
        node = _usb_node(dev, ctx.dev_root)
        if node is None:
            continue
        want = None
        if dev.sysfs_path:
            try:
                want = Path(dev.sysfs_path, "dev").read_text().strip()
            except OSError:
                want = None
        try:
            st = os.stat(node)
        except FileNotFoundError:
            yield _f(
                "host.devnode",
                Severity.ERROR,
                f"{_name(dev)}: {node} does not exist",
                evidence=(f"sysfs dev = {want}", f"stat {node}: no such file"),
                fix="devtmpfs is not mounted on /dev or udev did not run: "
                "`mount -t devtmpfs devtmpfs /dev`; in a container bind-mount /dev/bus/usb",
                subject=dev.port,
            )
            continue
        have = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        mode = stat.filemode(st.st_mode)
        evidence = [f"{node}: {mode} uid {st.st_uid} gid {st.st_gid} dev {have}"]
        if want:
            evidence.append(f"{dev.sysfs_path}/dev = {want}")
        if not stat.S_ISCHR(st.st_mode) or (want and want != have):
            yield _f(
                "host.devnode",
                Severity.ERROR,
                f"{_name(dev)}: {node} is not this device's node (stale)",
                evidence=tuple(evidence),
                fix=f"rm {node} && udevadm trigger --subsystem-match=usb (or reboot)",
                subject=dev.port,
            )
            continue
        users = _qemu_users(ctx)
        denied = [u for u in users if not _may_rw(st, *u[1:])]
        if denied:
            from vmplug.generate.udev import plan_udev, render_rules  # noqa: PLC0415

            yield _f(
                "host.devnode",
                Severity.ERROR,
                f"{_name(dev)}: QEMU ({', '.join(n for n, *_ in denied)}) may not open {node}",
                evidence=tuple(evidence)
                + tuple(f"{n}: uid {u} gids {sorted(g)}" for n, u, g in denied),
                fix="a udev rule giving the group access (vmplug generate udev "
                f"{dev.port} --group GROUP --install):\n" + render_rules(plan_udev([dev])),
                subject=dev.port,
            )
        else:
            yield _f(
                "host.devnode",
                Severity.OK,
                f"{_name(dev)}: {node} is its node" + (" and QEMU may open it" if users else ""),
                evidence=tuple(evidence),
                subject=dev.port,
            )


def _qemu_users(ctx: DoctorContext) -> list[tuple[str, int, set[int]]]:
    out: list[tuple[str, int, set[int]]] = []
    try:
        qemus = ctx.qemus
    except Exception:
        return out
    for q in qemus:
        if q.pid is None:
            continue
        try:
            status = (ctx.proc_root / str(q.pid) / "status").read_text()
        except OSError:
            continue
        uid, gids = 0, set()
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[2])  # effective
            elif line.startswith("Gid:"):
                gids.add(int(line.split()[2]))
            elif line.startswith("Groups:"):
                gids |= {int(g) for g in line.split()[1:]}
        out.append((f"{q.name} pid {q.pid}", uid, gids))
    return out


def _may_rw(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid in gids:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


# ---------------------------------------------------------------- bandwidth

#: Periodic (isochronous + interrupt) share the USB 2.0 spec allows (5.6.4, 5.7.4).
PERIODIC_SHARE_HS = 0.8
PERIODIC_SHARE_FS = 0.9


def bandwidth_domains(devices: list[UsbDevice]) -> dict[str, tuple[float, list[UsbDevice]]]:
    """Domain name -> (capacity bit/s, devices sharing it).

    A high-speed (or faster) device shares its bus; a full/low-speed device
    shares the 12 Mbit/s of its transaction translator: the tree under the
    topmost full-speed device below a high-speed hub or an xHCI root port
    (which has a TT of its own); on a USB 1.1 controller (UHCI/OHCI, an
    EHCI's companion) the whole bus shares one 12 Mbit/s schedule.
    """
    by_port = {d.port: d for d in devices}
    domains: dict[str, tuple[float, list[UsbDevice]]] = {}
    for dev in devices:
        if dev.is_root_hub or dev.speed_mbps is None:
            continue
        if dev.speed_mbps >= HIGH_SPEED:
            speed = SUPER_SPEED if dev.speed_mbps >= SUPER_SPEED else HIGH_SPEED
            share = PERIODIC_SHARE_FS if speed >= SUPER_SPEED else PERIODIC_SHARE_HS
            key = f"bus {dev.busnum} ({speed:g} Mbit/s)"
            cap = speed * 1e6 * share
        else:
            root = by_port.get(f"usb{dev.busnum}")
            top = dev
            while True:
                parent = by_port.get(top.parent_port or "")
                if parent is None or parent.is_root_hub or (parent.speed_mbps or 0) >= HIGH_SPEED:
                    break
                top = parent
            if root is not None and (root.speed_mbps or 0) < HIGH_SPEED:
                # a USB 1.1 controller (UHCI/OHCI, or an EHCI's companion): one
                # 12 Mbit/s schedule for every port of it
                key = f"bus {dev.busnum} (USB 1.1 controller, 12 Mbit/s)"
            else:
                key = f"full-speed tree under {top.port} (12 Mbit/s)"
            cap = FULL_SPEED * 1e6 * PERIODIC_SHARE_FS
        domains.setdefault(key, (cap, []))[1].append(dev)
    return domains


def check_bandwidth(ctx: DoctorContext) -> Iterator[Finding]:
    """Isochronous bandwidth per bus / transaction translator against what it can carry."""
    domains = bandwidth_domains(ctx.devices)
    over = False
    for key, (cap, devs) in sorted(domains.items()):
        iso = [(d, d.iso_bandwidth_bps()) for d in devs]
        total = sum(b for _, b in iso)
        if total <= cap:
            continue
        over = True
        yield _f(
            "host.bandwidth",
            Severity.ERROR,
            f"{key}: isochronous endpoints need {total / 1e6:.1f} Mbit/s, "
            f"more than the {cap / 1e6:.1f} Mbit/s it can reserve",
            evidence=tuple(
                f"{_name(d)}: {b / 1e6:.2f} Mbit/s (largest alternate setting, from descriptors)"
                for d, b in iso
                if b
            ),
            fix="move the audio devices to ports on different controllers or a high-speed "
            "(multi-TT) hub; `vmplug list --tree` shows which port hangs where",
            subject=key,
        )
    if not over:
        yield _f(
            "host.bandwidth",
            Severity.OK,
            f"isochronous bandwidth fits on every bus ({len(domains)} bandwidth domains)",
        )


# ---------------------------------------------------------------- controller sharing


def check_controller_sharing(ctx: DoctorContext) -> Iterator[Finding]:
    """A device for a VM on the same controller as devices that stay on the host."""
    targets = ctx.targets
    if not targets:
        yield _f("host.controller", Severity.OK, "no device is meant for a VM")
        return
    tports = {d.port for d in targets}
    for dev in targets:
        others = [
            d
            for d in ctx.devices
            if d.controller == dev.controller
            and d.port not in tports
            and not d.is_root_hub
            and not d.is_hub
        ]
        if others:
            yield _f(
                "host.controller",
                Severity.INFO,
                f"{_name(dev)} shares controller {dev.controller} with "
                f"{len(others)} device(s) that stay on the host",
                evidence=tuple(_name(o) for o in others),
                fix="fine for usb-host pass-through; to pass the whole controller (VFIO) "
                "or to keep their bandwidth apart, plug them into another controller",
                subject=dev.port,
            )
        else:
            yield _f(
                "host.controller",
                Severity.OK,
                f"{_name(dev)}: controller {dev.controller} has no host-only devices",
                subject=dev.port,
            )


# ---------------------------------------------------------------- authorized


def _usbguard_daemons(proc_root: Path) -> list[int]:
    """PIDs of running ``usbguard-daemon`` processes (by /proc/PID/comm)."""
    pids: list[int] = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return pids
    for entry in entries:
        if entry.isdigit():
            try:
                comm = (proc_root / entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm == "usbguard-daemon":
                pids.append(int(entry))
    return sorted(pids)


def check_authorized(ctx: DoctorContext) -> Iterator[Finding]:
    """A device whose ``authorized`` is 0: the kernel keeps it unconfigured (no
    interfaces, no driver), so neither the host nor a VM can use it."""
    pool = ctx.selected if ctx.device else ctx.devices
    blocked = [d for d in pool if d.authorized is False]
    if not blocked:
        what = "the device is" if ctx.device else f"all {len(pool)} USB devices are"
        yield _f("host.authorized", Severity.OK, f"{what} authorized")
        return
    daemons = _usbguard_daemons(ctx.proc_root)
    roots = {d.busnum: d for d in ctx.devices if d.is_root_hub}
    from vmplug.rules.device_rule import device_rule  # noqa: PLC0415

    for dev in blocked:
        where = f"{dev.sysfs_path}/authorized"
        evidence = [f"{where} = 0"]
        root = roots.get(dev.busnum)
        default = None
        if root is not None and root.sysfs_path:
            default_path = f"{root.sysfs_path}/authorized_default"
            try:
                with open(default_path) as fh:
                    default = fh.read().strip()
                evidence.append(f"{default_path} = {default}")
            except OSError:
                pass
        rule = device_rule(dev, with_port=True)
        if daemons:
            who = f"usbguard blocked it (usbguard-daemon is running: pid {daemons[0]})"
            evidence.append(f"usbguard-daemon running: pid {', '.join(map(str, daemons))}")
            fix = (
                "usbguard list-devices --blocked   # its number N\n"
                "usbguard allow-device N           # now; -p to keep the rule as well\n"
            )
            if rule.text:
                fix += (
                    "# or for good, allow it in /etc/usbguard/rules.conf (before any block rule):\n"
                    f"allow {rule.text}"
                )
        else:
            who = (
                "the bus authorizes no new device by itself (authorized_default = 0)"
                if default == "0"
                else "something wrote 0 to its authorized file (no usbguard-daemon is running)"
            )
            fix = f"echo 1 > {where}"
            if default == "0" and root is not None:
                fix += (
                    f"\n# and let the kernel authorize new devices on bus {dev.busnum} again:\n"
                    f"echo 1 > {root.sysfs_path}/authorized_default"
                )
        yield _f(
            "host.authorized",
            Severity.ERROR,
            f"{_name(dev)} is not authorized: {who}; the kernel keeps it unconfigured, "
            "so neither the host nor a VM can use it",
            evidence=tuple(evidence),
            fix=fix,
            subject=dev.port,
        )


# ---------------------------------------------------------------- udev symlinks


def check_symlinks(ctx: DoctorContext) -> Iterator[Finding]:
    """``/dev/vmplug/*`` (and other USB symlinks) pointing at a node that is gone or reused."""
    base = ctx.dev_root / "vmplug"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        yield _f("host.symlinks", Severity.OK, f"no udev symlinks under {base}")
        return
    by_node: dict[str, UsbDevice] = {}
    for d in ctx.devices:
        dnode = _usb_node(d, ctx.dev_root)
        if dnode is not None:
            by_node[os.path.normpath(dnode)] = d
    bad = 0
    for name in names:
        link = base / name
        try:
            target = os.readlink(link)
        except OSError:
            continue
        node = os.path.normpath(os.path.join(base, target))
        m = re.match(r"^([0-9a-f]{4})-([0-9a-f]{4})", name)
        dev = by_node.get(node)
        if not os.path.exists(node) or dev is None:
            bad += 1
            yield _f(
                "host.symlinks",
                Severity.WARNING,
                f"{link} points at {node}, which is gone (stale udev symlink)",
                evidence=(f"readlink {link} = {target}", f"{node}: no such device"),
                fix=f"rm {link}; udevadm trigger --subsystem-match=usb",
                subject=str(link),
            )
        elif m and dev.vidpid != f"{m.group(1)}:{m.group(2)}":
            bad += 1
            yield _f(
                "host.symlinks",
                Severity.WARNING,
                f"{link} points at {node}, now another device ({dev.vidpid})",
                evidence=(f"readlink {link} = {target}", f"{node} is {_name(dev)}"),
                fix=f"rm {link}; udevadm trigger --subsystem-match=usb",
                subject=str(link),
            )
    if not bad:
        yield _f("host.symlinks", Severity.OK, f"{len(names)} udev symlinks under {base} are live")


CHECKS = (
    CheckSpec(LAYER, "host.present", check_present),
    CheckSpec(LAYER, "host.authorized", check_authorized),
    CheckSpec(LAYER, "host.kernel-log", check_kernel_log),
    CheckSpec(LAYER, "host.autosuspend", check_autosuspend),
    CheckSpec(LAYER, "host.holders", check_holders),
    CheckSpec(LAYER, "host.devnode", check_devnode),
    CheckSpec(LAYER, "host.bandwidth", check_bandwidth),
    CheckSpec(LAYER, "host.controller", check_controller_sharing),
    CheckSpec(LAYER, "host.symlinks", check_symlinks),
)
