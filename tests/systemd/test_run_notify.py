"""``vmplug run`` speaks sd_notify to ``$NOTIFY_SOCKET`` (real daemon, real QEMU).

The test is the service manager: a unix datagram socket with ``SO_PASSCRED``,
so that, like systemd's ``NotifyAccess=main``, it knows which process sent
each message.  It sees READY=1 only once the API socket answers and the first
pass is done, WATCHDOG=1 at half of ``WATCHDOG_USEC``, STATUS= following the VM's
connection, RELOADING=1 with MONOTONIC_USEC and READY=1 around a SIGHUP, and
STOPPING=1 on SIGTERM.  (The same under a real systemd:
test_unit_under_systemd.py.)
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.apirig import ApiRig

pytestmark = pytest.mark.qemu

WATCHDOG_USEC = 1_000_000


def recv(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict[str, str]]:
    """One notification: (the sender's pid, its fields)."""
    sock.settimeout(timeout)
    data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = -1
    for level, kind, raw in anc:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            pid = struct.unpack("iII", raw[:12])[0]
    return pid, dict(x.split("=", 1) for x in data.decode().splitlines())


def until_field(sock: socket.socket, key: str, deadline_s: float = 20.0) -> list[dict[str, str]]:
    """Messages up to and including the first that has ``key``."""
    seen = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        _pid, fields = recv(sock, end - time.monotonic())
        seen.append(fields)
        if key in fields:
            return seen
    raise AssertionError(f"no {key} in {seen}")


def test_run_notifies(rig: ApiRig, tmp_path: Path) -> None:
    q = rig.qemu("a")
    q.start()
    sock_path = rig.sock_dir / "run.sock"
    config = tmp_path / "run.toml"
    config.write_text(
        f'[daemon]\nsocket = "{sock_path}"\ndatabase = "{tmp_path}/run.db"\n\n'
        f'[vm.a]\nqmp = "{q.qmp_paths[0]}"\n\n'
        "[[rule]]\nattach = 'a'\nmatch = 'via-port \"2-2.4.2\"'\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    vmplug = str(Path(sys.executable).parent / "vmplug")
    env = {
        **os.environ,
        "VMPLUG_SYSFS_ROOT": str(rig.kernel.root),
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [vmplug, "--config", str(config), "run", "--events", f"replay:{rig.kernel.fifo}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        pid, first = recv(notify, 30)
        assert pid == proc.pid, (pid, proc.pid)
        assert first["READY"] == "1", first
        assert first["STATUS"].endswith("VMs connected, 0/1 devices attached") or first[
            "STATUS"
        ].startswith("1/1 VMs connected"), first
        # READY=1 means the API answers now
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock_path))
        # the watchdog, at half of WATCHDOG_USEC, and STATUS catching up with QEMU
        stamps: list[float] = []
        status = first["STATUS"]
        end = time.monotonic() + 20
        while (len(stamps) < 4 or status != "1/1 VMs connected, 1/1 devices attached") and (
            time.monotonic() < end
        ):
            _pid, fields = recv(notify)
            if "WATCHDOG" in fields:
                stamps.append(time.monotonic())
            status = fields.get("STATUS", status)
        assert status == "1/1 VMs connected, 1/1 devices attached", status
        gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
        # every 0.5 s, never as late as WATCHDOG_USEC (systemd would kill it)
        assert gaps and 0.4 < gaps[len(gaps) // 2] < 0.7 and gaps[-1] < 1.0, gaps
        # SIGHUP: RELOADING=1 (+ MONOTONIC_USEC), then READY=1
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        seen = until_field(notify, "RELOADING")
        assert int(seen[-1]["MONOTONIC_USEC"]) >= before
        seen = until_field(notify, "READY")
        assert seen[-1]["STATUS"] == "1/1 VMs connected, 1/1 devices attached"
        # SIGTERM: STOPPING=1, then the daemon ends
        proc.send_signal(signal.SIGTERM)
        until_field(notify, "STOPPING")
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        notify.close()
