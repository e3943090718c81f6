"""The config loader: typed models, and errors that name file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmplug.config import ConfigError, load_config, parse_config

GOOD = """\
# vmplug config
[vm.windows]
qmp = "/srv/windows/qmp/qmp.sock"

[vm.lab]
qmp = "tcp:127.0.0.1:4444"
shared = true
usb_bus = "xhci.0"

[[rule]]
attach = "windows"
match  = 'id 1235:821a'

[[rule]]
block = true
match = 'with-interface one-of { 03:01:01 }'

[daemon]
socket = "/tmp/vmplug.sock"
"""


def test_good_config_is_typed() -> None:
    config = parse_config(GOOD, "vmplug.toml")
    assert sorted(config.vms) == ["lab", "windows"]
    assert config.vms["lab"].is_tcp and config.vms["lab"].shared
    assert config.vms["lab"].usb_bus == "xhci.0"
    assert not config.vms["windows"].shared
    assert [r.attach for r in config.rules] == ["windows", None]
    assert [r.block for r in config.rules] == [False, True]
    assert [r.line for r in config.rules] == [10, 14]
    assert config.daemon.socket == "/tmp/vmplug.sock"
    assert config.daemon.database == "/var/lib/vmplug/vmplug.db"


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/vmplug/vmplug.toml")
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        # TOML syntax: tomllib's position, our format
        ('[vm.w]\nqmp = "/x\n', 2, 10, "invalid TOML"),
        # unknown key in a VM table: points at the key's value
        ('[vm.w]\nqmp = "/x"\nqmpp = "/y"\n', 3, 8, "unknown key 'qmpp'"),
        # unknown top-level table
        ('# c\n[vms.w]\nqmp = "/x"\n', 2, None, "unknown key 'vms'"),
        ("# c\nvm = 1\n", 2, 6, "vm must be tables"),
        # missing qmp
        ("[vm.w]\nshared = true\n", 1, None, "missing qmp"),
        # relative socket path
        ('[vm.w]\nqmp = "qmp.sock"\n', 2, 7, "must be absolute"),
        # bad tcp address
        ('[vm.w]\nqmp = "tcp:127.0.0.1"\n', 2, 7, "is not tcp:HOST:PORT"),
        # wrong type
        ('[vm.w]\nqmp = "/x"\nshared = "yes"\n', 3, 10, "shared must be a boolean"),
        # a rule that attaches to an undefined VM
        ('[vm.w]\nqmp = "/x"\n[[rule]]\nattach = "win"\nmatch = "id 1:2"\n', 4, 10, "'win'"),
        # neither attach nor block
        ("[[rule]]\nmatch = 'id 1235:821a'\n", 1, None, "exactly one of"),
        # both attach and block
        (
            '[vm.w]\nqmp = "/x"\n[[rule]]\nattach = "w"\nblock = true\nmatch = "id 1235:*"\n',
            3,
            None,
            "exactly one of",
        ),
        # missing match
        ('[vm.w]\nqmp = "/x"\n[[rule]]\nattach = "w"\n', 3, None, "missing match"),
        # bad rule text: the column points into the rule, after the quote
        ("[[rule]]\nblock = true\nmatch = 'id 12x5:821a'\n", 3, 13, "bad match rule"),
        # unknown key in a rule
        ("[[rule]]\nblock = true\nmatch = 'id 1:*'\nvm = 'x'\n", 4, 6, "unknown key 'vm'"),
        # a VM name that cannot be a QEMU-safe name
        ('[vm."a b"]\nqmp = "/x"\n', None, None, "VM name"),
    ],
)
def test_errors_name_line_column_and_expectation(
    text: str, line: int | None, column: int | None, words: str
) -> None:
    err = _error(text)
    assert words in err.message
    assert err.line == line
    assert err.column == column
    rendered = err.render()
    assert rendered.startswith("/etc/vmplug/vmplug.toml")
    if line is not None:
        assert rendered.startswith(f"/etc/vmplug/vmplug.toml:{line}")
    if column is not None:
        # the caret stands under the column, below the excerpt
        excerpt_line, caret_line = rendered.splitlines()[1:3]
        assert caret_line.index("^") == column + 1  # two spaces of indent, 1-based column
        assert excerpt_line.strip()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"[vm.w]\nqmp = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_env_names_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("VMPLUG_CONFIG", str(path))
    assert load_config().path == str(path)
