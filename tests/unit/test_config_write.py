"""The one config writer (vmplug.config_write), used by `init` and `--persist`:
rules written for devices read from a real kernel's sysfs match exactly those
devices once the config is loaded again; an existing file keeps its comments;
a config that would not load is never written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmplug.config import ConfigError, load_config, parse_config
from vmplug.config_write import (
    NewRule,
    add_rule,
    match_for,
    prepend_rule,
    render_config,
    rule_escape,
    write_config,
)
from vmplug.host.inventory import read_devices
from vmplug.model import UsbDevice
from vmplug.rules import parse_rule

MIXED = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs" / "mixed"


def devices() -> dict[str, UsbDevice]:
    return {d.port: d for d in read_devices(MIXED) if not d.is_hub}


def matched(rule: str) -> set[str]:
    parsed = parse_rule(rule)
    return {port for port, d in devices().items() if parsed.matches(d)}


def test_match_for_names_the_device_as_asked() -> None:
    devs = devices()
    # two tablets share 0627:0001: "this" tells them apart by serial, "id" does not
    assert match_for(devs["1-3"], "this") == 'id 0627:0001 serial "28754-0000:00:0c.0-3"'
    assert matched(match_for(devs["1-3"], "this")) == {"1-3"}
    assert matched(match_for(devs["1-3"], "id")) == {"1-3", "2-2.4.1", "2-2.4.2"}
    assert match_for(devs["2-2.4.1"], "port") == 'via-port "2-2.4.1"'
    assert matched(match_for(devs["2-2.4.1"], "port")) == {"2-2.4.1"}


def test_a_device_without_a_serial_is_named_by_its_port() -> None:
    dev = devices()["1-3"]
    bare = dataclasses.replace(dev, serial=None)
    assert match_for(bare, "this") == 'id 0627:0001 via-port "1-3"'


@pytest.mark.parametrize("serial", ['a"b', "back\\slash", "tab\there", "ünï", "it's"])
def test_escaped_serials_read_back_as_the_same_serial(serial: str) -> None:
    dev = devices()["1-1"]
    odd = dataclasses.replace(dev, serial=serial)
    text = render_config(
        [("win", {"qmp": "/run/win.sock"}, None)], [NewRule("win", match_for(odd, "this"))]
    )
    config = parse_config(text, "<test>")
    assert config.rules[0].rule.matches(odd)
    assert not config.rules[0].rule.matches(dev)
    assert '"' not in rule_escape(serial).replace('\\"', "")


def test_render_config_writes_what_loads_and_labels_each_rule() -> None:
    devs = devices()
    text = render_config(
        [
            ("win", {"qmp": "/run/win.sock"}, "found: process, running"),
            ("lin", {"libvirt": "lin"}, None),
        ],
        [
            NewRule("win", match_for(devs["2-2.1"], "id"), label="2-2.1 QEMU USB Audio"),
            NewRule("lin", match_for(devs["3-1"], "port")),
        ],
    )
    config = parse_config(text, "<test>")
    assert sorted(config.vms) == ["lin", "win"]
    assert [r.attach for r in config.rules] == ["win", "lin"]
    lines = text.splitlines()
    assert all(r.line is not None and lines[r.line - 1] == "[[rule]]" for r in config.rules)
    assert [p for p, d in devices().items() if config.rules[0].rule.matches(d)] == ["2-2.1"]
    assert [p for p, d in devices().items() if config.rules[1].rule.matches(d)] == ["3-1"]
    assert "# 2-2.1 QEMU USB Audio" in text and "# found: process, running" in text


CONFIG = """\
# the user's own words, kept
[vm.win]
qmp = "/run/win.sock"  # vmplug's socket

[[rule]]
attach = "win"
match = 'id 0627:*'  # both tablets and the keyboard
"""


def test_prepend_rule_puts_it_first_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "vmplug.toml"
    path.write_text(CONFIG)
    dev = devices()["1-1"]
    add_rule(path, NewRule(None, match_for(dev, "this"), note="added by vmplug --persist"))
    text = path.read_text()
    assert text.endswith(CONFIG.split("\n\n", 1)[1])  # the old rule, comments and all
    assert text.startswith(CONFIG.split("\n\n", 1)[0])
    config = load_config(path)
    first, second = config.rules
    assert first.block and first.rule.matches(dev)
    assert 'comment = "added by vmplug --persist"' in text
    assert second.attach == "win"
    assert not list(tmp_path.glob("*.vmplug-tmp"))


def test_a_config_with_no_rule_gets_its_first() -> None:
    text = prepend_rule('[vm.win]\nqmp = "/run/win.sock"\n', NewRule("win", "id 1235:821a"))
    assert [r.attach for r in parse_config(text, "<test>").rules] == ["win"]


def test_what_would_not_load_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "vmplug.toml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError):
        add_rule(path, NewRule("nosuchvm", "id 1235:821a"))
    with pytest.raises(ConfigError):
        write_config(path, CONFIG + "[[rule]]\nattach = 'win'\nmatch = 'id 1234:'\n")
    assert path.read_text() == CONFIG
    assert not list(tmp_path.glob("*.vmplug-tmp"))
