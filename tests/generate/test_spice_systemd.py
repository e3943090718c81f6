"""`vmplug generate spice` (QEMU's usb-redir takes the filter) and
`vmplug generate systemd` (systemd-analyze verify, --install)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.devices import AUDIO, DISK, HUB, KEYLAB
from tests.support.parsers import parse_exec_start, usbredir_string_to_rules
from vmplug.generate import spice, systemd
from vmplug.generate.common import CannotExpress
from vmplug.host import install

from .conftest import QemuRun, qemu_fails

# ---------------------------------------------------------------------------
# spice


def test_spice_golden(golden: Callable[[str, str], None]) -> None:
    plan = spice.plan_spice([AUDIO, KEYLAB])
    golden("spice-filter.txt", spice.render(plan, "spice"))
    golden("spice-filter-qemu.txt", spice.render(plan, "qemu"))


def test_spice_rules() -> None:
    plan = spice.plan_spice([AUDIO, KEYLAB], match_version=True)
    rules = usbredir_string_to_rules(plan.filter(","), ",")
    assert rules == [
        (-1, 0x46F4, 0x0002, 0x0000, 1),
        (-1, 0x1C75, 0x02CB, 0x0100, 1),
        (-1, -1, -1, -1, 0),
    ]
    assert usbredir_string_to_rules(plan.filter(":"), ":") == rules
    open_plan = spice.plan_spice([DISK], allow_others=True)
    assert usbredir_string_to_rules(open_plan.filter(), ",")[-1] == (-1, -1, -1, -1, 1)
    with pytest.raises(CannotExpress, match="hub"):
        spice.plan_spice([HUB])


def test_qemu_usb_redir_takes_the_filter(start_qemu: Callable[[list[str]], QemuRun]) -> None:
    plan = spice.plan_spice([AUDIO, KEYLAB, DISK])
    qfilter = spice.render(plan, "qemu").strip()
    run = start_qemu(
        [
            "-chardev",
            "null,id=redir0",
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            f"usb-redir,id=redir,chardev=redir0,bus=xhci.0,filter={qfilter}",
        ]
    )
    assert run.qmp.qom_get("/machine/peripheral/redir", "filter") == qfilter


def test_qemu_refuses_a_broken_filter() -> None:
    """The check above means something: QEMU parses the filter at realize."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    err = qemu_fails(
        [
            "-chardev",
            "null,id=redir0",
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "usb-redir,chardev=redir0,bus=xhci.0,filter=-1:0x1235:0x821a:1",
        ]
    )
    assert "filter" in err


# ---------------------------------------------------------------------------
# systemd


def _exe(tmp_path: Path) -> str:
    """An executable that exists (systemd-analyze verify checks ExecStart's)."""
    exe = tmp_path / "bin dir" / "vmplug"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(exe)


def test_systemd_golden(golden: Callable[[str, str], None]) -> None:
    plan = systemd.plan_systemd("/usr/local/bin/vmplug", config="/etc/vmplug/vmplug.toml")
    golden("vmplug.service", plan.text())


def _verify(unit: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    res = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


@pytest.mark.parametrize(
    "config", [None, "/etc/vmplug/vmplug.toml", '/etc/my vm\'s/%h $HOME "q" \\x;.toml']
)
def test_systemd_analyze_verify(tmp_path: Path, config: str | None) -> None:
    plan = systemd.plan_systemd(_exe(tmp_path), config=config)
    unit = tmp_path / "vmplug.service"
    unit.write_text(plan.text())
    _verify(unit)
    (exec_line,) = [ln for ln in plan.text().splitlines() if ln.startswith("ExecStart=")]
    assert parse_exec_start(exec_line.removeprefix("ExecStart=")) == list(plan.exec_argv)


def test_systemd_verify_catches_bad_quoting(tmp_path: Path) -> None:
    """systemd-analyze verify would notice a quoting mistake."""
    unit = tmp_path / "bad.service"
    text = systemd.plan_systemd(_exe(tmp_path)).text()
    unit.write_text(text.replace("ExecStart=", 'ExecStart="'))
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert res.returncode != 0


def test_systemd_unit_content() -> None:
    text = systemd.plan_systemd("/usr/bin/vmplug").text()
    assert "Restart=on-failure" in text
    after = next(ln for ln in text.splitlines() if ln.startswith("After="))
    assert "systemd-udevd.service" in after and "docker.service" in after
    assert "WantedBy=multi-user.target" in text
    with pytest.raises(CannotExpress, match="absolute"):
        systemd.plan_systemd("vmplug")
    with pytest.raises(CannotExpress, match="separates commands"):
        systemd.plan_systemd("/usr/bin/vmplug", config=";")


def test_systemd_install(tmp_path: Path) -> None:
    log = tmp_path / "systemctl.log"
    tool = tmp_path / "systemctl"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    tool.chmod(0o755)
    plan = systemd.plan_systemd("/usr/bin/vmplug")
    done = install.install_unit(plan, unit_dir=tmp_path / "units", systemctl=str(tool))
    assert (tmp_path / "units" / "vmplug.service").read_text() == plan.text()
    assert log.read_text().splitlines() == ["daemon-reload", "enable --now vmplug.service"]
    assert done[0].startswith("wrote ") and "enable --now" in done[-1]


def test_systemd_install_reports_failure(tmp_path: Path) -> None:
    tool = tmp_path / "systemctl"
    tool.write_text("#!/bin/sh\necho 'System has not been booted with systemd' >&2\nexit 1\n")
    tool.chmod(0o755)
    done = install.install_unit(
        systemd.plan_systemd("/usr/bin/vmplug"), unit_dir=tmp_path, systemctl=str(tool)
    )
    assert "failed" in done[-1] and "not been booted" in done[-1]
