"""vmplug.wire.systemd: sd_notify and journald's native protocol on real sockets.

The service manager's side is a unix datagram socket the test binds (a path
and an abstract name), read the way systemd reads it; the real ``systemd-notify``
is sent through the same listener first, so the listener is known to read
what systemd's own client writes.  journald's side is a datagram socket too,
its records decoded by the protocol's rules (including the binary-safe form
and a memfd passed with SCM_RIGHTS).  The whole daemon under a real systemd
and journald is tests/systemd/test_unit_under_systemd.py.
"""

from __future__ import annotations

import array
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug.wire.systemd import (
    JournalHandler,
    JournalSender,
    Notifier,
    encode_fields,
    journal_is_stderr,
    priority,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_the_listener_reads_systemd_notify(listener: tuple[socket.socket, str]) -> None:
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify is not installed (Debian: systemd)")
    sock, path = listener
    env = {**os.environ, "NOTIFY_SOCKET": path}
    subprocess.run(
        [tool, "--no-block", "--ready", "--status=hello"], env=env, check=True, timeout=10
    )
    got = _fields(sock.recv(4096))
    assert got["READY"] == "1" and got["STATUS"] == "hello"


def test_notify_to_a_path(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready("2/2 VMs connected,\nsecond line")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "2/2 VMs connected, second line"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    got = _fields(sock.recv(4096))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got["RELOADING"] == "1" and before <= int(got["MONOTONIC_USEC"]) <= after
    assert n.stopping()
    assert _fields(sock.recv(4096)) == {"STOPPING": "1"}
    n.close()


def test_notify_to_an_abstract_name() -> None:
    name = f"vmplug-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_interval == 2.0
        assert n.watchdog()
        assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
        n.close()
    finally:
        sock.close()


def test_watchdog_belongs_to_watchdog_pid() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000"}
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec == 1000000
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_usec is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_usec is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "x"}).watchdog_usec is None


def test_no_socket_no_notify_and_no_error() -> None:
    assert not Notifier.from_env({}).ready()
    broken = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not broken.ready()  # sent nowhere: False, never raised
    assert isinstance(broken.error, OSError)


def test_journal_stream_is_compared_with_fd(tmp_path: Path) -> None:
    f = (tmp_path / "log").open("w")
    try:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_is_stderr(env, fd=f.fileno())
        other = (tmp_path / "other").open("w")
        try:
            # inherited by a child whose stderr went elsewhere: not the journal
            assert not journal_is_stderr(env, fd=other.fileno())
        finally:
            other.close()
        assert not journal_is_stderr({"JOURNAL_STREAM": "garbage"}, fd=f.fileno())
        assert not journal_is_stderr({}, fd=f.fileno())
    finally:
        f.close()


def decode_native(data: bytes) -> dict[str, str]:
    """journald's reading of one native datagram (systemd.journal-fields(7))."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            out[name.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            out[line.decode()] = value.decode()
            i = nl + 10 + size
    return out


def test_encoding_is_binary_safe_and_names_checked() -> None:
    data = encode_fields({"MESSAGE": "two\nlines", "vmplug_vm": "win", "_SYSTEMD_UNIT": "x",
                          "bad-name": "y", "PRIORITY": 6})  # fmt: skip
    assert decode_native(data) == {"MESSAGE": "two\nlines", "VMPLUG_VM": "win", "PRIORITY": "6"}


def test_handler_sends_fields_and_big_records_by_memfd(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    handler = JournalHandler(JournalSender(path))
    log = logging.getLogger("vmplug.test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("vm %s: lost", "windows", extra={"VMPLUG_VM": "windows", "VMPLUG_PORT": None})
        got = decode_native(sock.recv(65536))
        assert got["MESSAGE"] == "vm windows: lost"
        assert got["PRIORITY"] == "4" and got["VMPLUG_VM"] == "windows"
        assert "VMPLUG_PORT" not in got
        assert got["CODE_FILE"] == __file__ and int(got["CODE_LINE"]) > 0
        assert got["CODE_FUNC"] == "test_handler_sends_fields_and_big_records_by_memfd"
        assert got["SYSLOG_IDENTIFIER"] == "vmplug"
        # bigger than the socket takes in one datagram: a sealed memfd instead
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = "x" * 400_000
        log.error("%s", big)
        fds = array.array("i")
        data, anc, _flags, _addr = sock.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
        assert data == b""
        (level, kind, raw) = anc[0]
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(raw[: fds.itemsize])
        with os.fdopen(fds[0], "rb") as fh:
            fh.seek(0)  # journald maps it from its start; our offset is the writer's
            got = decode_native(fh.read())
        assert got["MESSAGE"] == big and got["PRIORITY"] == "3"
    finally:
        log.removeHandler(handler)
        handler.close()


def test_priority_from_level() -> None:
    assert [priority(x) for x in (10, 20, 25, 30, 40, 50)] == [7, 6, 6, 4, 3, 2]
