"""The ``vmplug`` command: one package, one group, one way to add a command.

:mod:`vmplug.cli.app` holds the group (:data:`cli`), the context every command
gets, ``emit_json`` and the lazy command map; :mod:`vmplug.cli.errors` maps
errors to exit statuses; each command family is a module of its own
(``devices``, ``daemon``, ``health``, ``vms``, ``doctor``, ``generate``,
``demo``), imported only when one of its commands runs.

This module itself imports nothing: ``vmplug --version`` (or ``-V``) alone is
answered here, as click's version option answers it, before click, dataclasses,
json and pathlib are loaded (about 60 ms of a 90 ms start on a 2-core machine);
everything else goes to :func:`vmplug.cli.app.main`.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs a few ms; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    import click

__all__ = ["cli", "main"]

_VERSION_ARGS = (["--version"], ["-V"])


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turn errors into exit codes."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if args in _VERSION_ARGS and "_VMPLUG_COMPLETE" not in os.environ:
        from vmplug import __version__  # noqa: PLC0415

        # click.version_option's own message, so both paths print the same line
        sys.stdout.write(f"vmplug, version {__version__}\n")
        sys.stdout.flush()
        return
    from vmplug.cli.app import main as app_main  # noqa: PLC0415

    app_main(argv)


def __getattr__(name: str) -> Any:
    """``from vmplug.cli import cli``: the click group, imported on first use."""
    if name == "cli":
        from vmplug.cli.app import cli  # noqa: PLC0415

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    cli: click.Group
