"""The ``vmplug`` command: one package, one group, one way to add a command.

:mod:`vmplug.cli.app` holds the group (:data:`cli`), the context every command
gets, ``emit_json`` and the lazy command map; :mod:`vmplug.cli.errors` maps
errors to exit statuses; each command family is a module of its own
(``devices``, ``daemon``, ``health``, ``vms``, ``doctor``, ``generate``,
``demo``), imported only when one of its commands runs.

This module itself imports nothing: ``vmplug --version`` (or ``-V``) alone is
answered here, as click's version option answers it, before click, dataclasses,
json and pathlib are loaded (about 60 ms of a 90 ms start on a 2-core machine);
so is the plainest ``vmplug list --json`` (see :func:`_list_json`); everything
else goes to :func:`vmplug.cli.app.main`.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs a few ms; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from typing import Any, TextIO

    import click

    from vmplug.model import UsbDevice

__all__ = ["cli", "json_text", "main", "warning_lines"]

_VERSION_ARGS = (["--version"], ["-V"])

#: vmplug.config.DEFAULT_PATH (tests/unit/test_startup_imports.py checks they agree)
DEFAULT_CONFIG = "/etc/vmplug/vmplug.toml"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turn errors into exit codes."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if args in _VERSION_ARGS and "_VMPLUG_COMPLETE" not in os.environ:
        from vmplug import __version__  # noqa: PLC0415

        # click.version_option's own message, so both paths print the same line
        sys.stdout.write(f"vmplug, version {__version__}\n")
        sys.stdout.flush()
        return
    if _list_json(args):
        return
    from vmplug.cli.app import main as app_main  # noqa: PLC0415

    app_main(argv)


def json_text(data: Any) -> str:
    """``--json`` output: indented for a person at a terminal; compact (C encoder,
    ~10x faster) for scripts."""
    import json  # noqa: PLC0415 - not for --version

    indent = 2 if sys.stdout.isatty() else None
    return json.dumps(data, indent=indent, ensure_ascii=False)


def warning_lines(devices: Iterable[UsbDevice]) -> Iterator[str]:
    """What the reader noticed about each device, one line each, for stderr."""
    for dev in devices:
        if dev.warnings:
            from vmplug.textsafe import printable  # noqa: PLC0415 - most lists have none

            for warning in dev.warnings:
                yield f"warning: {dev.port}: {printable(warning, 500)}"


def _utf8(stream: TextIO) -> bool:
    """Whether click would write to ``stream`` as it is (it re-wraps an ASCII
    one; a stream without an encoding, such as ``io.StringIO``, takes text)."""
    encoding = getattr(stream, "encoding", None)
    return encoding is None or encoding.lower().replace("_", "-") in ("utf-8", "utf8")


def _plain_dir(path: str) -> bool:
    """Whether click.Path(file_okay=False) takes ``path`` as it is: absent, or
    a readable directory."""
    try:
        mode = os.stat(path).st_mode  # noqa: PTH116 - pathlib is 3 ms of this start
    except OSError:
        return True
    return (mode & 0o170000) == 0o040000 and os.access(path, os.R_OK)  # S_ISDIR


def _list_json(args: list[str]) -> bool:
    """``vmplug list --json`` [``-a``] with only the global options, answered
    without click, the config or the CLI framework: the reader, the model and
    the JSON printer are all it imports (issue 16: ~20 ms of its start-up).

    False (nothing done) for anything else, and for everything whose answer
    click would shape (a value click checks and refuses, an error, the remote
    devices of a config that names device hosts, a terminal encoding click
    would change): :func:`vmplug.cli.app.main` answers those exactly as
    ``vmplug list`` does; the output is the same either way
    (tests/unit/test_sysfs_list_cli.py).
    """
    root = os.environ.get("VMPLUG_SYSFS_ROOT") or None
    config = os.environ.get("VMPLUG_CONFIG") or None
    command = as_json = show_all = False
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        name, eq, value = arg.partition("=")
        if name in ("--sysfs-root", "--config") and arg.startswith("--"):
            if not eq:
                if i >= len(args):
                    return False
                value, i = args[i], i + 1
            if not value or value.startswith("-"):
                return False
            if name == "--config":
                config = value
            else:
                root = value
        elif arg == "--debug":
            pass  # only an error's traceback depends on it, and errors go to click
        elif not command:
            if arg != "list":
                return False
            command = True
        elif arg == "--json":
            as_json = True
        elif arg in ("-a", "--all"):
            show_all = True
        else:
            return False
    if not (command and as_json) or "_VMPLUG_COMPLETE" in os.environ:
        return False
    if os.environ.get("VMPLUG_DEBUG", "") not in ("", "0", "1"):
        return False  # click parses (or refuses) any other spelling
    if not (_utf8(sys.stdout) and _utf8(sys.stderr)):
        return False
    if root is not None and not _plain_dir(root):
        return False
    try:
        with open(config or DEFAULT_CONFIG, encoding="utf-8", errors="replace") as f:
            if "[host." in f.read():
                return False  # device hosts: their devices come from the daemon
    except OSError:
        pass
    from vmplug.errors import VmplugError  # noqa: PLC0415
    from vmplug.host.inventory import read_devices  # noqa: PLC0415

    try:
        devices = read_devices(root)
        lines = list(warning_lines(devices))
        if lines:
            sys.stderr.write("".join(f"{line}\n" for line in lines))
            sys.stderr.flush()
        shown = devices if show_all else [d for d in devices if not d.is_root_hub]
        sys.stdout.write(json_text([d.to_json() for d in shown]) + "\n")
        sys.stdout.flush()
    except VmplugError:
        return False  # nothing printed yet (only the read raises it): click's path says it
    except BaseException as exc:  # a closed pipe, ^C: the exit status click's path gives
        from vmplug.cli.errors import exit_on  # noqa: PLC0415

        exit_on(exc, debug=os.environ.get("VMPLUG_DEBUG") == "1" or "--debug" in args)
    return True


def __getattr__(name: str) -> Any:
    """``from vmplug.cli import cli``: the click group, imported on first use."""
    if name == "cli":
        from vmplug.cli.app import cli  # noqa: PLC0415

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    cli: click.Group
