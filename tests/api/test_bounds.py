"""Hostile clients of the API: over-long requests, connection and stream floods,
half-open and idle connections, and device ids that are not quite ids.

The daemon, its API and real QEMU VMs run in the test's loop (tests/support/apirig);
the clients are raw sockets, so nothing is smoothed over by an HTTP library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.apirig import TOKEN, ApiRig
from vmplug.api.limits import Limits
from vmplug.cli.daemon import _JournalFormatter

pytestmark = pytest.mark.qemu

AUTH = f"Authorization: Bearer {TOKEN}\r\n"


def request(path: str, extra: str = "", *, close: bool = True) -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}{extra}{conn}\r\n".encode()


async def exchange(
    port: int, data: bytes, *, source: str = "127.0.0.1", timeout: float = 10.0
) -> bytes:
    """Send ``data``, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def status_of(port: int, data: bytes, *, source: str = "127.0.0.1") -> int:
    answer = await exchange(port, data, source=source)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


@pytest.fixture
async def small_rig(tmp_path: Path) -> AsyncIterator[ApiRig]:
    """A rig whose API has small bounds, to reach them with a few sockets."""
    limits = Limits(
        max_connections=8,
        per_client=6,
        max_streams=3,
        streams_per_client=2,
        header_timeout=0.5,
        idle_timeout=1.0,
    )
    rig = ApiRig(tmp_path, limits=limits)
    try:
        yield rig
    finally:
        await rig.close()


async def test_an_over_long_request_is_one_warning_line(
    rig: ApiRig, caplog: pytest.LogCaptureFixture
) -> None:
    await rig.up()
    caplog.set_level(logging.DEBUG)
    long_line = f"GET /v1/status?{'a' * 9 * 1024} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    answer = await exchange(rig.port, long_line)
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:100]
    long_header = request("/v1/status", f"X-Big: {'b' * 9 * 1024}\r\n")
    assert (await exchange(rig.port, long_header)).split(b" ")[1] == b"400"
    garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\n" * 10
    await exchange(rig.port, garbage)
    await asyncio.sleep(0.1)
    fmt = _JournalFormatter(journal=False)
    bad = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert len(bad) >= 2, [r.getMessage() for r in caplog.records]
    for r in caplog.records:
        assert r.exc_info is None, f"a traceback in the log: {r.getMessage()}"
        assert "Error handling request" not in r.getMessage()
        assert "\n" not in fmt.format(r)
    assert all(r.levelno <= logging.WARNING for r in bad)  # non-HTTP bytes: aiohttp's DEBUG
    assert sum(r.levelno == logging.WARNING for r in bad) >= 2  # the two over-long ones
    assert any("LineTooLong" in r.getMessage() for r in bad)
    assert all(len(r.getMessage()) < 300 for r in bad)
    # and the API still answers
    assert await status_of(rig.port, request("/v1/status")) == 200


async def test_device_ids_are_matched_exactly(rig: ApiRig) -> None:
    await rig.up()
    assert await status_of(rig.port, request("/v1/devices/2-2.4.2")) == 200
    for odd in ("2-2.4.2%0a", "2-2.4.2%0A", "%202-2.4.2", "2-2.4.2%20", "2-2.4.2%09", "2-2.4.2%00"):
        assert await status_of(rig.port, request(f"/v1/devices/{odd}")) == 404, odd
    assert await status_of(rig.port, request("/v1/history?device=2-2.4.2")) == 200
    assert await status_of(rig.port, request("/v1/history?device=2-2.4.2%0a")) == 404
    assert await status_of(rig.port, request("/v1/health?device=0627:0001%0a")) == 404


async def test_connections_are_capped_per_client_and_in_total(small_rig: ApiRig) -> None:
    rig = small_rig
    await rig.up()
    assert rig.api is not None
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(6):  # per_client = 6: idle connections, no request yet
            held.append(await asyncio.open_connection("127.0.0.1", rig.port))
        await asyncio.sleep(0.05)
        answer = await exchange(rig.port, request("/v1/status"))
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        # another client (127.0.0.2 is loopback too) still gets in, up to the total of 8
        assert await status_of(rig.port, request("/v1/status"), source="127.0.0.2") == 200
        for _ in range(2):
            held.append(
                await asyncio.open_connection("127.0.0.1", rig.port, local_addr=("127.0.0.3", 0))
            )
        await asyncio.sleep(0.05)
        assert await status_of(rig.port, request("/v1/status"), source="127.0.0.4") == 503
        # the unix socket has its own bounds: the CLI is not locked out by a TCP flood
        reader, writer = await asyncio.open_unix_connection(str(rig.socket))
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: vmplug\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
        assert rig.api.gates["tcp"].refused == 2
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.6)  # the held ones are closed by then (header_timeout 0.5 s)
    assert await status_of(rig.port, request("/v1/status")) == 200
    assert rig.api.gates["tcp"].total == 0


@pytest.mark.parametrize("listener", ["tcp", "unix"])
async def test_unfinished_headers_and_idle_keep_alives_time_out(
    small_rig: ApiRig, listener: str
) -> None:
    """On TCP (aiohttp) and on the unix socket (vmplug.api.http) alike."""
    rig = small_rig
    await rig.up()
    assert rig.api is not None

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if listener == "unix":
            return await asyncio.open_unix_connection(str(rig.socket))
        return await asyncio.open_connection("127.0.0.1", rig.port)

    # half-open: a request line and a header, never the blank line; a byte now and then
    reader, writer = await connect()
    writer.write(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.1)
                writer.write(b"X")
                await writer.drain()

    dribble = asyncio.create_task(trickle())
    t0 = time.monotonic()
    try:
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        dribble.cancel()
        writer.close()
    closed_after = time.monotonic() - t0
    assert 0.3 < closed_after < 2.0, closed_after
    assert rig.api.gates[listener].timed_out == 1
    # idle keep-alive: one whole request, then silence
    reader, writer = await connect()
    writer.write(request("/v1/status", close=False))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), 5)  # the body, then EOF when closed
    idle = time.monotonic() - t0
    writer.close()
    assert rest and 0.5 < idle < 3.0, idle


async def test_event_streams_are_capped(small_rig: ApiRig) -> None:
    rig = small_rig
    await rig.up()
    assert rig.api is not None
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_stream(source: str) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", rig.port, local_addr=(source, 0)
        )
        streams.append((reader, writer))
        writer.write(request("/v1/events", close=False))
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)

    try:
        assert (await open_stream("127.0.0.1")).startswith(b"HTTP/1.1 200")
        assert (await open_stream("127.0.0.1")).startswith(b"HTTP/1.1 200")
        assert (await open_stream("127.0.0.1")).startswith(b"HTTP/1.1 503")  # 2 per client
        assert (await open_stream("127.0.0.2")).startswith(b"HTTP/1.1 200")
        assert (await open_stream("127.0.0.3")).startswith(b"HTTP/1.1 503")  # 3 in total
        assert rig.api.gates["tcp"].total_streams == 3
        # a stream is a request being answered: neither timeout ends it
        await asyncio.sleep(1.6)  # past header_timeout (0.5 s) and idle_timeout (1 s)
        assert rig.api.gates["tcp"].total_streams == 3
        reader, _ = streams[0]
        assert b"event: hello" in await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    finally:
        for _, w in streams:
            w.close()
    await asyncio.sleep(0.3)
    assert rig.api.gates["tcp"].total_streams == 0
    assert (await exchange(rig.port, request("/v1/status"))).startswith(b"HTTP/1.1 200")


def test_api_bounds_in_the_config() -> None:
    from vmplug.config import ConfigError, parse_config  # noqa: PLC0415

    config = parse_config("[api]\nmax_connections = 10\nheader_timeout = 2\nidle_timeout = 0.5\n")
    limits = Limits.from_config(config.api)
    assert (limits.max_connections, limits.header_timeout, limits.idle_timeout) == (10, 2.0, 0.5)
    assert Limits.from_config(parse_config("").api) == Limits()
    for bad in ("max_connections = 0", 'max_streams = "9"', "header_timeout = -1"):
        with pytest.raises(ConfigError):
            parse_config(f"[api]\n{bad}\n")
