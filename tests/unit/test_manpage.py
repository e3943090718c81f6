"""vmplug(1) and vmplug.toml(5): made from the click group and the config parser's keys,
rendered by the real man-db and groff without a warning, found by `man -M DIR`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vmplug import config as config_mod
from vmplug.cli.app import cli
from vmplug.cli.manpage import man_cmd, render_vmplug1, render_vmplug_toml5, roff_text
from vmplug.engine import remedy as remedy_mod

needs_man = pytest.mark.skipif(
    shutil.which("man") is None or shutil.which("groff") is None,
    reason="man-db and groff are not installed (apt install man-db)",
)


def commands() -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(cli)

    def walk(group: click.Group, path: list[str]) -> Iterator[tuple[str, click.Command]]:
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None
            if cmd.hidden:
                continue
            if isinstance(cmd, click.Group):
                yield from walk(cmd, [*path, name])
            else:
                yield " ".join([*path, name]), cmd

    yield from walk(cli, [])


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    result = CliRunner().invoke(man_cmd, ["--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "man1" / "vmplug.1").is_file() and (out / "man5" / "vmplug.toml.5").is_file()
    return out


def test_every_command_and_option_is_in_vmplug_1() -> None:
    page = render_vmplug1()
    names = [name for name, _ in commands()]
    assert {"list", "attach", "doctor", "generate compose", "completion"} <= set(names)
    for name, cmd in commands():
        assert f'.SS "vmplug {name} ' in page, name
        first_line = (cmd.help or "").strip().splitlines()[0]
        words = roff_text(first_line).split()
        assert re.search(r"\s+".join(re.escape(w) for w in words), page), (name, first_line)
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                long = max(param.opts, key=len)
                assert long.replace("-", "\\-") in page, (name, long)
    assert '.SS "vmplug man' not in page  # hidden


#: Every key set the config parser checks against -> the section of vmplug.toml(5).
KEY_SETS = {
    (config_mod, "_VM_KEYS"): "[vm.NAME]",
    (config_mod, "_RULE_KEYS"): "[[rule]]",
    (config_mod, "_DAEMON_KEYS"): "[daemon]",
    (config_mod, "_API_KEYS"): "[api]",
    (config_mod, "_EXPORT_KEYS"): "[export]",
    (config_mod, "_EXPORT_DEVICE_KEYS"): "[export.device.NAME]",
    (config_mod, "_EXPORT_RULE_KEYS"): "[[export.rule]]",
    (config_mod, "_HOST_KEYS"): "[host.NAME]",
    (remedy_mod, "_POLICY_KEYS"): "[heal]",
    (remedy_mod, "_KEYS"): "[[alert]]",
}


def test_every_config_key_is_in_vmplug_toml_5() -> None:
    page = render_vmplug_toml5()
    sections = re.split(r"(?m)^\.SH ", page)

    def section(title: str) -> str:
        found = [s for s in sections if s.startswith(f'"{title}"')]
        assert found, f"vmplug.toml(5) has no section {title}"
        return found[0]

    # a key set the parser grew that this test (and so the page) does not know yet
    for module in (config_mod, remedy_mod):
        for name in dir(module):
            if name.endswith("KEYS") and name != "_TOP_KEYS":
                assert (module, name) in KEY_SETS, (
                    f"{module.__name__}.{name}: document its keys in "
                    "vmplug.cli.manpage.CONFIG_SECTIONS and map it in KEY_SETS"
                )
    for (module, name), title in KEY_SETS.items():
        keys = getattr(module, name, None)
        if keys is None:
            continue  # not in this version of the parser
        text = section(title)
        for key in keys:
            assert f".B {key}\n" in text, (title, key)
    for top in config_mod._TOP_KEYS:
        assert f'.SH "[{top}' in page or f'.SH "[[{top}' in page, top


@needs_man
@pytest.mark.parametrize("page", ["man1/vmplug.1", "man5/vmplug.toml.5"])
def test_man_renders_without_warnings(pages: Path, page: str) -> None:
    groff = subprocess.run(
        ["groff", "-ww", "-z", "-man", str(pages / page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    man = subprocess.run(
        ["man", "--warnings", "-l", str(pages / page)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert man.returncode == 0 and man.stderr == "", man.stderr
    assert "vmplug" in man.stdout and "\\" not in man.stdout.replace("\\\\", "")


@needs_man
def test_man_finds_the_installed_pages(pages: Path) -> None:
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"}
    one = subprocess.run(
        ["man", "-M", str(pages), "vmplug"], capture_output=True, text=True, env=env, check=True
    )
    text = re.sub(r".\x08", "", one.stdout)
    assert "EXIT STATUS" in text and "vmplug doctor" in text and "VMPLUG_SYSFS_ROOT" in text
    assert "--sysfs-root" in text
    five = subprocess.run(
        ["man", "-M", str(pages), "5", "vmplug.toml"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    text = re.sub(r".\x08", "", five.stdout)
    assert "token_file" in text and "[[rule]]" in text
