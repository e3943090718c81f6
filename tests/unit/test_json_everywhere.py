"""Every command that prints data takes --json (the group is walked: a new command
without it fails here), and those that run offline print one JSON document with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vmplug.cli.app import cli

REPO = Path(__file__).resolve().parents[2]
MIXED = REPO / "tests" / "fixtures" / "sysfs" / "mixed"

#: Commands that print no data: the daemon itself, a signal to it, a shell script,
#: a man page.  Each is here for that reason only.
NO_JSON = {
    "run": "the daemon: it logs, it prints no data",
    "reload": "tells the daemon to re-read its config; prints nothing",
    "completion": "prints a shell script",
    "man": "prints a man page (hidden)",
}


def leaf_commands() -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(cli)

    def walk(group: click.Group, path: list[str]) -> Iterator[tuple[str, click.Command]]:
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None, name
            if isinstance(cmd, click.Group):
                yield from walk(cmd, [*path, name])
            else:
                yield " ".join([*path, name]), cmd

    yield from walk(cli, [])


def has_json(cmd: click.Command) -> bool:
    return any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option))


def test_every_command_that_prints_data_has_json() -> None:
    names = dict(leaf_commands())
    assert set(NO_JSON) <= set(names), set(NO_JSON) - set(names)
    missing = [n for n, cmd in names.items() if n not in NO_JSON and not has_json(cmd)]
    assert missing == []
    # the allow-list is no hiding place: none of those has --json either
    assert [n for n in NO_JSON if has_json(names[n])] == []
    assert len(names) - len(NO_JSON) >= 15


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "--tree"],
        ["match", "id 0627:0001"],
        ["check-config"],
        ["generate", "qemu", "46f4:0002"],
        ["generate", "compose", "2-2.1"],
        ["generate", "libvirt", "2-2.1"],
        ["generate", "udev", "3-1"],
        ["generate", "spice", "2-2.1"],
        ["generate", "systemd", "--exec", "/usr/bin/vmplug"],
    ],
)
def test_json_is_one_document(args: list[str], tmp_path: Path) -> None:
    config = tmp_path / "vmplug.toml"
    config.write_text(
        '[vm.windows]\nqmp = "/tmp/vmplug-json.sock"\n\n'
        "[[rule]]\nattach = \"windows\"\nmatch = 'id 0627:0001'\n"
    )
    res = CliRunner().invoke(
        cli, ["--sysfs-root", str(MIXED), "--config", str(config), *args, "--json"]
    )
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)
