"""A captured sysfs tree that the tests change as the kernel would, and its uevents.

Shared by tests/qemu (the daemon), tests/api, tests/web and bench/bench_api.py:
a device directory leaves on unplug and comes back (with a new device number
if asked) on replug, and each change sends the captured device's own
``uevent`` plus ACTION/DEVPATH/SUBSYSTEM/SEQNUM, as the kernel does, through a
FIFO to the daemon's ``replay:`` event source.  Import it as
``from tests.support.fakekernel import FakeKernel``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


class FakeKernel:
    """A captured sysfs tree that plugs and unplugs devices, and the uevents for it."""

    def __init__(self, tmp: Path, capture: str = "mixed", root: Path | None = None) -> None:
        """A copy of the ``capture`` tree under ``tmp`` (or ``root``, used in place)."""
        self.root = tmp / "sysfs"
        if root is None:
            shutil.copytree(FIXTURES / capture, self.root, symlinks=True)
        else:
            self.root = root
        self.stash = tmp / "unplugged"
        self.stash.mkdir(exist_ok=True)
        self.fifo = tmp / "uevents"
        os.mkfifo(self.fifo)
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        self.seq = 1000
        self.where: dict[str, Path] = {}  # port -> device dir while unplugged
        self._held_links: dict[str, str] = {}  # port -> its "port" link, while setting up

    def close(self) -> None:
        os.close(self._fd)

    def _links(self) -> Path:
        return self.root / "bus/usb/devices"

    def devdir(self, port: str) -> Path:
        return (self._links() / port).resolve()

    def _send(self, action: str, devdir: Path, uevent_text: str) -> None:
        self.seq += 1
        props = dict(line.split("=", 1) for line in uevent_text.splitlines() if "=" in line)
        props |= {
            "ACTION": action,
            "DEVPATH": "/" + str(devdir.relative_to(self.root)),
            "SUBSYSTEM": "usb",
            "SEQNUM": str(self.seq),
        }
        os.write(self._fd, (json.dumps(props) + "\n").encode())

    def unplug(self, port: str, *, announce: bool = True) -> None:
        """Take the device away; ``announce=False``: its uevents are lost."""
        real = self.devdir(port)
        uevent = (real / "uevent").read_text()
        for link in self._links().iterdir():
            if link.name == port or link.name.startswith(f"{port}:"):
                link.unlink()
        self.where[port] = real
        shutil.move(real, self.stash / port)
        if announce:
            self._send("unbind", real, uevent)
            self._send("remove", real, uevent)

    def plug(self, port: str, devnum: int | None = None, *, announce: bool = True) -> None:
        real = self.where.pop(port)
        shutil.move(self.stash / port, real)
        if devnum is not None:
            (real / "devnum").write_text(f"{devnum}\n")
            text = (real / "uevent").read_text().splitlines()
            text = [f"DEVNUM={devnum:03d}" if t.startswith("DEVNUM=") else t for t in text]
            (real / "uevent").write_text("\n".join(text) + "\n")
        (self._links() / port).symlink_to(os.path.relpath(real, self._links()))
        if announce:
            uevent = (real / "uevent").read_text()
            self._send("add", real, uevent)
            self._send("bind", real, uevent)

    def plug_setting_up(self, port: str, devnum: int | None = None) -> int:
        """Plug as the kernel is still setting the device up: its ``add`` is sent
        while its ``port`` link (the kernel makes it last, after the probe) is
        not there yet, so a read of the device then is "in flux".  Returns the
        add's seqnum; :meth:`finish_setup` makes the link and sends ``bind``."""
        real = self.where[port]  # unplugged before
        self.plug(port, devnum=devnum, announce=False)
        link = real / "port"
        self._held_links[port] = str(link.readlink())
        link.unlink()
        self._send("add", real, (real / "uevent").read_text())
        return self.seq

    def finish_setup(self, port: str) -> None:
        real = self.devdir(port)
        (real / "port").symlink_to(self._held_links.pop(port))
        self._send("bind", real, (real / "uevent").read_text())

    def overflow(self) -> None:
        """The replay source's stand-in for an ENOBUFS (real: tests/support/netns_overflow.py)."""
        os.write(self._fd, b'{"OVERFLOW": "1"}\n')


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what or 'condition'}")
        await asyncio.sleep(0.05)
