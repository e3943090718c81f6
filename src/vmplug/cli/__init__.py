"""The ``vmplug`` command: one package, one group, one way to add a command.

:mod:`vmplug.cli.app` holds the group (:data:`cli`), the context every command
gets, ``emit_json`` and the lazy command map; :mod:`vmplug.cli.errors` maps
errors to exit statuses; each command family is a module of its own
(``devices``, ``daemon``, ``health``, ``vms``, ``doctor``, ``generate``,
``demo``), imported only when one of its commands runs.
"""

from vmplug.cli.app import cli, main

__all__ = ["cli", "main"]
