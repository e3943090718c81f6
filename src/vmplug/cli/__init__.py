"""The ``vmplug`` command: one package, one group, one way to add a command.

:mod:`vmplug.cli.app` holds the group, the :class:`~vmplug.cli.app.Context`
every command gets, ``emit_json`` and the lazy command map; each command
family is a module of its own, imported only when it runs.
"""

from vmplug.cli.app import (
    EPILOG_ENV,
    GLOBAL_NOTE,
    LAZY_COMMANDS,
    Context,
    GlobalOptionsGroup,
    VmplugGroup,
    cli,
    emit_json,
    escape,
    main,
    pass_ctx,
)

__all__ = [
    "EPILOG_ENV",
    "GLOBAL_NOTE",
    "LAZY_COMMANDS",
    "Context",
    "GlobalOptionsGroup",
    "VmplugGroup",
    "cli",
    "emit_json",
    "escape",
    "main",
    "pass_ctx",
]
