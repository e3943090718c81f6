"""Real qemu-system-x86_64 processes for integration tests (no OS, TCG).

    proc = QemuProcess(tmp_path, extra_args=["-device", "qemu-xhci,id=xhci"])
    sock = proc.start()          # path of the first QMP socket
    ...
    proc.stop()                  # SIGKILL by PID, then wait

Use the ``qemu`` fixture (tests/conftest.py) rather than calling
``stop()`` yourself: it stops every process it made, even when a test fails.
Each QEMU also gets PR_SET_PDEATHSIG, so it dies with the test process even
if pytest itself is killed.

Several QMP sockets (``qmp_sockets=2``) let a test show vmplug's own socket
beside another client's: ``proc.qmp_paths[1]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

QEMU = os.environ.get("VMPLUG_TEST_QEMU", "qemu-system-x86_64")
#: A machine with a USB controller; no OS, no display, paused (-S).
BASE_ARGS = ("-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64", "-S")
XHCI = ("-device", "qemu-xhci,id=xhci")
PR_SET_PDEATHSIG = 1


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuError(RuntimeError):
    pass


class QemuProcess:
    """One QEMU; sockets live in a short private directory (sun_path is 108 bytes)."""

    def __init__(
        self,
        tmp_path: Path,
        extra_args: Sequence[str] = XHCI,
        *,
        machine: str = "q35",
        qmp_sockets: int = 1,
        sock_dir: Path | None = None,
        name: str = "vm",
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.extra_args = list(extra_args)
        self.machine = machine
        self.name = name
        self._own_dir = sock_dir is None
        self.sock_dir = (
            Path(tempfile.mkdtemp(prefix="vmplug-q", dir="/tmp")) if sock_dir is None else sock_dir
        )
        self.qmp_paths = [self.sock_dir / f"{name}-qmp{i}.sock" for i in range(qmp_sockets)]
        self.log_path = self.tmp_path / f"{name}-qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_path(self) -> str:
        return str(self.qmp_paths[0])

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise QemuError("not started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        args = [QEMU, "-machine", self.machine, *BASE_ARGS, "-name", self.name]
        for path in self.qmp_paths:
            args += ["-qmp", f"unix:{path},server=on,wait=off"]
        return args + self.extra_args

    def start(self, timeout: float = 10.0) -> str:
        """Start QEMU and wait until its QMP sockets listen; return the first one."""
        if self.alive:
            raise QemuError("already running")
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads start QEMUs)
            )
        deadline = time.monotonic() + timeout
        pending = list(self.qmp_paths)
        while pending:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited ({self.proc.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise QemuError(f"QMP sockets not up after {timeout} s: {self.log()}")
            pending = [p for p in pending if not _listening(p)]
            if pending:
                time.sleep(0.01)
        return self.qmp_path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal by PID (SIGKILL leaves the socket files behind, as in life)."""
        if self.alive:
            os.kill(self.pid, sig)
            if sig == signal.SIGKILL:
                self.wait()

    def wait(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGKILL by PID and reap; safe to call twice, or on a process that died."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped QEMU must die too
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _listening(path: Path) -> bool:
    if not path.exists():
        return False
    # A socket file may be left from a killed QEMU: the new one listens once
    # QEMU has re-bound it.  A connect is queued, never served (no greeting read).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


#: What the ``qemu`` fixture (tests/conftest.py) hands a test: makes QemuProcess objects.
QemuFactory = Callable[..., QemuProcess]
