"""`vmplug doctor`'s exit status: 0 nothing wrong, 1 found problems, 2 bad input.

The host is a sysfs tree captured from a real kernel; the kernel logs and compose
files are the doctor fixtures (tests/fixtures/doctor).  Bad input exits 2 before any
check runs: nothing is printed on stdout, the reason is on stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmplug.cli.app import cli

REPO = Path(__file__).resolve().parents[2]
MINIMAL = REPO / "tests" / "fixtures" / "sysfs" / "minimal"
MIXED = REPO / "tests" / "fixtures" / "sysfs" / "mixed"
DOCTOR = REPO / "tests" / "fixtures" / "doctor"


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    empty = tmp_path / "vmplug.toml"
    empty.write_text("# no VMs, no rules\n")
    monkeypatch.setenv("VMPLUG_CONFIG", str(empty))
    (tmp_path / "proc").mkdir()
    (tmp_path / "dev").mkdir()
    clean = tmp_path / "clean.log"
    clean.write_text("[    1.000000] usb 1-1: new high-speed USB device number 2 using xhci_hcd\n")
    return [
        "--proc-root", str(tmp_path / "proc"), "--dev-root", str(tmp_path / "dev"),
        "--docker-socket", str(tmp_path / "no.sock"), "--kernel-log", str(clean),
    ]  # fmt: skip


def doctor(sysfs: Path, *args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["--sysfs-root", str(sysfs), "doctor", *args])
    assert "Traceback" not in res.output
    return res.exit_code, res.stdout, res.stderr


def test_nothing_wrong_is_0(base: list[str]) -> None:
    rc, out, _ = doctor(MINIMAL, *base, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["status"] == "ok" and doc["exit_status"] == 0
    assert doc["counts"]["warning"] == doc["counts"]["error"] == 0


def test_found_errors_is_1(base: list[str]) -> None:
    rc, out, _ = doctor(MINIMAL, *base, "--kernel-log", str(DOCTOR / "kernel" / "hub-errors.log"))
    assert rc == 1
    rc, out, _ = doctor(
        MINIMAL, *base, "--json", "--kernel-log", str(DOCTOR / "kernel" / "hub-errors.log")
    )
    doc = json.loads(out)
    assert rc == 1 and doc["exit_status"] == 1 and doc["counts"]["error"] >= 1
    assert doc["status"] == "error"
    # an error fails also with --fail-on error
    rc, _, _ = doctor(
        MINIMAL,
        *base,
        "--fail-on",
        "error",
        "--kernel-log",
        str(DOCTOR / "kernel" / "hub-errors.log"),
    )
    assert rc == 1


def test_warnings_only_fail_unless_fail_on_error(base: list[str]) -> None:
    compose = DOCTOR / "compose" / "qmp-not-mounted.yml"
    rc, out, _ = doctor(MINIMAL, *base, "--json", "--compose", str(compose))
    doc = json.loads(out)
    severities = {f["severity"] for f in doc["findings"]}
    assert (
        "error" not in severities
        and "warning" in severities
        and rc == 1
        and doc["status"] == "warning"
    )
    rc, out, _ = doctor(MINIMAL, *base, "--json", "--fail-on", "error", "--compose", str(compose))
    assert rc == 0 and json.loads(out)["exit_status"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["rule:id zz:qq"],  # a rule that does not parse
        ["   "],  # an empty selector
        ["--fail-on", "never"],  # a value click refuses
        ["--compose", "/nonexistent/compose.yml"],  # no such file
    ],
)
def test_bad_input_is_2(base: list[str], args: list[str]) -> None:
    rc, out, err = doctor(MIXED, *base, *args)
    assert rc == 2 and out == "" and err.strip()


def test_unreadable_and_invalid_files_are_2(base: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("services: [unclosed\n")
    rc, out, err = doctor(MIXED, *base, "--compose", str(broken))
    assert rc == 2 and out == "" and "--compose" in err and str(broken) in err
    notjson = tmp_path / "inspect.json"
    notjson.write_text("{not json")
    rc, out, err = doctor(MIXED, *base, "--inspect", str(notjson))
    assert rc == 2 and out == "" and "--inspect" in err
    if os.geteuid() != 0:  # root reads a mode-0 file anyway
        locked = tmp_path / "kern.log"
        locked.write_text("x\n")
        locked.chmod(0)
        rc, out, err = doctor(MIXED, *base, "--kernel-log", str(locked))
        assert rc == 2 and "cannot read" in err
    rc, out, err = doctor(MIXED, *base, "--compose", str(broken), "--json")
    assert rc == 2 and out == ""  # --json: no half document either


def test_bad_config_is_2(base: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm.x]\nqmp = 'relative.sock'\n")
    rc, _, err = doctor(MIXED, *base, "--config", str(bad))
    assert rc == 2 and "bad.toml" in err
