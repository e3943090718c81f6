"""The ``vmplug`` group: its context, its global options, its command map, ``main``.

Every subcommand is a thin shell over library calls, in a module of its own
(one per command family: :mod:`~vmplug.cli.devices`, :mod:`~vmplug.cli.daemon`,
:mod:`~vmplug.cli.vms`, ...), named in :data:`LAZY_COMMANDS` and imported
only when it runs, so that ``vmplug list`` does not pay for the daemon's or the
generators' imports.  A new command is a ``@click.command`` in such a module
and one line in that map; nothing else registers commands.

Errors a user can cause (:class:`~vmplug.errors.VmplugError`) print one clear
message on stderr and exit with the status :mod:`vmplug.cli.errors` gives them
(2 for bad input); nothing prints a traceback unless ``--debug`` (or
``VMPLUG_DEBUG=1``) asks for one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from vmplug import __version__
from vmplug.cli import json_text, warning_lines
from vmplug.errors import VmplugError
from vmplug.textsafe import DEFAULT_LIMIT, printable

if TYPE_CHECKING:
    from rich.console import Console

    from vmplug.model import UsbDevice


def escape(text: str, limit: int | None = DEFAULT_LIMIT) -> str:
    """Text from outside (a device's strings, a VM's, a daemon's answer) for Rich:
    control characters made visible, one line, cut at ``limit``
    (:func:`vmplug.textsafe.printable`), then Rich markup escaped."""
    from rich.markup import escape as rich_escape  # noqa: PLC0415

    return rich_escape(printable(text, limit))


EPILOG_ENV = """\b
Environment:
  VMPLUG_SYSFS_ROOT  read USB devices from this sysfs root instead of /sys
  VMPLUG_CONFIG      config file (default /etc/vmplug/vmplug.toml)
  VMPLUG_USB_IDS     usb.ids file for device names (default: the system's)
  VMPLUG_DEBUG=1     print tracebacks for internal errors
\b
Exit status: 0 success, 1 failure or nothing found, 2 bad input.
"""


def _sysfs_root(explicit: Path | None) -> Path:
    from vmplug.host.inventory import sysfs_root_from_env  # noqa: PLC0415 - not for --version

    return sysfs_root_from_env(explicit)


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
            sysfs_root=_sysfs_root(None),
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
        """The host's USB devices (warnings about them on stderr)."""
        from vmplug.host.inventory import read_devices  # noqa: PLC0415

        devices = read_devices(self.sysfs_root)
        for line in warning_lines(devices):
            click.echo(line, err=True)
        if include_root_hubs:
            return devices
        return [d for d in devices if not d.is_root_hub]


pass_ctx = click.make_pass_decorator(Context)


def context(ctx: click.Context) -> Context:
    """The :class:`Context` of ``ctx``'s command, or one from the environment
    when the command runs without the ``vmplug`` group (on its own, in a test)."""
    return ctx.find_object(Context) or Context.from_env()


def emit_json(data: Any) -> None:
    """Indented for a person at a terminal; compact (C encoder, ~10x faster) for scripts."""
    click.echo(json_text(data))


#: Every subcommand: its name -> ``module:attribute`` of its click command.
#: The module is imported only when the command runs (or help lists it).
LAZY_COMMANDS = {
    "list": "vmplug.cli.devices:list_cmd",
    "match": "vmplug.cli.devices:match_cmd",
    "check-config": "vmplug.cli.devices:check_config_cmd",
    "run": "vmplug.cli.daemon:run_cmd",
    "status": "vmplug.cli.daemon:status_cmd",
    "history": "vmplug.cli.daemon:history_cmd",
    "attach": "vmplug.cli.daemon:attach_cmd",
    "detach": "vmplug.cli.daemon:detach_cmd",
    "reload": "vmplug.cli.daemon:reload_cmd",
    "health": "vmplug.cli.health:health",
    "vms": "vmplug.cli.vms:vms",
    "init": "vmplug.cli.vms:init",
    "doctor": "vmplug.cli.doctor:doctor",
    "generate": "vmplug.cli.generate:generate",
    "demo": "vmplug.cli.demo:demo",
    "completion": "vmplug.cli.completion:completion",
    "man": "vmplug.cli.manpage:man_cmd",
}


def load_command(name: str) -> click.Command:
    """The click command ``name`` of :data:`LAZY_COMMANDS`, its module imported now."""
    import importlib  # noqa: PLC0415

    module_name, _, attribute = LAZY_COMMANDS[name].partition(":")
    command = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{LAZY_COMMANDS[name]} is not a click command")
    return command


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
    from vmplug.cli.completion import add_completers  # noqa: PLC0415

    add_completers(command)  # device arguments and --vm complete in bash, zsh and fish
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
    """Loads commands from :data:`LAZY_COMMANDS`; turns errors a user can cause
    into messages and exit codes (:mod:`vmplug.cli.errors`), not tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            self.add_command(load_command(cmd_name), cmd_name)
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmplugError as exc:
            from vmplug.cli.errors import VmplugFailure, print_traceback  # noqa: PLC0415

            obj = ctx.find_object(Context)
            if (obj is not None and obj.debug) or os.environ.get("VMPLUG_DEBUG") == "1":
                print_traceback()
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
    ctx.obj = Context(sysfs_root=_sysfs_root(sysfs_root), config=config, debug=debug)


# ---------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turn errors into exit codes."""
    debug = os.environ.get("VMPLUG_DEBUG") == "1" or "--debug" in (argv or sys.argv[1:])
    if "_VMPLUG_COMPLETE" in os.environ:  # a TAB in bash, zsh or fish
        import vmplug.cli.completion  # noqa: F401, PLC0415 - registers vmplug's bash class
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except BaseException as exc:  # every way out gets its exit status
        from vmplug.cli.errors import exit_on  # noqa: PLC0415

        exit_on(exc, debug=debug)


if __name__ == "__main__":
    main()
