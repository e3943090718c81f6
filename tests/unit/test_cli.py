"""`vmplug match`, `check-config` and usb.ids names through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmplug.cli import cli

MIXED = Path(__file__).parent.parent / "fixtures" / "sysfs" / "mixed"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--sysfs-root", str(MIXED), *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_match_lists_port_paths() -> None:
    code, out, _ = run("match", "--json", "id 0627:0001")
    assert code == 0
    assert json.loads(out) == ["1-3", "2-2.4.1", "2-2.4.2"]
    code, out, _ = run("match", "--json", "with-interface one-of { 01:*:* }")
    assert (code, json.loads(out)) == (0, ["2-2.1"])
    # equals (no operator): exactly one interface of class 03 with protocol 01
    code, out, _ = run("match", "--json", "with-interface 03:01:01")
    assert (code, json.loads(out)) == (0, ["2-2.4.2"])


def test_match_never_lists_hubs() -> None:
    code, out, _ = run("match", "--json", "id *:*")
    assert code == 0
    assert "2-2" not in json.loads(out) and "2-2.4" not in json.loads(out)


def test_match_nothing_is_exit_1() -> None:
    code, out, _err = run("match", "--json", 'serial "no such serial"')
    assert (code, json.loads(out)) == (1, [])


def test_bad_rule_is_exit_2_with_caret_and_no_traceback() -> None:
    code, out, err = run("match", "id 1235:82g1")
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("<rule>:1:4: error:")
    assert lines[1] == "id 1235:82g1"
    assert lines[2].index("^") == 3
    assert "Traceback" not in err


CONFIG = """\
[vm.win]
qmp = "/run/win.sock"

[[rule]]
attach = "win"
match = 'with-interface one-of { 01:*:* }'

[[rule]]
block = true
match = 'id 0627:*'
"""


def test_check_config_decides_every_device(tmp_path: Path) -> None:
    cfg = tmp_path / "vmplug.toml"
    cfg.write_text(CONFIG)
    code, out, err = run("check-config", "--json", str(cfg))
    assert code == 0
    rows = {d["port"]: d for d in json.loads(out)["devices"]}
    assert rows["2-2.1"]["vm"] == "win" and rows["2-2.1"]["rule"] == 1
    assert rows["2-2.1"]["line"] == 4
    assert {p for p, d in rows.items() if d["rule"] == 2} == {"1-3", "2-2.4.1", "2-2.4.2"}
    assert all(d["action"] == "block" for d in rows.values() if d["rule"] == 2)
    assert rows["2-2"]["action"].startswith("hub")
    assert rows["3-1"]["rule"] is None and rows["3-1"]["vm"] is None
    # the readable form says the same, and honours VMPLUG_CONFIG
    code, out, err = run("check-config", env={"VMPLUG_CONFIG": str(cfg)})
    assert code == 0 and "ok (1 VMs, 2 rules)" in err
    assert "attach to win" in out


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[vm.win]\nqmp = 'x'\n", ":2:7: error:"),
        ("[[rule]]\nattach = 'nowhere'\nmatch = 'id 1:2'\n", ":2:10: error:"),
        ("[[rule]]\nblock = true\nmatch = 'id 1235:8z1a'\n", ":3:13: error:"),
    ],
)
def test_check_config_errors_exit_2(tmp_path: Path, text: str, where: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code, _out, err = run("check-config", str(cfg))
    assert code == 2
    assert err.startswith(f"{cfg}{where}")
    assert "^" in err and "Traceback" not in err


def test_names_from_usb_ids_when_the_device_gives_none(tmp_path: Path) -> None:
    root = tmp_path / "sysfs"
    shutil.copytree(MIXED, root, symlinks=True)
    tablet = (root / "bus/usb/devices/1-3").resolve()
    (tablet / "manufacturer").unlink()
    (tablet / "product").unlink()
    ids = tmp_path / "usb.ids"
    ids.write_text("# test\n0627  Adomax Technology Co., Ltd\n\t0001  QEMU Tablet\n0628  Other\n")
    result = CliRunner().invoke(
        cli, ["--sysfs-root", str(root), "list", "--json"], env={"VMPLUG_USB_IDS": str(ids)}
    )
    dev = next(d for d in json.loads(result.stdout) if d["port"] == "1-3")
    assert dev["manufacturer"] == "Adomax Technology Co., Ltd"
    assert dev["product"] == "QEMU Tablet"
    # without a usb.ids the fields are empty, not an error
    result = CliRunner().invoke(
        cli, ["--sysfs-root", str(root), "list", "--json"], env={"VMPLUG_USB_IDS": ""}
    )
    dev = next(d for d in json.loads(result.stdout) if d["port"] == "1-3")
    assert dev["manufacturer"] is None and dev["product"] is None
