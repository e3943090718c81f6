"""``vmplug demo``: the click command only; the lab and the demo live in :mod:`vmplug_lab`.

vmplug itself never imports ``vmplug_lab`` (the throwaway lab guest is a test
and demo tool, not part of the product): this command imports it when run.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--steps",
    "n_steps",
    default=4,
    show_default=True,
    type=click.IntRange(0, 100),
    help="Steps after the start (unplug, replug, VM restart, daemon restart, again...).",
)
@click.option(
    "--keep-going/--stop-on-failure",
    default=True,
    show_default=True,
    help="Go on after a step whose expected attach did not happen.",
)
@click.option("--pause", default=2.0, show_default=True, help="Seconds between steps.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the lab's files (logs, sockets' dir) here; default: a temporary directory.",
)
def demo(n_steps: int, keep_going: bool, pause: float, as_json: bool, workdir: Path | None) -> None:
    """Show the daemon keeping USB devices in a VM, in a throwaway lab guest.

    Boots the lab guest (emulated hub, keyboard, tablet), starts a VM (a second
    QEMU) and `vmplug run` inside it, then unplugs and replugs the keyboard,
    kills and restarts the VM, restarts the daemon, and shows each step and
    how long the VM took to hold its devices again.  Needs no USB hardware;
    takes two or three minutes.  Exit status 0 when every expected attach
    happened.
    """
    from vmplug_lab.demo import run_demo  # noqa: PLC0415  # the lab only when asked for

    raise SystemExit(run_demo(n_steps, keep_going, pause, as_json, workdir))
