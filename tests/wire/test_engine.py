"""wire.engine against an Engine-API peer on a unix socket and on TCP.

No container engine runs on the test machines.  The peer answers as Debian's
Docker 20.10 does: ``GET /version`` names ApiVersion 1.41 and a newer
prefix is refused with HTTP 400 and Docker's own message; the events stream
is line-delimited JSON, sent in chunks that split lines.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vmplug.errors import VmplugError
from vmplug.wire.engine import Engine, candidates, find_engine, get_json_sync
from vmplug.wire.errors import EngineError

from .conftest import FIXTURES

DOCS = {d["Id"]: d for d in json.loads((FIXTURES / "doctor/docker/windows-bad.json").read_text())}
EVENTS = [
    {"Type": "container", "Action": "start", "Actor": {"ID": "c2d4", "Attributes": {"name": "w"}}},
    {"Type": "container", "Action": "die", "Actor": {"ID": "c2d4", "Attributes": {"name": "w"}}},
]


class Docker2010:
    """Docker 20.10's answers to the calls vmplug makes (API 1.41)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.bodies: list[Any] = []
        self.closed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.version_check])
        app.router.add_get("/_ping", self.ping)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v{v}/containers/json", self.listing)
        app.router.add_get("/v{v}/containers/{id}/json", self.inspect)
        app.router.add_post("/v{v}/containers/{id}/restart", self.restart)
        app.router.add_get("/v{v}/events", self.events)
        return app

    @web.middleware
    async def version_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        m = re.match(r"^/v([0-9.]+)/", request.path)
        if m and tuple(map(int, m.group(1).split("."))) > (1, 41):
            return web.json_response(
                {
                    "message": f"client version {m.group(1)} is too new. "
                    "Maximum supported API version is 1.41"
                },
                status=400,
            )
        resp: web.StreamResponse = await handler(request)
        return resp

    async def ping(self, _r: web.Request) -> web.Response:
        return web.Response(text="OK", headers={"Api-Version": "1.41"})

    async def version(self, _r: web.Request) -> web.Response:
        return web.json_response(
            {"Version": "20.10.24+dfsg1", "ApiVersion": "1.41", "MinAPIVersion": "1.12"}
        )

    async def listing(self, _r: web.Request) -> web.Response:
        return web.json_response([{"Id": i, "Names": [d["Name"]]} for i, d in DOCS.items()])

    async def inspect(self, request: web.Request) -> web.Response:
        doc = DOCS.get(request.match_info["id"])
        if doc is None:
            return web.json_response({"message": "No such container: x"}, status=404)
        return web.json_response(doc)

    async def restart(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.text())
        return web.Response(status=204)

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        data = b"".join(json.dumps(e).encode() + b"\n" for e in EVENTS)
        for i in range(0, len(data), 7):  # chunks that cut lines and JSON apart
            await resp.write(data[i : i + 7])
            await asyncio.sleep(0.001)
        # a stream stays open until the client lets go
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)
        self.closed.set()
        return resp


@pytest.fixture
async def docker(tmp_path: Path) -> AsyncIterator[tuple[str, Docker2010]]:
    peer = Docker2010()
    runner = web.AppRunner(peer.app())
    await runner.setup()
    sock = str(tmp_path / "docker.sock")
    await web.UnixSite(runner, sock).start()
    yield sock, peer
    await runner.cleanup()


async def test_version_is_negotiated_never_assumed(docker: tuple[str, Docker2010]) -> None:
    sock, peer = docker
    engine = Engine(sock, timeout=5)
    listing = await engine.containers()
    assert engine.api_version == "1.41"
    (cid,) = [c["Id"] for c in listing]
    doc = await engine.inspect(cid)
    assert doc is not None and doc["Name"] == DOCS[cid]["Name"]
    assert await engine.inspect("nope") is None
    assert peer.seen == [
        "/_ping",
        "/v1.41/containers/json?all=1",
        f"/v1.41/containers/{cid}/json",
        "/v1.41/containers/nope/json",
    ]
    assert await engine.post_json(f"/containers/{cid}/restart", {"t": 1}) is None
    assert peer.bodies == ['{"t": 1}']


async def test_a_version_the_engine_refuses(docker: tuple[str, Docker2010]) -> None:
    """What assuming 1.43 gets from Docker 20.10: a typed error with its message."""
    sock, _ = docker
    with pytest.raises(EngineError) as info:
        await Engine(sock, timeout=5, api_version="1.43").containers()
    err = info.value
    assert err.status == 400 and err.path == "/v1.43/containers/json"
    assert "Maximum supported API version is 1.41" in str(err)
    assert isinstance(err, VmplugError) and isinstance(err, OSError)


async def test_events_stream_is_line_delimited_json(docker: tuple[str, Docker2010]) -> None:
    sock, peer = docker
    got = []
    stream = Engine(sock, timeout=5).events({"type": ["container"]})
    async for event in stream:
        got.append(event)
        if len(got) == len(EVENTS):
            break
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()
    assert got == EVENTS
    await asyncio.wait_for(peer.closed.wait(), 5)  # closing the iterator closed the stream
    assert peer.seen[-1].startswith("/v1.41/events?filters=")


async def test_tcp(docker: tuple[str, Docker2010]) -> None:
    _, peer = docker
    runner = web.AppRunner(peer.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        engine = Engine(f"tcp://127.0.0.1:{port}", timeout=5)
        assert len(await engine.containers()) == 1
        assert (await engine.version())["ApiVersion"] == "1.41"
    finally:
        await runner.cleanup()


async def test_unreachable_and_mute_engines(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="cannot reach the API") as info:
        await Engine(str(tmp_path / "none.sock"), timeout=1).containers()
    assert info.value.status is None
    mute = tmp_path / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(mute))
    srv.listen(1)
    try:
        with pytest.raises(EngineError, match="timed out"):
            await Engine(str(mute), timeout=0.5).containers()
        # the blocking front for the doctor, called from a loop's thread too
        with pytest.raises(EngineError, match="timed out"):
            await asyncio.to_thread(get_json_sync, str(mute), "/containers/json", 0.5)
    finally:
        srv.close()


def test_blocking_front(tmp_path: Path) -> None:
    sock = tmp_path / "docker.sock"

    async def serve_and_call() -> Any:
        runner = web.AppRunner(Docker2010().app())
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        try:
            return await asyncio.to_thread(get_json_sync, str(sock), "/containers/json", 5)
        finally:
            await runner.cleanup()

    assert [c["Id"] for c in asyncio.run(serve_and_call())] == list(DOCS)


def test_socket_discovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert candidates() == [
        "/var/run/docker.sock",
        "/run/podman/podman.sock",
        f"{tmp_path}/podman/podman.sock",
    ]
    assert candidates("unix:///srv/d.sock") == ["/srv/d.sock"]
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.2:2375")
    assert candidates() == ["tcp://10.0.0.2:2375"]
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    assert candidates() == ["/run/user/1000/docker.sock"]
    monkeypatch.delenv("DOCKER_HOST")
    (tmp_path / "podman").mkdir()
    (tmp_path / "podman" / "podman.sock").touch()  # rootless Podman, when nothing else is
    found = find_engine()
    if not Path("/var/run/docker.sock").exists() and not Path("/run/podman/podman.sock").exists():
        assert found is not None and found.address == f"{tmp_path}/podman/podman.sock"
