"""wire.proc: the QEMU argv parser over captured command lines
(tests/fixtures/qemu-argv, made by tools/capture_qemu_argv.py) and the /proc
scan over real QEMU processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vmplug.vms.container import qmp_paths_in_args
from vmplug.wire.proc import QGA_PORT_NAME, parse_args, scan_qemu, split_arguments

from .conftest import FIXTURES

ARGV = FIXTURES / "qemu-argv"


def captured(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ARGV / f"{name}.json").read_text())
    return doc


def test_dockurr_windows_command_line() -> None:
    doc = captured("dockurr-windows")
    argv = doc["argv"]
    args = parse_args(argv[1:])
    assert args.name == "windows"
    assert args.machine == "q35" and not args.usb_flag
    # the image's telnet monitor is HMP, not QMP; vmplug's -qmp from ARGUMENTS is
    assert args.qmp_paths == ["/qmp/qmp.sock"]
    assert not args.monitor_fd and not args.libvirt_managed and args.qga_path is None
    drivers = [d["driver"] for d in args.devices]
    assert drivers.count("qemu-xhci") == 2 and "usb-tablet" in drivers
    (host,) = args.drivers("usb-host")
    assert host["vendorid"] == "0x0627" and host["bus"] == "vmplug-xhci.0"
    # ARGUMENTS reaches QEMU as the image's unquoted ${ARGS} splits it
    tail = split_arguments(doc["environment"]["ARGUMENTS"])
    assert argv[-len(tail) :] == tail
    # the -m / -smp / -object values were stepped over, not read as options
    assert all(not d["driver"].startswith("-") for d in args.devices)


def test_libvirt_command_line() -> None:
    doc = captured("libvirt")
    args = parse_args(doc["argv"][1:])
    assert args.name == doc["domain"]
    assert args.machine is not None and args.machine.startswith("pc-q35-")
    assert args.libvirt_managed and args.monitor_fd and args.qmp_paths == []
    # libvirt writes -device as JSON; the controller is read from it
    (xhci,) = args.drivers("qemu-xhci")
    assert xhci["id"] == "usb"
    # the agent's channel is a virtserialport on a chardev libvirt passes as an fd
    (port,) = args.drivers("virtserialport")
    assert port["name"] == QGA_PORT_NAME
    assert "fd" in args.chardevs[port["chardev"]] and args.qga_path is None


def test_option_spellings() -> None:
    words = [
        "-qmp", "unix:/a.sock,server=on,wait=off",
        "-qmp=unix:/b.sock,server",
        "--chardev", "socket,id=mon1,path=/c,,d.sock,server=on,wait=off",
        "-mon", "chardev=mon1,mode=control",
        "-append", "-qmp unix:/never.sock",  # a kernel command line is a value
        "-chardev", "socket,id=qga0,path=qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-M", "pc,usb=on",
        "-spice", "port=5930,addr=127.0.0.1,disable-ticketing=on",
        "-usb",
    ]  # fmt: skip
    args = parse_args(words)
    assert args.qmp_paths == ["/a.sock", "/b.sock", "/c,d.sock"]
    assert args.qga_path == "qga.sock" and args.machine == "pc" and args.usb_flag
    assert args.spice == {"port": "5930", "addr": "127.0.0.1", "disable-ticketing": "on"}
    # the container backend reads the same parser, without the image's own monitor
    assert qmp_paths_in_args(["-qmp", "unix:/run/shm/monitor.sock,server", *words]) == [
        "/a.sock",
        "/b.sock",
        "/c,d.sock",
    ]


@pytest.mark.qemu
def test_scan_finds_a_real_qemu_started_like_dockurr(sock_dir: Path) -> None:
    """The dockurr exec line, for real: a relative QMP path is resolved against
    the process's working directory, its name and argv read from /proc."""
    args = (
        "-nodefaults -display none -accel tcg -m 64 -S -name scanned-{pid}"
        " -qmp unix:q.sock,server=on,wait=off"
    )
    proc = subprocess.Popen(
        ["sh", "-c", 'ARGS="$0"; exec qemu-system-x86_64 ${ARGS:+ $ARGS}', args],
        cwd=sock_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        found = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [p for p in scan_qemu() if p.pid == proc.pid]
            if found:  # the shell has exec'ed QEMU
                break
            time.sleep(0.02)
        (qemu,) = found
        assert qemu.args.name == "scanned-{pid}"
        assert qemu.args.qmp_paths == ["q.sock"]
        assert qemu.cwd == str(sock_dir) and qemu.root is None
        assert qemu.reach("q.sock") == str(sock_dir / "q.sock")
        assert qemu.source == f"/proc/{proc.pid}/cmdline"
    finally:
        proc.kill()
        proc.wait(10)
    assert [p for p in scan_qemu() if p.pid == proc.pid] == []


def test_scan_of_a_proc_without_qemu(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cmdline").write_bytes(b"/sbin/init\0splash\0")
    (tmp_path / "self").mkdir()
    assert scan_qemu(tmp_path) == []
    assert scan_qemu(tmp_path / "missing") == []
