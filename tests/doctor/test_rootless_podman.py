"""The doctor against a real Podman API service (Debian's podman): rootless (run as
nobody) it says device_cgroup_rules does nothing there; rootful it does not.

Each service keeps its storage in the test's own folders (--root/--runroot) and is
stopped by PID when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.chroot import in_chroot, user_namespaces_refused
from vmplug.doctor.container import check_rootless_podman
from vmplug.doctor.container_info import engine_info
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Severity

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "tests" / "fixtures" / "doctor" / "compose"
NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(
        shutil.which("podman") is None or shutil.which("setpriv") is None or os.geteuid() != 0,
        reason="needs Debian's podman, setpriv, and root (to run one service as nobody)",
    ),
    pytest.mark.skipif(in_chroot(), reason="Podman's service does not come up inside a chroot"),
]

Start = Callable[[bool], Path]


@pytest.fixture
def podman_service() -> Iterator[Start]:
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    made: list[Path] = []

    def start(rootless: bool) -> Path:
        # nobody cannot walk into pytest's 0700 tmp_path: a folder of its own in /tmp
        base = Path(tempfile.mkdtemp(prefix="vmplug-podman-", dir="/tmp"))
        made.append(base)
        for sub in ("home", "run", "root", "runroot"):
            (base / sub).mkdir(parents=True)
            if rootless:
                os.chown(base / sub, NOBODY, NOBODY)
        (base / "run").chmod(0o700)
        if rootless:
            os.chown(base, NOBODY, NOBODY)
        sock = base / "run" / "podman.sock"
        argv = [
            "podman", "--log-level=error", "--storage-driver=vfs", "--root", str(base / "root"),
            "--runroot", str(base / "runroot"),
            "system", "service", "--time=0", f"unix://{sock}",
        ]  # fmt: skip
        if rootless:
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(base / "home"),
            "XDG_RUNTIME_DIR": str(base / "run"),
        }
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=base,
            start_new_session=True,  # podman re-executes itself: its child is in this group
        )
        started.append((proc, base))
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"podman system service did not come up: {err}")
            time.sleep(0.1)
        return sock

    yield start
    for proc, base in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the service and the child it re-executed
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
        # rootless podman's pause process (it holds the user namespace) sits in a
        # session of its own and writes its PID here
        pause = base / "run" / "libpod" / "tmp" / "pause.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pause.read_text().strip()), signal.SIGKILL)
    for base in made:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(f"{base}/"):  # should a storage driver have mounted one
                subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(
    user_namespaces_refused(),
    reason="the kernel refuses a user namespace here (a chroot, or user.max_user_namespaces=0):"
    " rootless Podman cannot start",
)
def test_rootless_podman_is_found_and_said(podman_service: Start) -> None:
    sock = podman_service(True)
    info = engine_info(str(sock), 10.0)
    assert info.podman and info.rootless and info.version
    assert any("host.security.rootless = true" in e for e in info.evidence) or any(
        "name=rootless" in e for e in info.evidence
    )
    ctx = DoctorContext(
        api_sockets=[str(sock)], compose_files=[COMPOSE / "no-cgroup-rule.yml"], timeout=10.0
    )
    found = list(check_rootless_podman(ctx))
    assert len(found) == 1
    (f,) = found
    assert f.severity is Severity.WARNING and f.check == "container.rootless-podman"
    assert "device_cgroup_rules does nothing" in f.title and str(sock) in f.title
    assert f.fix is not None and "keep-groups" in f.fix


def test_rootful_podman_is_not_reported(podman_service: Start) -> None:
    sock = podman_service(False)
    info = engine_info(str(sock), 10.0)
    assert info.podman and not info.rootless
    ctx = DoctorContext(api_sockets=[str(sock)], timeout=10.0)
    assert list(check_rootless_podman(ctx)) == []
    assert [e.address for e in ctx.containers.engines] == [str(sock)]
