"""The unit's sandbox lines, read back by systemd's own tools (systemd-analyze)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmplug.generate.systemd import plan_systemd

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian: systemd)"
)


def _exe(tmp_path: Path) -> str:
    exe = tmp_path / "bin" / "vmplug"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(exe)


def _analyze(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    unit = tmp_path / "vmplug.service"
    unit.write_text(text)
    return subprocess.run(
        ["systemd-analyze", *args, str(unit)], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def _lines(text: str, key: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(key + "=")]


def test_sockets_under_home_keep_home_readable(tmp_path: Path) -> None:
    plan = plan_systemd(
        _exe(tmp_path),
        sockets=["/home/ann/vms/win qmp/qmp.sock", "/srv/vm/qmp.sock", "tcp:127.0.0.1:4444"],
        state=["/run/vmplug/vmplug.sock", "/srv/vmplug/vmplug.db"],
    )
    text = plan.text()
    assert _lines(text, "ProtectHome") == ["read-only"]
    assert _lines(text, "ReadWritePaths") == [
        '-/sys/devices -/srv/vmplug "-/home/ann/vms/win qmp" -/srv/vm'
    ]
    res = _analyze(tmp_path, text, "verify")
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_exposure(tmp_path: Path) -> None:
    text = plan_systemd(_exe(tmp_path), sockets=["/srv/vm/qmp.sock"]).text()
    assert _lines(text, "ProtectHome") == ["yes"]
    assert _lines(text, "Type") == ["notify"]
    assert _lines(text, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    res = _analyze(tmp_path, text, "security", "--offline=yes")
    m = re.search(r"Overall exposure level for vmplug.service: ([\d.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 3.0, res.stdout


def test_a_vmplug_under_tmp_keeps_tmp(tmp_path: Path) -> None:
    """PrivateTmp= would hide a vmplug (or a QMP socket) under /tmp: the unit keeps
    the real /tmp there, and only there (a clone in /tmp, as CI makes, must run)."""
    text = plan_systemd(_exe(tmp_path), sockets=["/srv/vm/qmp.sock"]).text()
    assert str(tmp_path).startswith("/tmp/")
    assert _lines(text, "PrivateTmp") == ["no"]
    text = plan_systemd("/usr/bin/vmplug", sockets=["/tmp/vm/qmp.sock"]).text()
    assert _lines(text, "PrivateTmp") == ["no"]
    text = plan_systemd("/usr/bin/vmplug", sockets=["/srv/vm/qmp.sock"]).text()
    assert _lines(text, "PrivateTmp") == ["yes"]
