"""Fixtures for the generator tests: golden files, real QEMU, a private libvirtd.

Every process a test starts is stopped by its PID in a finalizer, also when
the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.vmrig import Libvirt, private_libvirtd

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
    """A minimal synchronous QMP client (one command at a time, events skipped)."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        data: dict[str, Any] = json.loads(line)
        return data

    def cmd(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            return reply["return"]

    def try_cmd(self, name: str, **arguments: Any) -> tuple[bool, Any]:
        try:
            return True, self.cmd(name, **arguments)
        except RuntimeError as exc:
            return False, str(exc)

    def qom_get(self, path: str, prop: str) -> Any:
        return self.cmd("qom-get", path=path, property=prop)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


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
