"""Fixtures for the VM backends beyond a plain QMP socket: real QEMU processes,
a private libvirtd, and a Docker Engine API served on a unix socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vms.vmrig import XHCI, DockerApiServer, Libvirt, QemuFactory, QemuProcess, stop_process


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
    lv = Libvirt(root, env, uid)
    try:
        lv.launch()
        yield lv
    finally:
        proc = lv.proc
        if proc is not None and proc.poll() is None:
            for name in lv.virsh("list", "--name", check=False).stdout.split():
                lv.virsh("destroy", name, check=False)
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)
