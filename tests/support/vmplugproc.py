"""A real ``vmplug run`` process with its own config, captured sysfs tree
(:class:`fakekernel.FakeKernel`, uevents replayed) and API socket, and the
one-shot ``vmplug`` commands against it (tests/remote: device hosts and VM
hosts side by side on loopback).  Stopped by PID in :meth:`Proc.close`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.fakekernel import FakeKernel

VMPLUG = [sys.executable, "-m", "vmplug"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One ``vmplug run`` with its config, sysfs tree and API socket."""

    def __init__(self, tmp: Path, name: str, capture: str, config: str) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.kernel = FakeKernel(self.dir, capture)
        self.sock = Path(tempfile.mkdtemp(prefix=f"vmplug-{name}", dir="/tmp")) / "api.sock"
        self.config = self.dir / "vmplug.toml"
        daemon = f'[daemon]\nsocket = "{self.sock}"\ndatabase = "{self.dir / "vmplug.db"}"\n\n'
        self.config.write_text(daemon + config)
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[str] | None = None

    def env(self) -> dict[str, str]:
        return os.environ | {
            "VMPLUG_SYSFS_ROOT": str(self.kernel.root),
            "VMPLUG_CONFIG": str(self.config),
            "COLUMNS": "200",
        }

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [*VMPLUG, "run", "--events", f"replay:{self.kernel.fifo}"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        wait(self.sock.exists, f"{self.dir.name}'s API socket", self)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def vmplug(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VMPLUG, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def json(self, *args: str) -> Any:
        res = self.vmplug(*args, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
        self.kernel.close()
        shutil.rmtree(self.sock.parent, ignore_errors=True)


def wait(check: Callable[[], Any], what: str, proc: Proc | None = None, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{proc.dir.name} exited: {proc.log.read_text()}")
        if time.monotonic() > deadline:
            logs = "" if proc is None else proc.log.read_text()[-3000:]
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.1)
