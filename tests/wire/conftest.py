"""Wire-layer tests: real qemu-system-x86_64 (tests/support/qemu_proc.py) and a real
qemu-ga run as a host process; the Engine API against an HTTP peer on a socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.qemu_proc import QemuProcess, qemu_available  # tests/support

FIXTURES = Path(__file__).parent.parent / "fixtures"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if qemu_available():
        return
    skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed")
    for item in items:
        if item.get_closest_marker("qemu"):
            item.add_marker(skip)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory for sockets (sun_path is 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vmplug-w", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Any]:
    """Make QEMU processes; every one is killed by PID at teardown."""
    made: list[QemuProcess] = []

    def make(extra_args: list[str], **kw: Any) -> QemuProcess:
        proc = QemuProcess(tmp_path, extra_args, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()


@pytest.fixture
def qemu_ga(sock_dir: Path) -> Iterator[Path]:
    """The real ``qemu-ga`` listening on a unix socket as a host process (it needs
    no VM); stopped by PID at teardown."""
    if shutil.which("qemu-ga") is None:
        pytest.skip("qemu-ga is not installed (Debian: qemu-guest-agent)")
    path = sock_dir / "qga.sock"
    state = sock_dir / "state"
    state.mkdir()
    proc = subprocess.Popen(
        ["qemu-ga", "-m", "unix-listen", "-p", str(path), "-t", str(state),
         "-f", str(sock_dir / "qga.pid")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"qemu-ga exited: {err}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-ga did not create its socket")
            time.sleep(0.02)
        yield path
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
