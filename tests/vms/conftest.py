"""Fixtures for the VM backends beyond a plain QMP socket: real QEMU processes,
a private libvirtd, and a Docker Engine API served on a unix socket."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.vmrig import (
    DockerApiServer,
    Libvirt,
    private_libvirtd,
)


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
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with private_libvirtd("vmplug-lv-") as lv:
        yield lv
