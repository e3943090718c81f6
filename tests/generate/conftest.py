"""Fixtures for the generator tests: golden files, real QEMU, a private libvirtd.

Every process a test starts is stopped by its PID in a finalizer, also when
the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.vmrig import Libvirt, private_libvirtd
from vmplug.wire.errors import CommandError
from vmplug.wire.qmp import SyncQmp

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "generate"
QEMU = shutil.which("qemu-system-x86_64")


def _stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    """Compare with tests/golden/generate/NAME; VMPLUG_UPDATE_GOLDEN=1 rewrites it."""

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if os.environ.get("VMPLUG_UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.exists(), f"{path} missing: run with VMPLUG_UPDATE_GOLDEN=1"
        assert text == path.read_text(encoding="utf-8"), f"differs from {path}"

    return check


class Qmp:
    """The tests' blocking QMP session: :class:`vmplug.wire.qmp.SyncQmp` with
    keyword arguments, an error reply raised as :class:`RuntimeError`."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self._session = SyncQmp(path, timeout=timeout, name="generate-test")

    def cmd(self, name: str, **arguments: Any) -> Any:
        try:
            return self._session.execute(name, arguments or None)
        except CommandError as exc:
            raise RuntimeError(f"{name}: {exc}") from exc

    def qom_get(self, path: str, prop: str) -> Any:
        return self.cmd("qom-get", path=path, property=prop)

    def close(self) -> None:
        self._session.close()


@dataclass
class QemuRun:
    proc: subprocess.Popen[str]
    qmp: Qmp


@pytest.fixture
def start_qemu(tmp_path: Path) -> Iterator[Callable[[list[str]], QemuRun]]:
    """Start ``qemu-system-x86_64 -S`` (TCG, no OS) with extra args; QMP on a test socket."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    started: list[QemuRun] = []

    def start(extra: list[str]) -> QemuRun:
        sock = tmp_path / f"test-qmp-{len(started)}.sock"
        argv = [
            QEMU,
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
            *extra,
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"QEMU exited {proc.returncode}: {out}")
            if time.monotonic() > deadline:
                _stop(proc)
                raise AssertionError("QEMU did not create its QMP socket")
            time.sleep(0.05)
        run = QemuRun(proc, Qmp(sock))
        started.append(run)
        return run

    yield start
    for run in started:
        run.qmp.close()
        _stop(run.proc)


def qemu_fails(extra: list[str]) -> str:
    """Run QEMU expecting it to refuse ``extra`` at start-up; its message."""
    assert QEMU is not None
    res = subprocess.run(
        [QEMU, "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        input="",
        check=False,
    )
    assert res.returncode != 0, "QEMU accepted what it should refuse"
    return res.stderr


# ---------------------------------------------------------------------------
# A private libvirtd: unprivileged (session mode) so every path it uses is
# under the test's own directory, never /run/libvirt or /etc/libvirt.


@pytest.fixture
def libvirtd() -> Iterator[Libvirt]:
    with private_libvirtd("vmplug-libvirt-") as lv:
        yield lv
