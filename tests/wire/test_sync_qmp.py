"""SyncQmp, the blocking QMP front, against real qemu-system-x86_64 processes."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vmplug.errors import VmplugError
from vmplug.wire.errors import AddressError, CommandError, WireError, WireTimeout
from vmplug.wire.qmp import SyncQmp, parse_address

pytestmark = pytest.mark.qemu


def test_query_status_and_an_event(qemu: Any) -> None:
    proc = qemu(["-device", "qemu-xhci,id=xhci"])
    sock = proc.start()
    with SyncQmp(sock, timeout=5) as q:
        assert q.execute("query-status")["status"] == "prelaunch"
        q.execute("cont")
        ev = q.wait_event("RESUME", timeout=5)
        assert ev["event"] == "RESUME"
        assert q.execute("query-status")["status"] == "running"
        names = {p["name"] for p in q.execute("qom-list", {"path": "/machine/peripheral"})}
        assert "xhci" in names


def test_error_reply_is_a_command_error_with_its_class(qemu: Any) -> None:
    sock = qemu([]).start()
    with SyncQmp(sock, timeout=5) as q:
        with pytest.raises(CommandError) as info:
            q.execute("qom-list", {"path": "/machine/peripheral/nope"})
        assert info.value.qmp_class == "DeviceNotFound"
        assert info.value.command == "qom-list" and info.value.address == sock
        assert isinstance(info.value, VmplugError)
        with pytest.raises(CommandError) as info:
            q.execute("no-such-command")
        assert info.value.qmp_class == "CommandNotFound"
        # the session survives an error reply
        assert q.execute("query-status")["status"] == "prelaunch"


def test_a_socket_nobody_answers_times_out(sock_dir: Path) -> None:
    """A listening socket that never greets (as a QMP socket another client holds)."""
    path = sock_dir / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        began = time.monotonic()
        with pytest.raises(WireTimeout, match="timed out") as info:
            SyncQmp(path, timeout=0.5)
        took = time.monotonic() - began
    finally:
        srv.close()
    assert 0.4 < took < 3.0
    assert info.value.address == str(path)


def test_a_socket_another_client_holds(qemu: Any) -> None:
    sock = qemu([]).start()
    with SyncQmp(sock, timeout=5) as holder:
        with pytest.raises(WireTimeout):
            SyncQmp(sock, timeout=0.5)
        assert holder.execute("query-status")["status"] == "prelaunch"
    # let go: the next client is greeted
    with SyncQmp(sock, timeout=5) as q:
        assert q.execute("query-status")["status"] == "prelaunch"


def test_no_socket_and_bad_addresses(sock_dir: Path) -> None:
    with pytest.raises(WireError, match="No such file or directory") as info:
        SyncQmp(sock_dir / "none.sock", timeout=1)
    assert not isinstance(info.value, WireTimeout)
    with pytest.raises(AddressError, match="tcp:HOST:PORT"):
        SyncQmp("tcp:localhost", timeout=1)
    with pytest.raises(ValueError, match="tcp:HOST:PORT"):  # an AddressError is one
        parse_address("tcp:localhost")


def test_tcp_address(qemu: Any) -> None:
    """-qmp on 127.0.0.1 port 0: the port QEMU took is read from query-chardev."""
    chardev = ["-chardev", "socket,id=tcpqmp,host=127.0.0.1,port=0,server=on,wait=off",
               "-mon", "chardev=tcpqmp,mode=control"]  # fmt: skip
    sock = qemu(chardev).start()
    with SyncQmp(sock, timeout=5) as q:
        (dev,) = [c for c in q.execute("query-chardev") if c["label"] == "tcpqmp"]
    port = int(dev["filename"].split(",")[0].rsplit(":", 1)[1])
    with SyncQmp(f"tcp:127.0.0.1:{port}", timeout=5) as q:
        assert q.execute("query-status")["status"] == "prelaunch"
    assert parse_address(f"tcp:[::1]:{port}") == ("::1", port)


def test_usable_from_a_thread_that_runs_a_loop(qemu: Any) -> None:
    """The doctor is called from async code too (asyncio.to_thread, async tests)."""
    import asyncio  # noqa: PLC0415

    sock = qemu([]).start()

    async def inside() -> str:
        with SyncQmp(sock, timeout=5) as q:
            return str(q.execute("query-status")["status"])

    assert asyncio.run(inside()) == "prelaunch"
    before = threading.active_count()
    for _ in range(3):
        SyncQmp(sock, timeout=5).close()
    assert threading.active_count() == before  # every private loop thread is joined
