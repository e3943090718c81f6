"""The guest-additions layer against real parts: the real ``qemu-ga`` (run as a
host process on a unix socket, with and without ``-b``), a real QEMU with
``-spice`` and spicevmc usbredir channels, and Windows documents shaped after
Microsoft's (tests/fixtures/doctor/windows/README.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket as s
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity
from vmplug.doctor.guest import agent_findings, check_guest, parse_version
from vmplug.wire.qga import GuestAgent, commands

AgentFactory = Callable[..., Path]


@pytest.fixture
def real_agent() -> Iterator[AgentFactory]:
    """Start the real qemu-ga on a unix socket (extra args: ``-b CMDS``); every one
    is killed by PID at teardown."""
    if shutil.which("qemu-ga") is None:
        pytest.skip("qemu-ga is not installed (Debian: qemu-guest-agent)")
    procs: list[subprocess.Popen[bytes]] = []
    dirs: list[str] = []

    def start(*extra: str) -> Path:
        d = tempfile.mkdtemp(prefix="vmplug-ga", dir="/tmp")
        dirs.append(d)
        sock = Path(d) / "qga.sock"
        (Path(d) / "state").mkdir()
        proc = subprocess.Popen(
            ["qemu-ga", "-m", "unix-listen", "-p", str(sock), "-t", f"{d}/state",
             "-f", f"{d}/qga.pid", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"qemu-ga exited: {err}")
            assert time.monotonic() < deadline, "qemu-ga did not create its socket"
            time.sleep(0.02)
        return sock

    yield start
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _by_check(found: list[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in found:
        out.setdefault(f.check, []).append(f)
    return out


# ---------------------------------------------------------------- the agent's health


def test_healthy_agent_ping_info_osinfo(real_agent: AgentFactory) -> None:
    sock = real_agent()
    with GuestAgent(sock) as agent:
        agent.ping()
        info = agent.info()
        osinfo = agent.osinfo()
    cmds = commands(info)
    assert cmds["guest-exec"] and cmds["guest-file-open"] and cmds["guest-ping"]
    assert parse_version(info["version"]) >= (2, 10)  # type: ignore[operator]
    found = _by_check(list(check_guest(DoctorContext(qga_socket=str(sock), vm="lab"))))
    (agent_ok,) = found["guest.agent"]
    assert agent_ok.severity is Severity.OK
    assert f"qemu-ga {info['version']}" in agent_ok.evidence[0]
    assert "guest-ping answered" in agent_ok.evidence[0]
    assert (
        osinfo["id"] in agent_ok.evidence[1]
        or str(osinfo.get("pretty-name")) in (agent_ok.evidence[1])
    )
    (cmd_ok,) = found["guest.agent-commands"]
    assert cmd_ok.severity is Severity.OK and "guest-file-read" in cmd_ok.evidence[0]
    # the Linux walk ran (it needs guest-file-*): a finding of its own
    assert "guest.linux-usb" in found


def test_blocked_commands_are_found_with_the_fix(real_agent: AgentFactory) -> None:
    """qemu-ga -b (Debian 12's 7.2 spells it --blacklist) disables commands: the
    agent itself says enabled=false, and the doctor names them and where to look."""
    sock = real_agent("-b", "guest-file-open,guest-file-read,guest-exec")
    found = _by_check(list(check_guest(DoctorContext(qga_socket=str(sock), vm="lab"))))
    (blocked,) = found["guest.agent-commands"]
    assert blocked.severity is Severity.WARNING
    assert "guest-file-open (read a Linux guest's /sys/bus/usb)" in blocked.title
    assert "guest-file-read" in blocked.title
    assert "guest-exec " not in blocked.title  # a Linux guest: guest-exec is not what we use
    assert "guest-info: guest-file-open enabled=false" in blocked.evidence
    assert blocked.fix and "BLACKLIST_RPC" in blocked.fix and "block-rpcs=" in blocked.fix
    assert "remove guest-file-open,guest-file-read there" in blocked.fix
    # the walk that needs them is not attempted (no error, no empty listing)
    assert "guest.linux-usb" not in found and not any(
        f.check.endswith(".failed") for fs in found.values() for f in fs
    )


def test_windows_agent_blocked_exec_and_too_old() -> None:
    """guest-info as qemu-ga on Windows answers (virtio-win's 2.5 had no guest-get-osinfo)."""
    info = {
        "version": "2.5.0",
        "supported_commands": [
            {"name": n, "enabled": n != "guest-exec", "success-response": True}
            for n in ("guest-sync", "guest-ping", "guest-info", "guest-exec", "guest-exec-status")
        ],
    }
    found = _by_check(agent_findings("win", "/qmp/qga.sock", info, {"id": "mswindows"}))
    (old,) = found["guest.agent-version"]
    assert old.severity is Severity.WARNING and "2.5.0 is older than 2.10" in old.title
    blocked, missing = found["guest.agent-commands"]
    assert "guest-exec (run Get-PnpDevice" in blocked.title
    assert (
        blocked.fix
        and "Services\\QEMU-GA" in blocked.fix
        and "Restart-Service QEMU-GA" in (blocked.fix)
    )
    assert "does not have guest-get-osinfo" in missing.title


def test_no_agent_on_the_channel(tmp_path: Path) -> None:
    path = tmp_path / "qga.sock"
    srv = s.socket(s.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)  # a channel whose guest side nobody answers (no agent in the guest)
    try:
        found = list(check_guest(DoctorContext(qga_socket=str(path), vm="w", timeout=0.5)))
    finally:
        srv.close()
    (f,) = found
    assert f.severity is Severity.WARNING and "does not answer" in f.title
    assert f.fix and "qemu-guest-agent" in f.fix
