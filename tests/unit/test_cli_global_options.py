"""--sysfs-root, --config and --debug before and after every subcommand (issue 11.2).

Every command the ``vmplug`` group has (the lazily imported ones and the
subcommands of nested groups such as ``generate`` included) is walked and its
``--help`` read; for a representative set the option after the subcommand is
run against the same option before it, on the sysfs trees captured from a real
kernel (tests/fixtures/sysfs), with real config files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vmplug.cli.app import GLOBAL_NOTE, LAZY_COMMANDS, Context, VmplugGroup, cli, pass_ctx

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"
MIXED = str(FIXTURES / "mixed")
MINIMAL = str(FIXTURES / "minimal")
GLOBAL_FLAGS = ("--sysfs-root", "--config", "--debug")
# Environment of the tests: nothing set from the machine running them.
CLEAN_ENV = {"VMPLUG_SYSFS_ROOT": None, "VMPLUG_CONFIG": None, "VMPLUG_DEBUG": None}


def run(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={**CLEAN_ENV, **(env or {})})
    return result.exit_code, result.stdout, result.stderr


def walk(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under ``group``, loading lazy commands the way `vmplug` does."""
    ctx = click.Context(group, info_name="vmplug")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"{' '.join((*path, name))} is listed but does not load"
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from walk(command, (*path, name))


ALL_COMMANDS = sorted(walk(cli))


def test_the_walk_finds_lazy_and_nested_commands() -> None:
    names = {p[0] for p in ALL_COMMANDS}
    assert set(LAZY_COMMANDS) <= names
    assert {"list", "match", "check-config"} <= names
    assert ("generate", "qemu") in ALL_COMMANDS and ("generate", "systemd") in ALL_COMMANDS


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_every_command_help_lists_the_global_options(path: tuple[str, ...]) -> None:
    code, out, err = run(*path, "--help")
    assert code == 0, err
    for flag in GLOBAL_FLAGS:
        assert f"\n  {flag} " in out, f"`vmplug {' '.join(path)} --help` lacks {flag}"
    # where they may go, and which wins when given twice
    assert " ".join(GLOBAL_NOTE.split()) in " ".join(out.split())


def test_root_help_says_they_work_after_the_subcommand() -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "may come before or after the" in out
    for flag in GLOBAL_FLAGS:
        assert flag in out


# ---------------------------------------------------------------------------
# --sysfs-root


def ports(out: str) -> list[str]:
    return [d["port"] for d in json.loads(out)]


def test_list_sysfs_root_after_equals_before() -> None:
    before = run("--sysfs-root", MIXED, "list", "--json")
    after = run("list", "--json", "--sysfs-root", MIXED)
    assert before[0] == 0 and after == before
    assert "2-2.4.1" in ports(after[1])


def test_sysfs_root_after_wins_over_before_and_over_the_environment() -> None:
    code, out, _ = run("--sysfs-root", MIXED, "list", "--json", "--sysfs-root", MINIMAL)
    assert (code, ports(out)) == (0, ["2-1"])
    code, out, _ = run("list", "--json", "--sysfs-root", MINIMAL, env={"VMPLUG_SYSFS_ROOT": MIXED})
    assert (code, ports(out)) == (0, ["2-1"])
    # the environment alone still applies, and a root before stays when none follows
    code, out, _ = run("list", "--json", env={"VMPLUG_SYSFS_ROOT": MINIMAL})
    assert (code, ports(out)) == (0, ["2-1"])
    code, out, _ = run("--sysfs-root", MINIMAL, "list", "--json", env={"VMPLUG_SYSFS_ROOT": MIXED})
    assert (code, ports(out)) == (0, ["2-1"])


def test_match_sysfs_root_after() -> None:
    before = run("--sysfs-root", MIXED, "match", "--json", "id 0627:0001")
    after = run("match", "id 0627:0001", "--sysfs-root", MIXED, "--json")
    assert after == before
    assert json.loads(after[1]) == ["1-3", "2-2.4.1", "2-2.4.2"]


def test_generate_qemu_sysfs_root_after_the_nested_subcommand_and_the_group() -> None:
    before = run("--sysfs-root", MIXED, "generate", "qemu", "1-3")
    assert before[0] == 0 and "vendorid=0x0627,productid=0x0001" in before[1]
    assert run("generate", "qemu", "1-3", "--sysfs-root", MIXED) == before
    assert run("generate", "--sysfs-root", MIXED, "qemu", "1-3") == before
    # the fixture named after the subcommand decides: minimal has no device at 1-3
    code, _, err = run("--sysfs-root", MIXED, "generate", "qemu", "1-3", "--sysfs-root", MINIMAL)
    assert code == 2 and "1-3" in err


def test_missing_sysfs_root_after_the_subcommand_is_bad_input() -> None:
    code, out, err = run("list", "--json", "--sysfs-root", "/nonexistent/sysfs")
    assert (code, out) == (2, "")
    assert "sysfs root /nonexistent/sysfs does not exist" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------
# --config

CONFIG = """\
[daemon]
socket = "{dir}/vmplug.sock"
database = "{dir}/vmplug.db"

[vm.win]
qmp = "/run/win.sock"

[[rule]]
attach = "win"
match = 'with-interface one-of {{ 01:*:* }}'
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "vmplug.toml"
    path.write_text(CONFIG.format(dir=tmp_path))
    return path


def test_check_config_config_after_equals_before(config: Path) -> None:
    before = run("--sysfs-root", MIXED, "--config", str(config), "check-config", "--json")
    after = run("check-config", "--json", "--config", str(config), "--sysfs-root", MIXED)
    assert before[0] == 0 and after == before
    decided = json.loads(after[1])
    assert decided["config"] == str(config) and decided["vms"] == ["win"]
    assert {d["port"]: d["vm"] for d in decided["devices"]}["2-2.1"] == "win"


def test_check_config_config_after_wins(config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[vm.linux]\nqmp = "/run/linux.sock"\n')
    code, out, _ = run(
        "--config", str(other), "check-config", "--json", "--config", str(config),
        env={"VMPLUG_SYSFS_ROOT": MIXED},
    )  # fmt: skip
    assert (code, json.loads(out)["vms"]) == (0, ["win"])
    code, out, _ = run(
        "check-config", "--json", "--config", str(other),
        env={"VMPLUG_SYSFS_ROOT": MIXED, "VMPLUG_CONFIG": str(config)},
    )  # fmt: skip
    assert (code, json.loads(out)["vms"]) == (0, ["linux"])
    # VMPLUG_CONFIG alone still applies
    code, out, _ = run(
        "check-config", "--json", env={"VMPLUG_SYSFS_ROOT": MIXED, "VMPLUG_CONFIG": str(config)}
    )
    assert (code, json.loads(out)["vms"]) == (0, ["win"])


@pytest.mark.parametrize("command", [("status",), ("history",), ("health",), ("reload",)])
def test_daemon_clients_read_the_config_after_the_subcommand(
    config: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    """The config names the daemon's socket and database: both sides find the same ones."""
    before = run("--config", str(config), *command)
    after = run(*command, "--config", str(config))
    assert after == before
    code, _, err = after
    assert code == 1
    named = tmp_path / ("vmplug.db" if command[0] in ("history", "health") else "vmplug.sock")
    assert str(named) in err, err


def test_status_json_config_after(config: Path, tmp_path: Path) -> None:
    code, out, _ = run("status", "--json", "--config", str(config))
    assert code == 1
    assert json.loads(out) == {"daemon": None, "socket": str(tmp_path / "vmplug.sock")}


def test_generate_systemd_config_keeps_its_meaning(tmp_path: Path) -> None:
    """`generate systemd --config F` names the config of the unit's `vmplug run`."""
    argv = ("generate", "systemd", "--exec", "/usr/bin/vmplug")
    after = run(*argv, "--config", "/etc/v.toml")
    assert after == run("--config", "/etc/v.toml", *argv)
    assert "ExecStart=/usr/bin/vmplug --config /etc/v.toml run\n" in after[1]
    code, out, _ = run("--config", "/etc/before.toml", *argv, "--config", "/etc/after.toml")
    assert code == 0 and "--config /etc/after.toml run\n" in out
    code, out, _ = run(*argv, env={"VMPLUG_CONFIG": "/etc/env.toml"})
    assert code == 0 and "--config /etc/env.toml run\n" in out


@pytest.mark.parametrize(
    "command",
    [
        ("check-config",),
        ("run",),
        ("vms", "--no-processes"),
        ("doctor",),
        ("attach", "1-3", "--vm", "win"),
        ("detach", "1-3", "--persist"),
    ],
    ids=lambda c: c[0],
)
def test_missing_config_after_the_subcommand_exits_2(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    missing = tmp_path / "nope.toml"
    code, out, err = run(*command, "--config", str(missing), "--sysfs-root", MIXED)
    assert code == 2, (out, err)
    assert f"{missing}: error: no such file" in err
    assert "Traceback" not in err
    # the same message as with the option before the subcommand
    assert run("--config", str(missing), "--sysfs-root", MIXED, *command)[2] == err


def test_config_without_a_value_after_the_subcommand_is_a_usage_error() -> None:
    code, _, err = run("check-config", "--config")
    assert code == 2
    assert "Option '--config' requires an argument" in err


def test_init_writes_the_config_named_after_the_subcommand(tmp_path: Path) -> None:
    target = tmp_path / "new.toml"
    code, _, err = run(
        "init", "--no-interactive", "--no-processes", "--vm", f"win={tmp_path}/qmp.sock",
        "--device", "1-3", "--json", "--config", str(target), "--sysfs-root", MIXED,
    )  # fmt: skip
    assert code == 0, err
    assert target.exists()
    assert run("check-config", "--json", "--config", str(target), "--sysfs-root", MIXED)[0] == 0
    # -o still names the file to write, whatever --config says
    other = tmp_path / "other.toml"
    code, _, err = run(
        "init", "--no-interactive", "--no-processes", "--vm", f"win={tmp_path}/qmp.sock",
        "--device", "1-3", "-o", str(other), "--config", str(target), "--sysfs-root", MIXED,
    )  # fmt: skip
    assert code == 0, err
    assert other.exists()


# ---------------------------------------------------------------------------
# --debug


def test_debug_after_the_subcommand_prints_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    code, _, err = run("check-config", missing)
    assert code == 2 and "Traceback" not in err
    code, _, err = run("check-config", missing, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert run("--debug", "check-config", missing)[:2] == (code, "")
    assert "Traceback" in run("check-config", missing, env={"VMPLUG_DEBUG": "1"})[2]


# ---------------------------------------------------------------------------
# a new command gets them without asking, and the real entry point


def test_a_new_command_gets_the_global_options() -> None:
    group = VmplugGroup("vmplug-test")

    @group.command("probe")
    @pass_ctx
    def probe(obj: Context) -> None:
        click.echo(json.dumps([str(obj.sysfs_root), obj.config, obj.debug]))

    @group.group("nested")
    def nested() -> None:
        pass

    @nested.command("inner")
    @pass_ctx
    def inner(obj: Context) -> None:
        click.echo(json.dumps([str(obj.sysfs_root), obj.config, obj.debug]))

    runner = CliRunner()
    for path in (["probe"], ["nested", "inner"]):
        result = runner.invoke(
            group, [*path, "--sysfs-root", MINIMAL, "--config", "/x.toml", "--debug"], env=CLEAN_ENV
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == [MINIMAL, "/x.toml", True]


def test_the_installed_command_takes_them_after_the_subcommand() -> None:
    argv = [sys.executable, "-m", "vmplug"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    after = subprocess.run(
        [*argv, "list", "--json", "--sysfs-root", MIXED],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    before = subprocess.run(
        [*argv, "--sysfs-root", MIXED, "list", "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout and "2-2.4.1" in ports(after.stdout)
