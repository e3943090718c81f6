"""Hostile device strings on every human-readable surface, seen through a real pty.

A USB device picks its own manufacturer, product and serial.  This test takes
the captured ``mixed`` sysfs tree, rewrites the strings of three devices with
what a BadUSB stick could say (escape sequences that clear and recolour the
screen, newlines that fake table rows, a right-to-left override, zero-width
and bidi isolates, Rich markup, 5,000 characters), and runs every command a
person reads under a pseudo-terminal, as a person would: ``list``, ``list
--tree``, ``match``, ``check-config``, ``doctor``, the generators, ``vms``
(with a QEMU whose ``-name`` is hostile too) and, against a real ``vmplug
run`` with a real QEMU, ``status``, ``history``, ``health``, ``attach`` and
``detach`` -- and reads the daemon's log.

Every output must be inert: with ``TERM=dumb`` (Rich writes no escape of its
own) not one ESC byte; with ``TERM=xterm-256color`` only Rich's own SGR
styles, never the device's clear-screen, blink or red; no bidi or zero-width
character; each device one row; and ``--json`` gives back the exact strings.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakekernel import FIXTURES, FakeKernel
from tests.support.qemu_proc import QemuProcess

pytestmark = pytest.mark.qemu

VMPLUG = [sys.executable, "-m", "vmplug"]

KBD = "2-2.4.2"  # the keyboard the rules route to VM a
TABLET = "1-3"
STICK = "1-1"
HOSTILE_MFR = "X\n\x1b[2J\x1b[31mRED\x1b[0m"
HOSTILE_PRODUCT = "\u202eevil[bold]Keyboard\u2066"
HOSTILE_SERIAL = "[bold]S\x1b[5m\u200bN\nFAKE"
#: the issue's 5,000 characters would not fit: a sysfs attribute is one page (4096 bytes)
#: with its newline, and the reader reads one page, as the kernel gives it
LONG = "A" * 4000
MARKUP = "[bold red]BOLD[/]"
HOSTILE_VM_NAME = "vm\n\x1b[2Jevil\u202e"

#: what must never reach a terminal: the device's own sequences and invisible characters
FORBIDDEN = ("\x1b[2J", "\x1b[5m", "\x1b[31mRED", "\u202e", "\u2066", "\u200b")
SGR = re.compile(r"\x1b\[[0-9;]*m")
COLS = 420


def hostile_tree(tmp: Path) -> Path:
    """The captured ``mixed`` tree with hostile strings in three devices."""
    root = tmp / "sysfs"
    shutil.copytree(FIXTURES / "mixed", root, symlinks=True)
    links = root / "bus/usb/devices"

    def put(port: str, attr: str, value: str) -> None:
        (links / port).resolve().joinpath(attr).write_text(value + "\n", encoding="utf-8")

    put(KBD, "manufacturer", HOSTILE_MFR)
    put(KBD, "product", HOSTILE_PRODUCT)
    put(KBD, "serial", HOSTILE_SERIAL)
    put(TABLET, "product", LONG)
    put(STICK, "manufacturer", MARKUP)
    return root


def run_pty(
    argv: list[str], env: dict[str, str], *, term: str, timeout: float = 60.0
) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a new pty ``COLS`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLS, 0, 0))
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env | {"TERM": term, "COLUMNS": str(COLS)},
        close_fds=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{argv} did not finish within {timeout} s")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    # strict: a lone surrogate or a broken byte sequence would fail here
    return proc.returncode, out.decode("utf-8").replace("\r\n", "\n")


def assert_inert(text: str, term: str, what: str) -> str:
    """``text`` carries nothing a device chose that a terminal would act on;
    returns it without Rich's own styles."""
    for seq in FORBIDDEN:
        assert seq not in text, f"{what}: {seq!r} reached the terminal"
    plain = SGR.sub("", text)
    if term == "dumb":
        assert "\x1b" not in text, f"{what}: an ESC byte reached a dumb terminal"
    assert "\x1b" not in plain, f"{what}: an escape other than Rich's styles: {text!r}"
    assert "\x07" not in plain and "\x9b" not in plain, what
    if term == "dumb":
        return plain  # Rich folds cells at 80 columns there: wrapped text starts lines
    for line in plain.split("\n"):
        # a device's newline must never start a line of its own
        stripped = line.strip()
        assert not stripped.startswith(("RED", "[2J", "FAKE", "\\x1b")), (
            f"{what}: a device's text started a line: {line!r}"
        )
    return plain


def rows_of(plain: str, ports: list[str]) -> dict[str, list[str]]:
    """Each port's lines of a table whose rows start with the port."""
    out: dict[str, list[str]] = {p: [] for p in ports}
    for line in plain.split("\n"):
        first = line.split(" ", 1)[0]
        if first in out:
            out[first].append(line)
    return out


class Host:
    """The hostile tree, a config, a real QEMU and (when started) a real daemon."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kernel = FakeKernel(tmp, root=hostile_tree(tmp))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-h", dir="/tmp"))
        self.api_sock = self.sock_dir / "api.sock"
        self.db = tmp / "vmplug.db"
        self.config = tmp / "vmplug.toml"
        self.qemu = QemuProcess(tmp, qmp_sockets=1, name="a", sock_dir=self.sock_dir)
        #: a QEMU no config names, whose -name (any bytes its owner chose) `vmplug vms` shows
        self.stranger = QemuProcess(
            tmp, ["-name", HOSTILE_VM_NAME], qmp_sockets=1, name="h", sock_dir=self.sock_dir
        )
        self.config.write_text(
            f'[vm.a]\nqmp = "{self.qemu.qmp_paths[0]}"\n\n'
            f'[daemon]\nsocket = "{self.api_sock}"\ndatabase = "{self.db}"\n\n'
            f'[[rule]]\nattach = "a"\nmatch = \'via-port "{KBD}"\'\n'
        )
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        return env | {"VMPLUG_SYSFS_ROOT": str(self.kernel.root), "VMPLUG_CONFIG": str(self.config)}

    def json(self, *args: str) -> Any:
        res = subprocess.run(
            [*VMPLUG, *args, "--json"], env=self.env(), capture_output=True, timeout=60, check=False
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def tty(self, *args: str, term: str, ok: tuple[int, ...] = (0,)) -> str:
        rc, text = run_pty([*VMPLUG, *args], self.env(), term=term)
        assert rc in ok, f"vmplug {' '.join(args)} exited {rc}: {text[-2000:]}"
        return assert_inert(text, term, f"vmplug {' '.join(args)} (TERM={term})")

    def start_daemon(self) -> None:
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [*VMPLUG, "run", "--events", f"replay:{self.kernel.fifo}", "--log-level", "debug"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(self.api_sock.exists, "the daemon's socket")

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
            self.daemon = None

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(10)
        self.qemu.cleanup()
        self.stranger.cleanup()
        self.kernel.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_json_keeps_the_exact_strings(host: Host) -> None:
    by_port = {d["port"]: d for d in host.json("list")}
    assert by_port[KBD]["manufacturer"] == HOSTILE_MFR
    assert by_port[KBD]["product"] == HOSTILE_PRODUCT
    assert by_port[KBD]["serial"] == HOSTILE_SERIAL
    assert by_port[TABLET]["product"] == LONG
    assert by_port[STICK]["manufacturer"] == MARKUP
    decided = {d["port"]: d for d in host.json("check-config")["devices"]}
    assert HOSTILE_MFR in decided[KBD]["name"]


@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
def test_list_and_tree_one_row_per_device(host: Host, term: str) -> None:
    devices = host.json("list")
    ports = [d["port"] for d in devices]
    plain = host.tty("list", term=term)
    rows = rows_of(plain, ports)
    if term != "dumb":  # Rich wraps at 80 columns on a dumb terminal; here it has COLS
        for port, lines in rows.items():
            assert len(lines) == 1, f"{port}: {lines}"
        assert len([x for x in plain.split("\n") if x.strip()]) == len(ports) + 1  # + header
        kbd = rows[KBD][0]
        assert "X\\n\\x1b[2J\\x1b[31mRED\\x1b[0m" in kbd  # shown, made visible
        assert "\\u202eevil[bold]Keyboard\\u2066" in kbd  # markup shown as text, not applied
        assert "[bold]S\\x1b[5m\\u200bN\\nFAKE" in kbd
        assert "AAAA…" in rows[TABLET][0] and LONG not in plain
        assert len(rows[TABLET][0]) < 400
        assert MARKUP in rows[STICK][0]
    tree = host.tty("list", "--tree", term=term)
    if term != "dumb":
        every = [d["port"] for d in host.json("list", "--all")]
        lines = [x for x in tree.split("\n") if x.strip()]
        assert len(lines) == len(every) + 1  # + the "USB" root
        assert sum("RED" in x for x in lines) == 1


@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
def test_match_check_config_doctor_generate(host: Host, term: str) -> None:
    plain = host.tty("match", "id 0627:*", term=term)
    if term != "dumb":
        rows = rows_of(plain, [KBD, TABLET])
        assert len(rows[KBD]) == 1 and len(rows[TABLET]) == 1
    plain = host.tty("check-config", term=term)
    if term != "dumb":
        assert len(rows_of(plain, [KBD])[KBD]) == 1
    # an ambiguous selector: the error lists the candidates, hostile names made visible
    err = host.tty("attach", "0627:0001", "--vm", "a", term=term, ok=(2,))
    assert "candidates:" in err and "\\x1b[2J" in err
    if term != "dumb":
        assert len([x for x in err.split("\n") if x.lstrip().startswith("2-2.4.2 ")]) == 1
    report = host.tty("doctor", term=term, ok=(0, 1, 2))
    assert "\\x1b[2J" in report  # the keyboard is named, made visible
    host.tty("doctor", KBD, "-v", term=term, ok=(0, 1, 2))
    generators = {
        "udev": ["--by-port"],
        "compose": ["--by-port"],
        "libvirt": ["--by-address"],
        "qemu": ["--by-port"],
        "spice": [],
    }
    for gen, extra in generators.items():
        out = host.tty("generate", gen, *extra, KBD, TABLET, STICK, term=term)
        if gen == "spice":  # a filter string: ids only, no names
            assert "RED" not in out
            continue
        assert "RED" in out  # the name is in a comment, on its comment's line
        for line in out.split("\n"):
            if "RED" in line:
                assert line.lstrip().startswith(("#", "<!--", "-")) or " #" in line, line


def test_vms_names_a_hostile_qemu(host: Host) -> None:
    host.stranger.start()
    found = host.json("vms")
    names = [v["name"] for v in found["vms"]]
    assert HOSTILE_VM_NAME in names  # JSON: exact
    plain = host.tty("vms", term="xterm-256color")
    assert "vm\\n\\x1b[2Jevil\\u202e" in plain
    host.tty("vms", term="dumb")


def test_daemon_surfaces_and_log_lines(host: Host) -> None:
    host.qemu.start()
    host.start_daemon()

    def attached() -> bool:
        status = host.json("status")
        return any(
            a["port"] == KBD and a["state"] == "attached" for a in status.get("attachments", [])
        )

    host.wait(attached, "the hostile keyboard attached")
    status = host.json("status")
    ident = next(a["identity"] for a in status["attachments"] if a["port"] == KBD)
    assert ident == f"0627:0001/serial={HOSTILE_SERIAL}"  # exact in JSON
    for term in ("dumb", "xterm-256color"):
        plain = host.tty("status", term=term)
        if term != "dumb":
            assert len(rows_of(plain, [KBD])[KBD]) == 1
            assert "[bold]S\\x1b[5m\\u200bN\\nFAKE" in plain
    # a replug of the hostile device, and one of the long-named tablet, into the log
    host.kernel.unplug(KBD)
    host.wait(lambda: not attached(), "the keyboard gone")
    host.kernel.plug(KBD, devnum=40)
    host.wait(attached, "the keyboard back")
    out = host.tty("attach", TABLET, "--vm", "a", term="xterm-256color", ok=(0, 1))
    assert "AAAA…" in out and LONG not in out
    host.tty("detach", TABLET, term="dumb", ok=(0, 1))
    hist = host.json("history")
    assert any(e.get("identity") == ident for e in hist)
    for term in ("dumb", "xterm-256color"):
        host.tty("history", term=term)
        host.tty("history", KBD, term=term)
        plain = host.tty("health", term=term)
        if term != "dumb":
            assert len(rows_of(plain, [KBD])[KBD]) == 1
    host.stop_daemon()
    log = host.log.read_bytes().decode("utf-8")
    assert_inert(log, "dumb", "the daemon's log")
    stamp = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
    lines = [x for x in log.split("\n") if x]
    assert lines, "the daemon logged nothing"
    for line in lines:
        assert stamp.match(line), f"a log line that is not a record of its own: {line!r}"
    named = [line for line in lines if "RED" in line]
    assert named, f"the replug of the hostile device is not in the log: {log!r}"
