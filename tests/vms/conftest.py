"""Fixtures for the VM backends beyond a plain QMP socket: real QEMU processes,
a private libvirtd, and a Docker Engine API served on a unix socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent.parent / "qemu"))

from qemu_proc import XHCI, QemuProcess

DOCKER_FIXTURES = Path(__file__).parent.parent / "fixtures" / "docker"
SYSFS_FIXTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"

QemuFactory = Callable[..., QemuProcess]


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuFactory]:
    """Make QEMU processes (not started); all killed by PID at teardown."""
    made: list[QemuProcess] = []

    def make(extra_args: Sequence[str] = XHCI, **kw: Any) -> QemuProcess:
        kw.setdefault("name", f"vm{len(made)}")
        proc = QemuProcess(tmp_path, extra_args, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()


def docker_doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCKER_FIXTURES / f"{name}.json").read_text())
    return data


@dataclass
class DockerApiServer:
    """Serves ``GET /containers/{id}/json`` and ``/containers/json`` from ``docs``
    (by name without the leading slash, and by id), as the Docker Engine does."""

    socket: str
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def add(self, doc: dict[str, Any]) -> None:
        self.docs[str(doc["Name"]).lstrip("/")] = doc

    def find(self, ref: str) -> dict[str, Any] | None:
        if ref in self.docs:
            return self.docs[ref]
        for doc in self.docs.values():
            if len(ref) >= 12 and str(doc["Id"]).startswith(ref):
                return doc
        return None


@pytest.fixture
async def docker_api() -> AsyncIterator[DockerApiServer]:
    sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-dk", dir="/tmp"))
    server = DockerApiServer(socket=str(sock_dir / "docker.sock"))

    async def inspect(request: web.Request) -> web.Response:
        server.requests.append(request.path_qs)
        doc = server.find(request.match_info["ref"])
        if doc is None:
            return web.json_response(
                {"message": f"No such container: {request.match_info['ref']}"}, status=404
            )
        return web.json_response(doc)

    async def listing(request: web.Request) -> web.Response:
        server.requests.append(request.path_qs)
        return web.json_response(
            [
                {
                    "Id": d["Id"],
                    "Names": [d["Name"]],
                    "Image": d["Config"]["Image"],
                    "State": d["State"]["Status"],
                    "Mounts": d["Mounts"],
                }
                for d in server.docs.values()
            ]
        )

    app = web.Application()
    app.router.add_get("/containers/json", listing)
    app.router.add_get("/containers/{ref}/json", inspect)
    app.router.add_get("/v{version}/containers/json", listing)
    app.router.add_get("/v{version}/containers/{ref}/json", inspect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, server.socket)
    await site.start()
    try:
        yield server
    finally:
        await runner.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# A private libvirtd: unprivileged (session mode, as nobody when the tests run
# as root) so every path it uses is under the test's own directory.


@dataclass
class Libvirt:
    root: Path
    env: dict[str, str]
    uid: int
    proc: subprocess.Popen[str]

    @property
    def uri(self) -> str:
        return f"qemu:///session?socket={self.root}/run/libvirt/libvirt-sock"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            env=self.env,
            user=self.uid,
            group=self.uid,
            extra_groups=[],
            timeout=120,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
        return res

    def define(self, name: str, *, start: bool = True) -> None:
        """A TCG q35 domain with a qemu-xhci controller and no OS."""
        path = self.root / f"{name}.xml"
        path.write_text(domain_xml(name))
        os.chown(path, self.uid, self.uid)
        self.virsh("define", str(path))
        if start:
            self.virsh("start", name)

    def qemu_pid(self, name: str) -> int | None:
        pidfile = self.root / "config" / "libvirt" / "qemu" / "run" / f"{name}.pid"
        for candidate in (pidfile, self.root / "run" / "libvirt" / "qemu" / "run" / f"{name}.pid"):
            with contextlib.suppress(OSError, ValueError):
                return int(candidate.read_text().strip())
        return None


def domain_xml(name: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"}</emulator>
    <controller type='usb' model='qemu-xhci'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirt]:
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: libvirt-daemon, libvirt-clients)")
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    root = Path(tempfile.mkdtemp(prefix="vmplug-lv-"))
    for sub in ("home", "run", "config", "cache", "data"):
        (root / sub).mkdir(parents=True)
    (root / "run").chmod(0o700)
    if os.geteuid() == 0:
        root.chmod(0o755)
        for dirpath, _dirs, _files in os.walk(root):
            os.chown(dirpath, uid, uid)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(root / "home"),
        "XDG_RUNTIME_DIR": str(root / "run"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_DATA_HOME": str(root / "data"),
        "LANG": "C.UTF-8",
    }
    log = (root / "libvirtd.log").open("w")
    proc = subprocess.Popen(
        ["libvirtd", "--timeout", "0"],
        env=env,
        user=uid,
        group=uid,
        extra_groups=[],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lv = Libvirt(root, env, uid, proc)
    try:
        sock = root / "run" / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"libvirtd exited {proc.returncode}: {(root / 'libvirtd.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd did not create its socket")
            time.sleep(0.1)
        yield lv
    finally:
        if proc.poll() is None:
            for name in lv.virsh("list", "--name", check=False).stdout.split():
                lv.virsh("destroy", name, check=False)
        _stop(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
