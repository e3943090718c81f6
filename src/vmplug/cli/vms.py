"""The VMs on this host: ``vmplug vms`` lists them, ``vmplug init`` writes a first
config from them and the devices you pick.

Finding them is :mod:`vmplug.vms.discover`'s; writing the file is
:mod:`vmplug.config_write`'s.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from vmplug.cli.app import EPILOG_ENV, Context, emit_json, escape, pass_ctx
from vmplug.config import VmConfig, config_path, load_config
from vmplug.config_write import NewRule, match_for, render_config, write_config
from vmplug.errors import UsageError, VmplugError
from vmplug.host.select import describe
from vmplug.model import UsbDevice
from vmplug.textsafe import printable
from vmplug.vms.discover import DEFAULT_LIBVIRT_URI, Discovery, FoundVm, discover

# ---------------------------------------------------------------------------
# vmplug vms


def _load_config_vms(obj: Context, *, quiet_missing: bool) -> list[VmConfig]:
    path = config_path(obj.config)
    if quiet_missing and obj.config is None and not path.exists():
        return []
    return list(load_config(path).vms.values())


_DISCOVERY_OPTIONS = [
    click.option(
        "--libvirt-uri",
        "libvirt_uris",
        multiple=True,
        metavar="URI",
        envvar="VMPLUG_LIBVIRT_URI",
        help=f"libvirt to ask for domains (repeatable; default {DEFAULT_LIBVIRT_URI}).",
    ),
    click.option(
        "--docker-socket",
        metavar="PATH",
        help="Docker or Podman API socket (default: DOCKER_HOST, /var/run/docker.sock, "
        "/run/podman/podman.sock, $XDG_RUNTIME_DIR/podman/podman.sock).",
    ),
    click.option(
        "--proxmox-run",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="VMPLUG_PROXMOX_RUN",
        help="Where Proxmox's QMP sockets are (default /var/run/qemu-server).",
    ),
    click.option("--no-processes", is_flag=True, help="Do not look for QEMU processes in /proc."),
    click.option(
        "--timeout",
        type=click.FloatRange(0.1, 60),
        default=2.0,
        show_default=True,
        help="Seconds to wait for each QMP socket or libvirt.",
    ),
]


def _discovery_options(fn: Any) -> Any:
    for option in reversed(_DISCOVERY_OPTIONS):
        fn = option(fn)
    return fn


def _run_discovery(
    obj: Context,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
) -> Discovery:
    config_vms = _load_config_vms(obj, quiet_missing=True)
    return asyncio.run(
        discover(
            config_vms,
            libvirt_uris=libvirt_uris or (DEFAULT_LIBVIRT_URI,),
            docker_socket=docker_socket,
            proxmox_run=proxmox_run,
            processes=not no_processes,
            patterns=patterns,
            timeout=timeout,
        )
    )


@click.command("vms", epilog=EPILOG_ENV)
@click.argument("patterns", nargs=-1, metavar="[PATTERN]...")
@_discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
def vms(
    obj: Context,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """List the VMs on this host: config, libvirt, containers, Proxmox, processes.

    PATTERNs (shell globs, e.g. 'win*') keep only the VMs whose name
    matches one; only those are asked anything.  For each VM: where vmplug reaches
    it (a QMP socket, libvirt:DOMAIN, container:NAME, proxmox:VMID), its
    state, its USB buses and the usb-host devices it holds (vmplug's are
    marked *).  QMP sockets are reached one short connection at a time; a
    socket another client holds shows as busy.

    \b
    Examples:
      vmplug vms
      vmplug vms 'win*' --json
      vmplug vms --libvirt-uri qemu:///session --no-processes

    Exit status: 0 (also when none is found), 2 bad input.
    """
    found = _run_discovery(
        obj, patterns, libvirt_uris, docker_socket, proxmox_run, no_processes, timeout
    )
    if as_json:
        emit_json(found.to_json())
        return
    for note in found.notes:
        click.echo(f"note: {printable(note, None, backslash=False)}", err=True)
    if not found.vms:
        click.echo("no VMs found", err=True)
        return
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "KIND", "WHERE", "STATE", "USB BUS", "DEVICES", "CONFIG"):
        table.add_column(col, overflow="fold")
    for vm in found.vms:
        devices = (
            " ".join(
                ("*" if d["managed"] else "")
                + (
                    f"{d['hostbus']}-{d['hostport']}"
                    if d.get("hostport")
                    else f"{d['hostbus']}/{d['hostaddr']}"
                    if d.get("hostaddr")
                    else str(d.get("vidpid") or d["id"])
                )
                for d in vm.devices
            )
            or "-"
        )
        state = vm.state + (f" ({vm.problem})" if vm.problem else "")
        table.add_row(
            escape(vm.name),
            vm.kind,
            escape(vm.where or "-"),
            escape(state),
            escape(", ".join(vm.usb_buses) or "-"),
            escape(devices),
            escape(vm.config_name or "-"),
        )
    obj.console.print(table)


# ---------------------------------------------------------------------------
# vmplug init


def parse_where(
    where: str, *, libvirt_uri: str | None, docker_socket: str | None
) -> FoundVm | None:
    """``--vm NAME=WHERE``: a QMP path, tcp:H:P, libvirt:DOM, container:NAME,
    proxmox:VMID (None: not one of those forms)."""
    if where.startswith("libvirt:"):
        return FoundVm("", "libvirt", where, "flag", uri=libvirt_uri)
    if where.startswith("container:"):
        return FoundVm("", "container", where, "flag", uri=docker_socket)
    if where.startswith("proxmox:"):
        if not where[8:].isdigit():
            raise UsageError(f"--vm: {where!r}: proxmox:VMID takes a number")
        return FoundVm("", "proxmox", where, "flag")
    if where.startswith("qmp:"):
        where = where[4:]
    if where.startswith(("/", "tcp:", "unix:")):
        return FoundVm("", "qmp", where.removeprefix("unix:"), "flag")
    return None


def _vm_entry(name: str, vm: FoundVm) -> tuple[str, dict[str, Any], str | None]:
    """A chosen VM as :func:`~vmplug.config_write.render_config` takes it."""
    found = (
        None
        if vm.source == "flag"
        else f"found: {vm.source}" + (f", {vm.state}" if vm.state else "")
    )
    return name, vm.vm_table(), found


def _rule(vm_name: str, dev: UsbDevice, *, by_port: bool) -> NewRule:
    return NewRule(
        vm=vm_name, match=match_for(dev, "port" if by_port else "id"), label=describe(dev)
    )


@click.command("init", epilog=EPILOG_ENV)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write (default: --config, VMPLUG_CONFIG, /etc/vmplug/vmplug.toml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option(
    "--vm",
    "vm_specs",
    multiple=True,
    metavar="NAME[=WHERE]",
    help="A VM to manage: WHERE is a QMP socket path, tcp:HOST:PORT, libvirt:DOMAIN, "
    "container:NAME or proxmox:VMID; NAME alone takes the found VM of that name.",
)
@click.option(
    "--device",
    "device_specs",
    multiple=True,
    metavar="[VM=]SELECTOR",
    help="A device to route (port 3-1.2, vid:pid, serial or rule:RULE) to VM "
    "(may be left out when there is one VM).",
)
@click.option("--by-port", is_flag=True, help="Rules match the port (via-port), not vid:pid.")
@click.option(
    "--interactive/--no-interactive",
    default=None,
    help="Ask which VMs and devices (default: when stdin is a terminal and no --vm is given).",
)
@click.option(
    "--match", "patterns", multiple=True, metavar="GLOB", help="Only found VMs whose name matches."
)
@_discovery_options
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@pass_ctx
def init(
    obj: Context,
    output: Path | None,
    force: bool,
    vm_specs: tuple[str, ...],
    device_specs: tuple[str, ...],
    by_port: bool,
    interactive: bool | None,
    patterns: tuple[str, ...],
    libvirt_uris: tuple[str, ...],
    docker_socket: str | None,
    proxmox_run: Path | None,
    no_processes: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Write a first config from the VMs found here and the devices you pick.

    In a terminal, with no --vm, vmplug lists the VMs it finds (as `vmplug
    vms` does) and the USB devices present, and asks which to use.  For
    scripts, --vm and --device say it all; a --vm NAME without =WHERE takes
    the found VM of that name.  The file is checked as `vmplug check-config`
    would before it is written, and an existing file is kept unless --force.

    \b
    Examples:
      vmplug init
      vmplug init -o vmplug.toml --vm win=/srv/win/qmp/qmp.sock --device 1235:821a
      vmplug init --vm win11=libvirt:win11 --device win11=3-1.2 --by-port
      vmplug init --vm windows --device 'windows=rule:with-interface one-of { 01:*:* }'

    Exit status: 0 written, 1 failure, 2 bad input (or the file exists).
    """
    target = output or config_path(obj.config)
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    if interactive is None:
        interactive = sys.stdin.isatty() and not vm_specs
    uri = libvirt_uris[0] if libvirt_uris else None
    discovery: Discovery | None = None

    def found() -> Discovery:
        nonlocal discovery
        if discovery is None:
            discovery = asyncio.run(
                discover(
                    [],
                    libvirt_uris=libvirt_uris or (DEFAULT_LIBVIRT_URI,),
                    docker_socket=docker_socket,
                    proxmox_run=proxmox_run,
                    processes=not no_processes,
                    patterns=patterns,
                    timeout=timeout,
                )
            )
        return discovery

    chosen: list[tuple[str, FoundVm]] = []
    for spec in vm_specs:
        name, eq, where = spec.partition("=")
        if not name:
            raise UsageError(f"--vm {spec!r}: give NAME=WHERE or NAME")
        vm = (
            parse_where(where, libvirt_uri=uri, docker_socket=docker_socket) if eq else None
        ) or _found_by_name(found(), where if eq else name, spec)
        chosen.append((name, vm))

    devices = obj.devices(include_root_hubs=False)
    rules: list[NewRule] = []
    if interactive:
        chosen, rules = _ask(found(), devices, chosen, by_port=by_port)
    names = [n for n, _ in chosen]
    for spec in device_specs:
        rules.extend(_device_rules(spec, names, devices, by_port=by_port))
    if not chosen:
        raise UsageError("no VM chosen: give --vm NAME=WHERE (see `vmplug vms`)")
    if len(set(names)) != len(names):
        raise UsageError(f"--vm: a VM name is given twice ({', '.join(names)})")
    text = render_config([_vm_entry(n, vm) for n, vm in chosen], rules)
    try:
        write_config(target, text)  # never writes what would not load
    except VmplugError as exc:
        raise UsageError(f"the config would not load: {exc.render()}") from exc
    if as_json:
        emit_json(
            {
                "config": str(target),
                "vms": {n: vm.vm_table() for n, vm in chosen},
                "rules": [{"attach": r.vm, "match": r.match} for r in rules],
            }
        )
        return
    click.echo(
        f"wrote {target}: {len(chosen)} VMs, {len(rules)} rules "
        "(check it with `vmplug check-config`, run with `vmplug run`)",
        err=True,
    )


def _found_by_name(discovery: Discovery, name: str, spec: str) -> FoundVm:
    matches = [v for v in discovery.vms if v.name == name and v.where]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted({v.name for v in discovery.vms if v.where})) or "none"
    if not matches:
        raise UsageError(
            f"--vm {spec!r}: no VM named {name!r} found (found: {known}); "
            "or give WHERE: a QMP path, tcp:H:P, libvirt:DOM, container:NAME, proxmox:VMID"
        )
    raise UsageError(
        f"--vm {spec!r}: {len(matches)} VMs are named {name!r} "
        f"({', '.join(m.where for m in matches)}); give WHERE"
    )


def _device_rules(
    spec: str, vm_names: Sequence[str], devices: Sequence[UsbDevice], *, by_port: bool
) -> list[NewRule]:
    from vmplug.host.select import select_many  # noqa: PLC0415

    vm_name, eq, selector = spec.partition("=")
    if not eq or vm_name not in vm_names:
        if len(vm_names) != 1:
            raise UsageError(
                f"--device {spec!r}: say which VM: VM=SELECTOR (VMs: {', '.join(vm_names)})"
            )
        vm_name, selector = vm_names[0], spec
    chosen = select_many(devices, [selector])
    out = []
    for dev in chosen:
        if dev.is_hub:
            raise UsageError(f"--device {spec!r}: {dev.port} is a hub; QEMU cannot pass hubs")
        out.append(_rule(vm_name, dev, by_port=by_port))
    return out


def _numbers(text: str, count: int, what: str) -> list[int]:
    out = []
    for part in text.replace(",", " ").split():
        if not part.isdigit() or not 1 <= int(part) <= count:
            raise click.BadParameter(f"{part!r} is not one of 1..{count}", param_hint=what)
        out.append(int(part) - 1)
    return list(dict.fromkeys(out))


def _ask(
    discovery: Discovery,
    devices: Sequence[UsbDevice],
    chosen: list[tuple[str, FoundVm]],
    *,
    by_port: bool,
) -> tuple[list[tuple[str, FoundVm]], list[NewRule]]:
    candidates = [v for v in discovery.vms if v.where]
    if candidates:
        click.echo("VMs found:", err=True)
        for i, vm in enumerate(candidates, 1):
            line = f"{printable(vm.name)}  {printable(vm.where or '-', None)}"
            click.echo(f"  {i}. {line}  ({vm.source}, {printable(vm.state)})", err=True)
        picked = click.prompt(
            "VMs to manage (numbers, comma-separated; empty for none)",
            default="",
            show_default=False,
            err=True,
            value_proc=lambda t: _numbers(t, len(candidates), "VMs"),
        )
        for index in picked:
            vm = candidates[index]
            name = click.prompt(
                f"Name for {vm.where} in the config", default=_config_name(vm.name), err=True
            )
            chosen.append((name, vm))
    else:
        click.echo("no VMs found on this host (see `vmplug vms`)", err=True)
    rules: list[NewRule] = []
    usable = [d for d in devices if not d.is_hub]
    if not chosen or not usable:
        return chosen, rules
    click.echo("USB devices:", err=True)
    for i, dev in enumerate(usable, 1):
        click.echo(f"  {i}. {describe(dev)}", err=True)
    picked = click.prompt(
        "Devices to route into a VM (numbers; empty for none)",
        default="",
        show_default=False,
        err=True,
        value_proc=lambda t: _numbers(t, len(usable), "devices"),
    )
    names = [n for n, _ in chosen]
    for index in picked:
        dev = usable[index]
        vm_name = names[0]
        if len(names) > 1:
            vm_name = click.prompt(
                f"VM for {dev.port} ({dev.vidpid})", type=click.Choice(names), err=True
            )
        rules.append(_rule(vm_name, dev, by_port=by_port))
    return chosen, rules


def _config_name(name: str) -> str:
    import re  # noqa: PLC0415

    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("-_.")[:64]
    return cleaned or "vm"


__all__ = ["init", "parse_where", "vms"]
