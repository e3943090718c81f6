"""The unix socket's own HTTP/1.1 server (vmplug.api.http) against hostile and odd clients.

The real Api on a real unix socket (a daemon that is built, not started: the
routes below need no VM); the clients are raw sockets, so nothing is smoothed
over by an HTTP library.  The same bounds as aiohttp's on TCP
(tests/api/test_bounds.py): over-long lines and heads, broken requests,
oversized bodies, half-open requests, idle keep-alives, connection caps.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.apirig import FIXTURES
from vmplug.api.limits import Limits
from vmplug.api.server import Api
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.host.events import ReplayEventSource


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Api, Path]]:
    config = parse_config('[vm.a]\nqmp = "/nonexistent"\n', "/x.toml")
    daemon = Daemon(
        config, sysfs_root=FIXTURES / "mixed", source=ReplayEventSource(Path("/nonexistent"))
    )
    limits = Limits(max_connections=8, per_client=4, header_timeout=0.5, idle_timeout=1.0)
    api = Api(daemon, metrics=False, limits=limits)
    sock = tmp_path / "api.sock"
    await api.start_unix(sock)
    try:
        yield api, sock
    finally:
        await api.stop()


async def exchange(sock: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def get(path: str, extra: str = "", *, close: bool = True) -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: vmplug\r\n{extra}{conn}\r\n".encode()


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(": ")
        headers[k.lower()] = v
    return int(lines[0].split(" ")[1]), headers, body


async def test_answers_and_keeps_alive_in_order(api: tuple[Api, Path]) -> None:
    _, sock = api
    # two requests in one write (pipelined), then a HEAD that closes
    data = get("/v1/openapi.json", close=False) + get("/v1/status", close=False)
    data += b"HEAD /v1/openapi.json HTTP/1.1\r\nHost: vmplug\r\nConnection: close\r\n\r\n"
    answer = await exchange(sock, data)
    first, rest = answer.split(b"\r\n\r\n", 1)
    code, headers, _ = split(first + b"\r\n\r\n")
    assert code == 200 and headers["content-type"] == "application/json"
    length = int(headers["content-length"])
    doc = json.loads(rest[:length])
    assert "/v1/status" in doc["paths"]
    code, headers, tail = split(rest[length:])
    assert code == 200 and headers["content-type"] == "application/json; charset=utf-8"
    n = int(headers["content-length"])
    assert {"vms", "attachments"} <= json.loads(tail[:n]).keys()
    code, headers, body = split(tail[n:])
    assert code == 200 and body == b"" and int(headers["content-length"]) == length
    assert headers["connection"] == "close" and headers["x-content-type-options"] == "nosniff"


async def test_unknown_routes_and_methods_are_json_errors(api: tuple[Api, Path]) -> None:
    _, sock = api
    code, _, body = split(await exchange(sock, get("/v1/nothing")))
    assert code == 404 and json.loads(body) == {"error": "not found"}
    answer = await exchange(sock, b"DELETE /v1/status HTTP/1.1\r\nHost: vmplug\r\n\r\n", 5)
    code, headers, body = split(answer)
    assert code == 405 and headers["allow"] == "GET,HEAD"
    assert json.loads(body)["allowed"] == ["GET", "HEAD"]
    # the path is percent-decoded before it is matched (the decoded newline stays)
    code, _, body = split(await exchange(sock, get("/v1/devices/2-2.4.2%0a")))
    assert code == 404 and "'2-2.4.2\\n'" in json.loads(body)["error"], body


async def test_bad_requests_are_refused_and_logged_in_one_line(
    api: tuple[Api, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, sock = api
    caplog.set_level(logging.DEBUG)
    long_line = f"GET /v1/status?{'a' * 9 * 1024} HTTP/1.1\r\nHost: vmplug\r\n\r\n".encode()
    assert split(await exchange(sock, long_line))[0] == 400
    assert split(await exchange(sock, get("/v1/status", f"X-Big: {'b' * 9000}\r\n")))[0] == 400
    huge_head = get("/v1/status", "".join(f"X-{i}: {'c' * 1000}\r\n" for i in range(80)))
    assert split(await exchange(sock, huge_head))[0] == 400
    many = get("/v1/status", "".join(f"X-{i}: c\r\n" for i in range(150)))
    assert split(await exchange(sock, many))[0] == 400
    garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
    assert split(await exchange(sock, garbage))[0] == 400
    assert split(await exchange(sock, b"GET /v1/status\r\n\r\n"))[0] == 400
    assert split(await exchange(sock, get("/v1/status", "no colon here\r\n")))[0] == 400
    big = b"POST /v1/attach HTTP/1.1\r\nHost: v\r\nContent-Length: 70000\r\n\r\n"
    assert split(await exchange(sock, big))[0] == 413
    chunked = b"POST /v1/attach HTTP/1.1\r\nHost: v\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert split(await exchange(sock, chunked))[0] == 501
    bad = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert len(bad) >= 9, [r.getMessage() for r in caplog.records]
    for r in caplog.records:
        assert r.exc_info is None, f"a traceback in the log: {r.getMessage()}"
    assert all(r.levelno == logging.WARNING and len(r.getMessage()) < 300 for r in bad)
    assert any("LineTooLong" in r.getMessage() for r in bad)
    # and it still answers
    assert split(await exchange(sock, get("/v1/status")))[0] == 200


async def test_a_body_is_read_whole_and_checked(api: tuple[Api, Path]) -> None:
    _, sock = api
    body = json.dumps({"device": "2-2.4.2", "vm": "nope"}).encode()
    head = f"POST /v1/attach HTTP/1.1\r\nHost: v\r\nContent-Length: {len(body)}\r\n"
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body[:5])
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest of the body in another write
        writer.write(body[5:])
        code, _, answer = split(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()
    # the whole body arrived and was parsed: the device it names was looked for
    assert code == 404 and "no USB device matches '2-2.4.2'" in json.loads(answer)["error"]
    extra = head.replace(str(len(body)), "2").encode() + b"\r\n{}"  # unknown-free, fields missing
    code, _, answer = split(await exchange(sock, extra))
    assert code == 400 and "missing string field" in json.loads(answer)["error"]


async def test_a_connection_cut_mid_body_leaves_nothing_open(api: tuple[Api, Path]) -> None:
    """(Half-open requests and idle keep-alives: tests/api/test_bounds.py, both listeners.)"""
    server, sock = api
    gate = server.gates["unix"]
    # a connection cut in the middle of a body: nothing left open
    _, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(b"POST /v1/attach HTTP/1.1\r\nHost: v\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    writer.close()

    async def drained() -> None:
        while gate.total or server._conns:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(drained(), 5)


async def test_connections_are_capped(api: tuple[Api, Path]) -> None:
    server, sock = api
    held = [await asyncio.open_unix_connection(str(sock)) for _ in range(4)]  # per_client 4
    try:
        # one more is answered 503 at once (read before sending: a unix socket closed
        # with unread bytes in it resets the peer, which may lose the answer)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        assert server.gates["unix"].refused == 1
    finally:
        for _, w in held:
            w.close()

    async def freed() -> None:
        while server.gates["unix"].total:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(freed(), 5)
    assert split(await exchange(sock, get("/v1/status")))[0] == 200


async def test_the_event_stream_is_chunked_and_ends_on_stop(tmp_path: Path) -> None:
    config = parse_config('[vm.a]\nqmp = "/nonexistent"\n', "/x.toml")
    daemon = Daemon(
        config, sysfs_root=FIXTURES / "mixed", source=ReplayEventSource(Path("/nonexistent"))
    )
    api = Api(daemon, metrics=False)
    sock = tmp_path / "api.sock"
    await api.start_unix(sock)
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(get("/v1/events", close=False))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
        size = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        chunk = await reader.readexactly(int(size, 16) + 2)
        assert b"event: hello" in chunk
        assert api.gates["unix"].total_streams == 1
    finally:
        await api.stop()
    # stop ends the stream: the last chunk, then the connection closes
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest in (b"", b"0\r\n\r\n"), rest
    writer.close()
    assert api.gates["unix"].total_streams == 0
