"""The host's devices: ``vmplug list``, ``vmplug match`` and ``vmplug check-config``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vmplug.cli import DEFAULT_CONFIG
from vmplug.cli.app import EPILOG_ENV, Context, emit_json, escape, pass_ctx
from vmplug.model import UsbDevice
from vmplug.textsafe import printable

if TYPE_CHECKING:
    from rich.table import Table
    from rich.tree import Tree

__all__ = ["DEFAULT_CONFIG", "check_config_cmd", "list_cmd", "match_cmd"]


# ---------------------------------------------------------------------------
# vmplug list


def _speed_text(speed: float | None) -> str:
    if speed is None:
        return "?"
    if speed >= 1000:
        return f"{speed / 1000:g}G"
    return f"{speed:g}M"


def _name(dev: UsbDevice) -> str:
    return dev.display_name or "-"


def _holders(dev: UsbDevice) -> str:
    drivers = [i.driver for i in dev.interfaces if i.driver]
    unique = list(dict.fromkeys(drivers))
    return ",".join(unique) or (dev.driver if dev.is_root_hub else None) or "-"


def _classes(dev: UsbDevice) -> str:
    if dev.device_class not in (None, 0):
        return f"{dev.device_class:02x}"
    return " ".join(f"{i.cls:02x}:{i.subclass:02x}:{i.protocol:02x}" for i in dev.interfaces) or "-"


def _table(devices: Sequence[UsbDevice], remote: Sequence[dict[str, Any]] = ()) -> Table:
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, header_style="bold", pad_edge=False)
    cols = ("PORT", "BUS:DEV", "ID", "SPEED", "NAME", "SERIAL", "CLASS", "DRIVER", "VM", "HOST")
    for col in cols if remote else cols[:-1]:
        table.add_column(col, overflow="fold")
    for d in devices:
        row = [
            d.port,
            f"{d.busnum or 0:03d}:{d.devnum or 0:03d}",
            d.vidpid or "?",
            _speed_text(d.speed_mbps),
            escape(_name(d)),
            escape(d.serial or "-"),
            _classes(d),
            escape(_holders(d)),
            "-",
        ]
        table.add_row(*row, *(["-"] if remote else []))
    for r in remote:  # what the daemon knows of its device hosts' devices
        vm = r.get("attached") or r.get("vm") or "-"
        state = r.get("error") or r.get("state") or ""
        table.add_row(
            escape(str(r.get("port"))),
            f"{r.get('busnum') or 0:03d}:{r.get('devnum') or 0:03d}",
            f"{r.get('vendor_id') or '????'}:{r.get('product_id') or '????'}",
            _speed_text(r.get("speed_mbps")),
            escape(str(r.get("name") or "-")),
            escape(str(r.get("serial") or "-")),
            "-",
            "usb-redir",
            escape(f"{vm} ({state})" if state and state != "attached" else str(vm)),
            escape(str(r.get("host"))),
        )
    return table


def _remote_rows(obj: Context, host: str | None) -> list[dict[str, Any]]:
    """The running daemon's remote devices (``[host.NAME]``), or none: only
    asked when the config names device hosts (``vmplug list`` stays a read of
    sysfs otherwise)."""
    # config.config_path's rule, without importing vmplug.config and the rule language
    # (18 ms of `vmplug list`'s start-up): obj.config already holds VMPLUG_CONFIG.
    path = Path(obj.config or os.environ.get("VMPLUG_CONFIG") or DEFAULT_CONFIG)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if "[host." not in text:
        return []
    from vmplug.api.client import call, daemon_running  # noqa: PLC0415
    from vmplug.cli.daemon import daemon_settings, daemon_socket  # noqa: PLC0415

    sock = daemon_socket(None, daemon_settings(obj, warn=False))
    if not daemon_running(sock):
        if host is not None:
            click.echo(f"vmplug: no daemon answers on {sock}: remote devices unknown", err=True)
        return []
    rows = call(sock, "GET", "/v1/devices")
    return [r for r in rows if r.get("host") and (host is None or r["host"] == host)]


def _tree(devices: Sequence[UsbDevice], remote: Sequence[dict[str, Any]] = ()) -> Tree:
    """Hubs and nested ports, like ``lsusb -t``, one tree per bus; then each
    device host's devices under a heading of their own (``remote``: the
    daemon's rows with a ``host``)."""
    from rich.tree import Tree  # noqa: PLC0415

    root = Tree("USB", guide_style="dim")
    nodes: dict[str, Tree] = {}
    for d in devices:  # sorted by bus then port chain: parents come first
        label = (
            f"[bold]{escape(d.port)}[/]  {d.vidpid or '?'}  {escape(_name(d))}"
            f"  [dim]{_speed_text(d.speed_mbps)}"
            f"  dev {d.devnum if d.devnum is not None else '?'}"
            f"  {escape(_holders(d))}"
        )
        if d.is_root_hub and d.controller:
            kind = "pci" if d.controller.startswith("0000:") else "platform"
            label += f"  {kind} {d.controller}"
        label += "[/]"
        parent = nodes.get(d.parent_port or "", root)
        nodes[d.port] = parent.add(label)
    hosts: dict[str, Tree] = {}
    for r in sorted(remote, key=lambda r: (str(r.get("host")), str(r.get("port")))):
        host = str(r.get("host"))
        if host not in hosts:
            hosts[host] = root.add(f"[bold]{escape(host)}[/]  (device host, usb-redir)")
        vm = r.get("attached") or r.get("vm") or "-"
        state = r.get("error") or r.get("state") or ""
        hosts[host].add(
            f"[bold]{escape(str(r.get('port')))}[/]  "
            f"{r.get('vendor_id') or '????'}:{r.get('product_id') or '????'}"
            f"  {escape(str(r.get('name') or '-'))}  [dim]{_speed_text(r.get('speed_mbps'))}"
            f"  vm {escape(f'{vm} ({state})' if state and state != 'attached' else str(vm))}[/]"
        )
    return root


@click.command("list", epilog=EPILOG_ENV)
@click.option("--tree", "as_tree", is_flag=True, help="Show hubs and nested ports as a tree.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list for scripts.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include root hubs.")
@click.option(
    "--rules",
    "as_rules",
    is_flag=True,
    help="Print each device as a usbguard rule, as `usbguard generate-policy` does "
    "(without its leading `allow`), to paste into a rule's match.",
)
@click.option(
    "--host",
    "host",
    metavar="NAME",
    help="Only the remote devices of device host NAME ([host.NAME], from the running daemon).",
)
@pass_ctx
def list_cmd(
    obj: Context, as_tree: bool, as_json: bool, show_all: bool, as_rules: bool, host: str | None
) -> None:
    """Show the host's USB devices.

    Each device is named by its port path (bus-port.port…, the sysfs name),
    which stays the same when it is replugged into the same socket, unlike
    its device number.  DRIVER shows who holds each interface (e.g. usbfs
    when QEMU has it, snd-usb-audio when the host does).

    The tree view always shows the root hubs, since the tree hangs from
    them.  JSON objects carry every field the reader knows, including
    interfaces with endpoints and isochronous bandwidth.

    When the config names device hosts ([host.NAME]) and the daemon runs,
    their devices follow with a HOST column (JSON: ``host``; this host's
    devices have ``host: null``; --tree: under a heading per device host);
    --host NAME shows only that host's.
    """
    remote = [] if as_rules else _remote_rows(obj, host)
    devices = [] if host is not None else obj.devices(include_root_hubs=show_all or as_tree)
    if as_rules:
        from vmplug.rules.device_rule import device_rule  # noqa: PLC0415

        rules = [device_rule(d) for d in devices]
        for r in rules:
            if r.error:
                click.echo(f"vmplug: {r.port}: no rule: {printable(r.error, 500)}", err=True)
        if as_json:
            emit_json([r.to_json() for r in rules if r.text])
        else:
            click.echo("".join(f"{r.text}\n" for r in rules if r.text), nl=False)
        if not any(r.text for r in rules):
            raise SystemExit(1)
    elif as_json:
        emit_json([d.to_json() for d in devices] + remote)
        if host is not None and not remote:
            raise SystemExit(1)
    elif as_tree:
        obj.console.print(_tree(devices, remote))
        if host is not None and not remote:
            click.echo(f"no devices of device host {host!r}", err=True)
            raise SystemExit(1)
    elif devices or remote:
        obj.console.print(_table(devices, remote))
    elif host is not None:
        click.echo(f"no devices of device host {host!r}", err=True)
        raise SystemExit(1)
    else:
        click.echo(f"no USB devices under {obj.sysfs_root}", err=True)


# ---------------------------------------------------------------------------
# vmplug match


@click.command("match", epilog=EPILOG_ENV)
@click.argument("rule")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of port paths.")
@pass_ctx
def match_cmd(obj: Context, rule: str, as_json: bool) -> None:
    """List the devices that RULE matches.

    RULE is in vmplug's usbguard-style rule language, e.g.

    \b
      vmplug match 'id 1235:821a'
      vmplug match 'with-interface one-of { 01:*:* }'
      vmplug match 'via-port "3-1.2"'
      vmplug match 'id 0627:* serial "42"'

    Attributes in one rule must all hold.  Exit status: 0 when a device
    matches, 1 when none does, 2 when the rule is invalid.
    """
    from vmplug.rules import parse_rule  # noqa: PLC0415 - keeps `vmplug list` start-up small

    parsed = parse_rule(rule)
    devices = obj.devices(include_root_hubs=False)
    matched = [d for d in devices if not d.is_hub and parsed.matches(d)]
    if as_json:
        emit_json([d.port for d in matched])
    elif matched:
        obj.console.print(_table(matched))
    else:
        obj.err.print("no device matches")
    if not matched:
        raise SystemExit(1)


# ---------------------------------------------------------------------------
# vmplug check-config


@click.command("check-config", epilog=EPILOG_ENV)
@click.argument("file", required=False, metavar="[FILE]")
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
@pass_ctx
def check_config_cmd(obj: Context, file: str | None, as_json: bool) -> None:
    """Validate the config and show which rule each present device meets.

    FILE defaults to --config, then VMPLUG_CONFIG, then
    /etc/vmplug/vmplug.toml.  Rules are tried in order and the first that
    matches decides; a device no rule matches stays on the host, and hubs
    are never passed through.  An invalid config is reported with its file,
    line and column, and exit status 2.
    """
    from vmplug.config import decisions, load_config  # noqa: PLC0415

    config = load_config(file or obj.config)
    devices = obj.devices(include_root_hubs=False)
    rows = decisions(config, devices)
    if as_json:
        emit_json(
            {
                "config": config.path,
                "vms": sorted(config.vms),
                "devices": [
                    {
                        "port": d.port,
                        "id": d.vidpid,
                        "name": _name(d),
                        "rule": None if rc is None else rc.index + 1,
                        "line": None if rc is None else rc.line,
                        "action": _action(d, rc),
                        "vm": None if rc is None or rc.block else rc.attach,
                    }
                    for d, rc in rows
                ],
            }
        )
        return
    click.echo(f"{config.path}: ok ({len(config.vms)} VMs, {len(config.rules)} rules)", err=True)
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PORT", "ID", "NAME", "RULE", "DECISION"):
        table.add_column(col, overflow="fold")
    for d, rc in rows:
        where = "-" if rc is None else f"#{rc.index + 1} (line {rc.line})"
        table.add_row(d.port, d.vidpid or "?", escape(_name(d)), where, escape(_action(d, rc)))
    obj.console.print(table)


def _action(dev: UsbDevice, rc: Any) -> str:
    if dev.is_hub:
        return "hub: stays on the host (QEMU cannot pass hubs through)"
    if rc is None:
        return "no rule matches: stays on the host"
    return str(rc.target)
