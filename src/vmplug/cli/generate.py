"""``vmplug generate``: configuration for QEMU, Docker, libvirt, udev, SPICE and systemd.

Every subcommand takes the same device selectors as ``vmplug attach`` (a port
path ``3-1.2``, ``vid:pid``, a serial, or ``rule:RULE``), prints the
configuration on stdout and anything meant for a person on stderr, and takes
``--json`` for scripts.  Errors (no such device, a hub, a value the format
cannot express) exit with status 2 and change nothing.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from vmplug.cli.app import GlobalOptionsGroup, context, emit_json
from vmplug.errors import UsageError
from vmplug.generate import compose as compose_mod
from vmplug.generate import libvirt as libvirt_mod
from vmplug.generate import qemu as qemu_mod
from vmplug.generate import spice as spice_mod
from vmplug.generate import systemd as systemd_mod
from vmplug.generate import udev as udev_mod
from vmplug.generate.common import CannotExpress
from vmplug.host import install as host_install
from vmplug.host.install import write_atomic
from vmplug.host.select import select_many
from vmplug.model import UsbDevice

F = TypeVar("F", bound=Callable[..., Any])

SELECTORS_HELP = (
    "DEVICE is a port path (3-1.2), vid:pid (1235:821a), a serial number, or rule:RULE "
    "(as for `vmplug attach`)."
)


def load_devices(ctx: click.Context) -> list[UsbDevice]:
    """The host's USB devices but root hubs, read where the ``vmplug`` command
    says (``--sysfs-root`` / ``VMPLUG_SYSFS_ROOT``, before or after the subcommand)."""
    return context(ctx).devices(include_root_hubs=False)


def _selected(ctx: click.Context, selectors: Sequence[str]) -> list[UsbDevice]:
    if not selectors:
        raise UsageError(f"name at least one device. {SELECTORS_HELP}")
    return select_many(load_devices(ctx), list(selectors))


def _say(message: str) -> None:
    click.echo(message, err=True)


def _device_args(fn: F) -> F:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    return click.argument("selectors", nargs=-1, metavar="DEVICE...")(fn)


@click.group(
    "generate", cls=GlobalOptionsGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
def generate() -> None:
    """Write configuration for QEMU, Docker, libvirt, udev, SPICE and systemd.

    Each generator matches devices the way that survives replug (vendor and
    product id, or host port), never by device number, and refuses what
    cannot work (hubs, identical devices it cannot tell apart, values the
    format cannot quote).
    """


# ---------------------------------------------------------------------------
# qemu


_BY_PORT_HELP = (
    "Match by host bus and port instead of vendor/product id: for identical devices "
    "(same id, which usb-host cannot tell apart) or a device that must come from one "
    "socket (a dock). The device must stay in that socket."
)


@generate.command("qemu", epilog=SELECTORS_HELP)
@_device_args
@click.option("--by-port", is_flag=True, help=_BY_PORT_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["args", "readconfig"]),
    default="args",
    show_default=True,
    help="Command-line arguments, or a file for QEMU's -readconfig.",
)
@click.option("--qmp", metavar="SOCKET", help="Also add a QMP unix socket for vmplug.")
@click.option("--isobufs", type=click.IntRange(1, 1024), help="Override iso buffer count.")
@click.option("--isobsize", type=click.IntRange(1, 1024), help="Override packets per iso buffer.")
@click.pass_context
def qemu_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    by_port: bool,
    fmt: str,
    qmp: str | None,
    isobufs: int | None,
    isobsize: int | None,
) -> None:
    """QEMU options: a qemu-xhci controller and one usb-host per DEVICE.

    Each usb-host gets a stable id (vmplug-<hash of the device's identity>)
    and a fixed guest port; USB 3 devices sit on the controller's USB 3
    ports.  Audio interfaces with isochronous endpoints get larger
    isobufs/isobsize, with a comment saying why.
    """
    devices = _selected(ctx, selectors)
    plan = qemu_mod.plan_qemu(devices, by_port=by_port, qmp=qmp, isobufs=isobufs, isobsize=isobsize)
    text = qemu_mod.render_readconfig(plan) if fmt == "readconfig" else qemu_mod.render_args(plan)
    if as_json:
        emit_json({**plan.to_json(), "format": fmt, "text": text})
        return
    click.echo(text, nl=False)


# ---------------------------------------------------------------------------
# compose


@generate.command("compose", epilog=SELECTORS_HELP)
@_device_args
@click.option("--service", default="windows", show_default=True, help="Compose service name.")
@click.option("--vm", "vm", metavar="NAME", help="VM name in vmplug's config (default: service).")
@click.option("--by-port", is_flag=True, help=_BY_PORT_HELP)
@click.option(
    "--qmp-dir",
    default="./qmp",
    show_default=True,
    help="Host folder bind-mounted at /qmp for vmplug's QMP socket (relative to the compose file).",
)
@click.option(
    "--qmp-env",
    is_flag=True,
    help="Use the QMP variable of newer images instead of -qmp in ARGUMENTS.",
)
@click.option(
    "--merge",
    "merge_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Add to this existing compose file (in place), keeping its comments and order.",
)
@click.option("--stdout", "to_stdout", is_flag=True, help="With --merge: print, do not write.")
@click.option(
    "--storage",
    type=click.Choice(compose_mod.STORAGE_MODES),
    default="after-setup",
    show_default=True,
    help="USB mass storage: after-setup (not at boot; its vmplug rule commented out, "
    "to enable once Windows is installed), live (not at boot; vmplug attaches it once "
    "the VM runs) or boot (in ARGUMENTS).",
)
@click.pass_context
def compose_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    service: str,
    vm: str | None,
    by_port: bool,
    qmp_dir: str,
    qmp_env: bool,
    merge_file: Path | None,
    to_stdout: bool,
    storage: str,
) -> None:
    """A dockurr/windows compose service whose USB devices survive replug.

    /dev/bus/usb is bind-mounted (Docker's devices: list only holds the
    nodes present at container start), device_cgroup_rules allows USB nodes
    (major 189), and a QMP socket for vmplug lives in a host folder mounted
    at /qmp.  The usb-host devices go into ARGUMENTS, on the image's own
    xHCI (its USB setting: bus xhci.0, port 1 is its usb-tablet), never a
    second controller.  USB mass storage stays out of ARGUMENTS (Windows
    Setup may format a USB disk present at boot): vmplug attaches it live
    (--storage).  Under rootless Podman, where device_cgroup_rules does
    nothing, a note says what to do instead.  The matching [vm.NAME] and
    [[rule]] entries for vmplug's config are printed on stderr (and in --json).
    """
    devices = _selected(ctx, selectors)
    base = merge_file.resolve().parent if merge_file is not None else Path.cwd()
    original: str | None = None
    image_env: dict[str, str] = {}
    if merge_file is not None:
        try:
            original = merge_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(
                f"{merge_file}: no such file (leave out --merge for a new one)"
            ) from None
        image_env = compose_mod.service_env(original, service)
    plan = compose_mod.plan_compose(
        devices,
        service=service,
        vm=vm,
        by_port=by_port,
        qmp_dir=qmp_dir,
        qmp_env=qmp_env,
        base_dir=base,
        image_env=image_env,
        storage=storage,
        rootless_podman=_rootless_podman_here(),
    )
    snippet = compose_mod.vmplug_snippet(plan)
    changes: list[str] = []
    if merge_file is not None and original is not None:
        text, changes = compose_mod.merge_text(original, plan)
        if not to_stdout and not as_json and text != original:
            write_atomic(merge_file, text, merge_file.stat().st_mode & 0o7777)
    else:
        text = compose_mod.render_new(plan)
    podman_run: list[str] | None = None
    try:
        podman_run = compose_mod.podman_run_command(text, service, base)
        podman_say = compose_mod.podman_shell(text, service, base)
    except CannotExpress as exc:  # a merged service with keys podman run has no flag for
        podman_say = f"(not made: {exc})"
    if as_json:
        emit_json(
            {
                **plan.to_json(),
                "compose": text,
                "changes": changes,
                "vmplug_config": snippet,
                "podman_run": podman_run,
            }
        )
        return
    if merge_file is None or to_stdout:
        click.echo(text, nl=False)
    if merge_file is not None:
        if not changes:
            _say(f"{merge_file}: already up to date")
        else:
            verb = "would change" if to_stdout else "updated"
            _say(f"{merge_file}: {verb}:")
            for change in changes:
                _say(f"  {change}")
    for note in plan.notes:
        _say(f"note: {note}")
    _say(f"note: {compose_mod.PODMAN_NOTE}:\n  {podman_say}")
    _say(f"\nAdd to vmplug's config (/etc/vmplug/vmplug.toml):\n\n{snippet}")


def _rootless_podman_here() -> bool:
    """The engine this compose file is for ($DOCKER_HOST, or the usual sockets) is a
    rootless Podman (asked over its API, as the doctor asks; one second at most)."""
    import contextlib  # noqa: PLC0415

    from vmplug.doctor.container_info import engine_info  # noqa: PLC0415
    from vmplug.wire.engine import candidates, exists  # noqa: PLC0415

    for address in candidates():
        if exists(address):
            # no engine there after all: nothing to say
            with contextlib.suppress(Exception):
                return engine_info(address, 1.0).rootless_podman
    return False


# ---------------------------------------------------------------------------
# libvirt


@generate.command("libvirt", epilog=SELECTORS_HELP)
@_device_args
@click.option(
    "--by-address",
    is_flag=True,
    help="Add bus/device number (needed for identical devices; lost when replugged).",
)
@click.option(
    "--qmp", metavar="SOCKET", help="Add a <qemu:commandline> QMP socket so vmplug can manage it."
)
@click.option("--domain", "domain", metavar="NAME", help="Print a complete minimal domain.")
@click.pass_context
def libvirt_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    by_address: bool,
    qmp: str | None,
    domain: str | None,
) -> None:
    """libvirt <hostdev> elements (vendor/product, startupPolicy='optional').

    Paste them into <devices> with `virsh edit`.  --qmp adds the
    <qemu:commandline> that gives vmplug a QMP socket of its own.
    """
    devices = _selected(ctx, selectors)
    plan = libvirt_mod.plan_libvirt(devices, by_address=by_address, qmp=qmp)
    if domain is not None:
        text = libvirt_mod.render_domain(plan, domain)
    else:
        text = libvirt_mod.render_fragment(plan)
    if as_json:
        emit_json({**plan.to_json(), "xml": text})
        return
    click.echo(text, nl=False)


# ---------------------------------------------------------------------------
# udev


@generate.command("udev", epilog=SELECTORS_HELP)
@_device_args
@click.option("--group", default="kvm", show_default=True, help="Group that may open the device.")
@click.option("--mode", default="0660", show_default=True, help="Mode of the device node.")
@click.option("--by-port", is_flag=True, help="Match the host port too (identical devices).")
@click.option("--no-serial", is_flag=True, help="Do not match the serial number.")
@click.option("--install", is_flag=True, help="Write the rules, reload udev, re-apply them.")
@click.option(
    "--rules-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=udev_mod.RULES_DIR,
    show_default=True,
    help="Where --install writes.",
)
@click.option("--file", "single_file", metavar="NAME", help="One rules file for all devices.")
@click.option("--udevadm", default="udevadm", hidden=True)
@click.pass_context
def udev_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    group: str,
    mode: str,
    by_port: bool,
    no_serial: bool,
    install: bool,
    rules_dir: Path,
    single_file: str | None,
    udevadm: str,
) -> None:
    """udev rules: autosuspend off, a /dev/vmplug/ symlink, group access.

    With --install each device's rules go to their own file
    (70-vmplug-VID-PID-SERIAL.rules) in --rules-dir, udev reloads them, and
    they are applied to the devices now; what was done is printed.
    """
    devices = _selected(ctx, selectors)
    rules = udev_mod.plan_udev(
        devices, group=group, mode=mode, by_port=by_port, match_serial=not no_serial
    )
    text = udev_mod.render_rules(rules)
    done: list[str] = []
    if install:
        done = host_install.install_rules(
            rules,
            rules_dir=rules_dir,
            single_file=single_file,
            udevadm=udevadm,
            sysfs_root=context(ctx).sysfs_root,
        )
    if as_json:
        emit_json({"rules": [r.to_json() for r in rules], "text": text, "installed": done})
        return
    if install:
        for line in done:
            _say(line)
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------------------
# spice


@generate.command("spice", epilog=SELECTORS_HELP)
@_device_args
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["spice", "qemu"]),
    default="spice",
    show_default=True,
    help="Comma-separated (SPICE clients) or colon-separated (QEMU usb-redir filter=).",
)
@click.option("--allow-others", is_flag=True, help="End with allow-all instead of block-all.")
@click.option("--match-version", is_flag=True, help="Also match the device's bcdDevice.")
@click.pass_context
def spice_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    fmt: str,
    allow_others: bool,
    match_version: bool,
) -> None:
    """A usbredir filter that lets exactly DEVICE... be redirected.

    \b
    SPICE client:  remote-viewer --spice-usbredir-auto-redirect-filter='FILTER'
    QEMU (--format qemu):  -device usb-redir,chardev=...,filter=FILTER
    """
    devices = _selected(ctx, selectors)
    plan = spice_mod.plan_spice(devices, allow_others=allow_others, match_version=match_version)
    if as_json:
        emit_json(plan.to_json())
        return
    click.echo(spice_mod.render(plan, fmt), nl=False)


# ---------------------------------------------------------------------------
# systemd


def _default_exec() -> str:
    found = shutil.which("vmplug")
    if found:
        return str(Path(found).resolve())
    return str(Path(sys.argv[0]).resolve())


def _unit_paths(config: str | None) -> tuple[list[str], list[str]]:
    """The VMs' QMP sockets and the files the daemon writes, from the config if
    there is one (the unit's sandbox opens their directories)."""
    from vmplug.config import ConfigError, config_path, load_config  # noqa: PLC0415

    path = config_path(config)
    if not path.exists():
        return [], []
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise UsageError(exc.render()) from None
    sockets = [vm.qmp for vm in cfg.vms.values() if vm.qmp and not vm.qmp.startswith("tcp:")]
    state = [cfg.daemon.socket, cfg.daemon.database]
    if cfg.api.token_file:
        state.append(cfg.api.token_file)
    return sockets, state


@generate.command("systemd")
@click.option("--exec", "executable", metavar="PATH", help="vmplug executable (default: found).")
@click.option("--install", is_flag=True, help="Write the unit, reload systemd, enable and start.")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=systemd_mod.UNIT_DIR,
    show_default=True,
)
@click.option("--name", default=systemd_mod.UNIT_NAME, show_default=True, help="Unit file name.")
@click.option("--no-enable", is_flag=True, help="With --install: write and reload only.")
@click.option("--systemctl", default="systemctl", hidden=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def systemd_cmd(
    ctx: click.Context,
    executable: str | None,
    install: bool,
    unit_dir: Path,
    name: str,
    no_enable: bool,
    systemctl: str,
    as_json: bool,
) -> None:
    """A systemd unit for `vmplug run` (after udev and the container runtime).

    It restarts on failure.  --install writes it to /etc/systemd/system,
    reloads systemd and enables and starts it.  The unit's `vmplug run` reads
    the config this command is given (--config or VMPLUG_CONFIG), if any.
    """
    config = context(ctx).config
    sockets, state = _unit_paths(config)
    plan = systemd_mod.plan_systemd(
        executable or _default_exec(), config=config, sockets=sockets, state=state
    )
    text = plan.text()
    done: list[str] = []
    if install:
        done = host_install.install_unit(
            plan, unit_dir=unit_dir, name=name, enable=not no_enable, systemctl=systemctl
        )
    if as_json:
        emit_json({"exec": list(plan.exec_argv), "unit": text, "installed": done})
        return
    if install:
        for line in done:
            _say(line)
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------------------
# proxmox


@generate.command("proxmox", epilog=SELECTORS_HELP)
@_device_args
@click.option(
    "--vmid", type=click.IntRange(100, 999_999_999), required=True, help="The Proxmox VMID."
)
@click.option("--by-port", is_flag=True, help="host=BUS-PORT: whatever is plugged into that port.")
@click.option(
    "--mapping",
    metavar="NAME",
    help="mapping=NAME: a cluster-wide resource mapping (printed as a pvesh command too).",
)
@click.option("--node", metavar="NODE", help="The node for --mapping (default: this host).")
@click.pass_context
def proxmox_cmd(
    ctx: click.Context,
    selectors: tuple[str, ...],
    as_json: bool,
    vmid: int,
    by_port: bool,
    mapping: str | None,
    node: str | None,
) -> None:
    """`qm set VMID --usbN host=...` lines: Proxmox VE holds the devices itself.

    Each device gets the first usbN the VM's /etc/pve/qemu-server/VMID.conf
    does not use (VMPLUG_PROXMOX_ETC moves that directory), host=VENDOR:PRODUCT
    (or BUS-PORT with --by-port, or mapping=NAME with --mapping) and usb3=1
    when it is SuperSpeed.  Leave such a device out of vmplug's rules:
    `vmplug doctor` reports one claimed by both.
    """
    from vmplug.generate import proxmox as proxmox_mod  # noqa: PLC0415
    from vmplug.vms.proxmox_conf import etc_dir, node_name, read_vm_confs  # noqa: PLC0415

    devices = _selected(ctx, selectors)
    existing = next((vm for vm in read_vm_confs(etc_dir()) if vm.vmid == vmid), None)
    plan = proxmox_mod.plan_proxmox(
        devices,
        vmid,
        by_port=by_port,
        mapping=mapping,
        node=node or (node_name() if mapping else None),
        existing=existing,
    )
    if as_json:
        emit_json(proxmox_mod.ProxmoxPlan.to_json(plan))
        return
    click.echo(proxmox_mod.render(plan), nl=False)
    for note in plan.notes:
        _say(f"note: {note}")


# ---------------------------------------------------------------------------
# prometheus-rules


@generate.command("prometheus-rules")
@click.option("--job", default="vmplug", show_default=True, help="The scrape job's name.")
@click.option("--uptime-below", type=float, default=0.99, show_default=True)
@click.option("--drops", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--drops-window", default="10m", show_default=True, help="A PromQL duration.")
@click.option("--json", "as_json", is_flag=True, help="The rules as JSON.")
def prometheus_rules_cmd(
    job: str, uptime_below: float, drops: int, drops_window: str, as_json: bool
) -> None:
    """Alertmanager alerting rules over vmplug's /metrics (check: promtool check rules FILE)."""
    import re  # noqa: PLC0415

    from vmplug.generate import prometheus  # noqa: PLC0415

    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_:.-]*", job):
        raise UsageError(f"--job {job!r}: a Prometheus job name (letters, digits, _ : . -)")
    if not re.fullmatch(r"\d+[smhd]", drops_window):
        raise UsageError(f"--drops-window {drops_window!r}: a duration like 10m")
    opts = prometheus.RuleOptions(
        job=job, uptime_below=uptime_below, drops=drops, drops_window=drops_window
    )
    if as_json:
        emit_json({"rules": prometheus.rules(opts)})
        return
    click.echo(prometheus.render(opts), nl=False)
