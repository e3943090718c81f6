"""The ``vmplug`` command."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """vmplug: route host USB devices into QEMU/KVM virtual machines."""
