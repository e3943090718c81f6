"""The ``vmplug`` command.

Every subcommand is a thin shell over library calls.  Errors a user can cause
(:class:`~vmplug.errors.VmplugError`) print one clear message on stderr and
exit with their status (2 for bad input); nothing prints a traceback unless
``--debug`` (or ``VMPLUG_DEBUG=1``) asks for one.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from vmplug import __version__
from vmplug.errors import VmplugError
from vmplug.host.inventory import read_devices, sysfs_root_from_env
from vmplug.model import UsbDevice

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree


def escape(text: str) -> str:
    """Rich markup escaping, imported only when something is rendered with Rich."""
    from rich.markup import escape as rich_escape  # noqa: PLC0415

    return rich_escape(text)


EPILOG_ENV = """\b
Environment:
  VMPLUG_SYSFS_ROOT  read USB devices from this sysfs root instead of /sys
  VMPLUG_CONFIG      config file (default /etc/vmplug/vmplug.toml)
  VMPLUG_USB_IDS     usb.ids file for device names (default: the system's)
  VMPLUG_DEBUG=1     print tracebacks for internal errors
\b
Exit status: 0 success, 1 failure or nothing found, 2 bad input.
"""


@dataclass
class Context:
    """What every subcommand gets: where to read devices and config from."""

    sysfs_root: Path
    config: str | None
    debug: bool

    @classmethod
    def from_env(cls) -> Context:
        """The settings when no ``vmplug`` group made them (a command run on its own)."""
        return cls(
            sysfs_root=sysfs_root_from_env(None),
            config=os.environ.get("VMPLUG_CONFIG") or None,
            debug=os.environ.get("VMPLUG_DEBUG") == "1",
        )

    @cached_property
    def console(self) -> Console:
        from rich.console import Console  # noqa: PLC0415 - JSON output never needs Rich

        # Piped output keeps one row per line, however narrow the terminal was.
        return Console(highlight=False, width=None if sys.stdout.isatty() else 250)

    @cached_property
    def err(self) -> Console:
        from rich.console import Console  # noqa: PLC0415

        return Console(stderr=True, highlight=False)

    def devices(self, include_root_hubs: bool = True) -> list[UsbDevice]:
        devices = read_devices(self.sysfs_root)
        for dev in devices:
            for warning in dev.warnings:
                click.echo(f"warning: {dev.port}: {warning}", err=True)
        if include_root_hubs:
            return devices
        return [d for d in devices if not d.is_root_hub]


pass_ctx = click.make_pass_decorator(Context)


def emit_json(data: Any) -> None:
    """Indented for a person at a terminal; compact (C encoder, ~10x faster) for scripts."""
    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(data, indent=indent, ensure_ascii=False))


class VmplugFailure(click.ClickException):
    """A :class:`VmplugError` on its way out of click: its text, its exit status."""

    def __init__(self, error: VmplugError) -> None:
        super().__init__(error.render())
        self.exit_code = error.exit_code  # type: ignore[misc]  # click's class default

    def show(self, file: Any = None) -> None:
        click.echo(self.message, err=True)


#: Subcommands defined in other modules, imported only when asked for, so that
#: `vmplug list` does not pay for the daemon's or the generators' imports.
LAZY_COMMANDS = {
    "run": "vmplug.cli.daemon",
    "status": "vmplug.cli.daemon",
    "history": "vmplug.cli.daemon",
    "attach": "vmplug.cli.daemon",
    "detach": "vmplug.cli.daemon",
    "reload": "vmplug.cli.daemon",
    "generate": "vmplug.cli.generate",
    "demo": "vmplug.cli.demo",
    "doctor": "vmplug.cli.doctor",
    "health": "vmplug.cli.health",
    "vms": "vmplug.cli.vms",
    "init": "vmplug.cli.vms",
}


def _lazy_available(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec(LAZY_COMMANDS[name]) is not None
    except ImportError:
        return False


# ---------------------------------------------------------------------------
# Global options: --sysfs-root, --config and --debug, before or after the subcommand

GLOBAL_NOTE = (
    "--sysfs-root, --config and --debug may also come before the subcommand "
    "(vmplug --config FILE run); given in both places, the one after the subcommand wins."
)

#: (declarations, settings) of each global option: the one place they are defined, for
#: the group (``vmplug --config F run``) and for every command (``vmplug run --config F``).
_GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (
        ("--sysfs-root",),
        {
            "type": click.Path(file_okay=False, path_type=Path),
            "metavar": "DIR",
            "envvar": "VMPLUG_SYSFS_ROOT",
            "help": "Read USB devices from this sysfs root (default /sys).",
        },
    ),
    (
        ("--config", "config"),
        {
            "metavar": "FILE",
            "envvar": "VMPLUG_CONFIG",
            "help": "Config file (default /etc/vmplug/vmplug.toml).",
        },
    ),
    (
        ("--debug",),
        {"is_flag": True, "envvar": "VMPLUG_DEBUG", "help": "Tracebacks for internal errors."},
    ),
)


def _root_options(fn: Any) -> Any:
    """The global options on the ``vmplug`` group itself, passed to its callback."""
    for decls, settings in reversed(_GLOBAL_OPTIONS):
        fn = click.option(*decls, show_envvar=True, **settings)(fn)
    return fn


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after a subcommand: it overrides the one before it.

    Only a value typed on the command line counts; the environment variable
    was already read by the group, and a default must not undo what was given
    before the subcommand.
    """
    if ctx.resilient_parsing or param.name is None:
        return
    if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
        return
    obj = ctx.find_object(Context)
    if obj is None:  # the command runs on its own, without the `vmplug` group
        obj = Context.from_env()
        walk: click.Context | None = ctx
        while walk is not None:
            if walk.obj is None:
                walk.obj = obj
            walk = walk.parent
    if param.name == "sysfs_root":
        obj.sysfs_root = Path(value)
    elif param.name == "config":
        obj.config = value
    elif param.name == "debug":
        obj.debug = obj.debug or bool(value)


def add_global_options(command: click.Command) -> click.Command:
    """Give ``command`` (and, for a group, each of its subcommands) the global options.

    Idempotent, and an option a command already has under the same name or
    flag (its own ``--config``) is left to it.  Every command registered on a
    :class:`GlobalOptionsGroup` gets them, lazy ones included, so a new command
    needs nothing to take them.
    """
    taken_names = {p.name for p in command.params}
    taken_opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for decls, settings in _GLOBAL_OPTIONS:
        option = click.Option(
            decls, show_envvar=True, expose_value=False, callback=_set_global, **settings
        )
        if option.name in taken_names or taken_opts & set(option.opts):
            continue
        command.params.append(option)
    if GLOBAL_NOTE not in (command.epilog or ""):
        command.epilog = f"{command.epilog}\n\n{GLOBAL_NOTE}" if command.epilog else GLOBAL_NOTE
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_global_options(sub)
    return command


class GlobalOptionsGroup(click.Group):
    """A group whose every command takes --sysfs-root, --config and --debug."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(add_global_options(cmd), name)


#: ``@group.group()`` makes a group of the same kind, whose commands get them too.
GlobalOptionsGroup.group_class = GlobalOptionsGroup


class VmplugGroup(GlobalOptionsGroup):
    """Turns errors a user can cause into messages and exit codes, not tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | {n for n in LAZY_COMMANDS if _lazy_available(n)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            if not _lazy_available(cmd_name):
                return None
            import importlib  # noqa: PLC0415

            module = importlib.import_module(LAZY_COMMANDS[cmd_name])
            if cmd_name not in self.commands and isinstance(
                command := getattr(module, cmd_name, None), click.Command
            ):
                self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmplugError as exc:
            obj = ctx.find_object(Context)
            if (obj is not None and obj.debug) or os.environ.get("VMPLUG_DEBUG") == "1":
                traceback.print_exc()
            raise VmplugFailure(exc) from exc


@click.group(
    cls=VmplugGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG_ENV,
)
@click.version_option(__version__, "-V", "--version", prog_name="vmplug")
@_root_options
@click.pass_context
def cli(ctx: click.Context, sysfs_root: Path | None, config: str | None, debug: bool) -> None:
    """Route host USB devices into QEMU/KVM virtual machines and keep them there.

    vmplug shows the host's USB tree, matches devices with usbguard-style
    rules, attaches them to running VMs over QMP (again after every replug,
    VM restart and daemon restart), writes the configuration QEMU, libvirt,
    Docker and udev need, and finds where a pass-through breaks.

    --sysfs-root, --config and --debug may come before or after the
    subcommand (vmplug run --config FILE); after it wins.
    """
    ctx.obj = Context(
        sysfs_root=sysfs_root_from_env(sysfs_root),
        config=config,
        debug=debug,
    )


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


def _table(devices: Sequence[UsbDevice]) -> Table:
    from rich.table import Table  # noqa: PLC0415

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PORT", "BUS:DEV", "ID", "SPEED", "NAME", "SERIAL", "CLASS", "DRIVER", "VM"):
        table.add_column(col, overflow="fold")
    for d in devices:
        table.add_row(
            d.port,
            f"{d.busnum or 0:03d}:{d.devnum or 0:03d}",
            d.vidpid or "?",
            _speed_text(d.speed_mbps),
            escape(_name(d)),
            escape(d.serial or "-"),
            _classes(d),
            escape(_holders(d)),
            "-",
        )
    return table


def _tree(devices: Sequence[UsbDevice]) -> Tree:
    """Hubs and nested ports, like ``lsusb -t``, one tree per bus."""
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
    return root


@cli.command("list", epilog=EPILOG_ENV)
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
@pass_ctx
def list_cmd(obj: Context, as_tree: bool, as_json: bool, show_all: bool, as_rules: bool) -> None:
    """Show the host's USB devices.

    Each device is named by its port path (bus-port.port…, the sysfs name),
    which stays the same when it is replugged into the same socket, unlike
    its device number.  DRIVER shows who holds each interface (e.g. usbfs
    when QEMU has it, snd-usb-audio when the host does).

    The tree view always shows the root hubs, since the tree hangs from
    them.  JSON objects carry every field the reader knows, including
    interfaces with endpoints and isochronous bandwidth.
    """
    devices = obj.devices(include_root_hubs=show_all or as_tree)
    if as_rules:
        from vmplug.rules.device_rule import device_rule  # noqa: PLC0415

        rules = [device_rule(d) for d in devices]
        for r in rules:
            if r.error:
                click.echo(f"vmplug: {r.port}: no rule: {r.error}", err=True)
        if as_json:
            emit_json([r.to_json() for r in rules if r.text])
        else:
            click.echo("".join(f"{r.text}\n" for r in rules if r.text), nl=False)
        if not any(r.text for r in rules):
            raise SystemExit(1)
    elif as_json:
        emit_json([d.to_json() for d in devices])
    elif as_tree:
        obj.console.print(_tree(devices))
    elif devices:
        obj.console.print(_table(devices))
    else:
        click.echo(f"no USB devices under {obj.sysfs_root}", err=True)


# ---------------------------------------------------------------------------
# vmplug match


@cli.command("match", epilog=EPILOG_ENV)
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


@cli.command("check-config", epilog=EPILOG_ENV)
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


# ---------------------------------------------------------------------------
# entry point


def _fail(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turn errors into exit codes."""
    debug = os.environ.get("VMPLUG_DEBUG") == "1" or "--debug" in (argv or sys.argv[1:])
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except VmplugError as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.render(), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()
        raise SystemExit(141) from None
    except OSError as exc:
        if debug:
            traceback.print_exc()
        _fail(f"vmplug: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _fail(
            f"vmplug: internal error: {type(exc).__name__}: {exc}\n"
            "This is a bug; run again with --debug for the traceback and report it.",
            70,
        )


if __name__ == "__main__":
    main()
