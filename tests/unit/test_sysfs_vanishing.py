"""A device read while the kernel removes it: all or nothing (issue 19).

The tree is a copy of a real capture (``tests/fixtures/sysfs/mixed``, the
QEMU usb-audio at 2-2.1, the device of the issue).  A small "kernel" removes
its files in the order Linux 6.1 does when the device is unplugged
(drivers/usb/core/hub.c ``usb_disconnect``, drivers/base/core.c
``device_del``, the attribute arrays of drivers/usb/core/sysfs.c):

* with the device lock held: each interface goes (its ``interface`` string,
  ``power/``, ``uevent``, attributes, driver and subsystem links, directory),
  then the active configuration (``bConfigurationValue`` and the other
  configuration attributes read empty), then the ``port`` link;
* device_del: ``power/autosuspend``, ``level``, the durations, ``persist``,
  ``descriptors`` (usb_remove_sysfs_dev_files at BUS_NOTIFY_DEL_DEVICE), the
  rest of ``power/`` (dpm_sysfs_remove), ``dev``, ``uevent``, ``removable``,
  the device attributes in their array's order, ``manufacturer``,
  ``product``, ``serial``, the subsystem and driver links, the directory.

The only thing injected is *when*: the module's ``os`` is a thin proxy whose
``open`` applies the next removals at one precise call, before or after the
real open, and whose ``read`` answers ENODEV for a file removed since it was
opened, as kernfs does.  Reads of attributes that take the device lock
(configuration values, strings) wait, as in the kernel, until the locked part
of the teardown is over.  Every other byte is the captured data.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmplug.host import sysfs
from vmplug.model import UsbDevice

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sysfs"
PORT = "2-2.1"  # QEMU USB Audio, serial 1-0000:00:0b.0-2.1

#: drivers/usb/core/sysfs.c dev_attrs[], in order (device_remove_groups removes them so)
DEV_ATTRS = [
    "configuration",
    "bNumInterfaces",
    "bConfigurationValue",
    "bmAttributes",
    "bMaxPower",
    "urbnum",
    "idVendor",
    "idProduct",
    "bcdDevice",
    "bDeviceClass",
    "bDeviceSubClass",
    "bDeviceProtocol",
    "bNumConfigurations",
    "bMaxPacketSize0",
    "speed",
    "rx_lanes",
    "tx_lanes",
    "busnum",
    "devnum",
    "devpath",
    "version",
    "maxchild",
    "quirks",
    "avoid_reset_quirk",
    "authorized",
    "remove",
    "ltm_capable",
    "devspec",
]
STRINGS = ("manufacturer", "product", "serial")  # dev_string_attrs[]
#: what usb_actconfig_show prints from udev->actconfig (empty once it is NULL)
ACTCONFIG = ("configuration", "bNumInterfaces", "bConfigurationValue", "bmAttributes", "bMaxPower")
#: show() functions that take usb_lock_device_interruptible
LOCKED = frozenset(ACTCONFIG) | frozenset(STRINGS)
#: usb_remove_sysfs_dev_files: remove_power_attributes, remove_persist_attributes
USB_POWER = [
    "autosuspend",
    "level",
    "connected_duration",
    "active_duration",
    "usb2_hardware_lpm",
    "usb2_lpm_l1_timeout",
    "usb2_lpm_besl",
    "persist",
]


@dataclasses.dataclass(frozen=True)
class Step:
    """One removal (or, ``empty``, a configuration attribute that reads empty now)."""

    path: Path
    empty: bool = False

    def __call__(self) -> None:
        if self.empty:
            if self.path.exists():
                self.path.write_bytes(b"")  # same file, new content: what the next read shows
        elif self.path.is_symlink() or self.path.is_file():
            self.path.unlink()
        elif self.path.is_dir():
            shutil.rmtree(self.path)


def _rm(path: Path) -> Step:
    return Step(path)


def _empty(path: Path) -> Step:
    return Step(path, empty=True)


def _device_del(d: Path) -> list[Step]:
    """One device's (or interface's) device_del, from BUS_NOTIFY_DEL_DEVICE on."""
    steps = [_rm(d / "power" / n) for n in USB_POWER]
    steps += [_rm(d / "interface"), _rm(d / "descriptors"), _rm(d / "power"), _rm(d / "dev")]
    steps += [_rm(d / "uevent"), _rm(d / "removable")]
    steps += [_rm(d / n) for n in DEV_ATTRS]
    steps += [_rm(d / n) for n in STRINGS]
    steps += [_rm(d / p.name) for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()]
    steps += [_rm(d / "subsystem"), _rm(d / "driver"), _rm(d)]
    return steps


def removal(d: Path) -> tuple[list[Step], int]:
    """The kernel's steps for an unplug of device directory ``d``, and how many
    of them run with the device lock held."""
    locked: list[Step] = []
    for intf in sorted(p for p in d.iterdir() if p.is_dir() and ":" in p.name):
        locked += _device_del(intf)  # usb_disable_device
    locked += [_empty(d / n) for n in ACTCONFIG]  # dev->actconfig = NULL
    locked += [_rm(d / "port")]
    return locked + _device_del(d), len(locked)


class Kernel:
    """Stands in for ``os`` in :mod:`vmplug.host.sysfs`: applies the removals at
    call number ``at`` of ``os.open`` (``before`` or after the real open)."""

    def __init__(
        self, steps: Sequence[Callable[[], None]], lock_end: int, at: int, upto: int, before: bool
    ) -> None:
        self.steps, self.lock_end = steps, lock_end
        self.at, self.upto, self.before = at, upto, before
        self.done = 0
        self.opens = 0
        self.fds: dict[int, str] = {}
        self.path = os.path
        self.seen: set[str] = set()  # every path opened (to know which steps matter)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def advance(self, upto: int) -> None:
        while self.done < min(upto, len(self.steps)):
            self.steps[self.done]()
            self.done += 1

    def _lock(self, path: str) -> None:
        # a locked show() waits for usb_disconnect's usb_unlock_device
        if Path(path).name in LOCKED and 0 < self.done < self.lock_end:
            self.advance(self.lock_end)

    def open(self, path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        full = path if dir_fd is None else f"{self.fds[dir_fd]}/{path}"  # openat: as the kernel
        self.opens += 1
        self.seen.add(full)
        if self.opens == self.at and self.before:
            self.advance(self.upto)
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        self.fds[fd] = full
        if self.opens == self.at and not self.before:
            self.advance(self.upto)
        return fd

    def read(self, fd: int, n: int) -> bytes:
        path = self.fds.get(fd)
        if path is not None:
            self._lock(path)
            if not os.path.lexists(path):  # kernfs: the node went after open
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
        return os.read(fd, n)

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        os.close(fd)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "mixed"
    shutil.copytree(FIXTURES / "mixed", root, symlinks=True)
    return root


def _real(root: Path, port: str = PORT) -> str:
    return str((root / "bus/usb/devices" / port).resolve())


def _decisive(dev: UsbDevice) -> UsbDevice:
    """What identity, rules and attach use: everything but interface driver
    names (informative; an interface can lose its driver while the device's
    read is still whole, see sysfs._in_flux)."""
    return dataclasses.replace(
        dev, interfaces=tuple(dataclasses.replace(i, driver=None) for i in dev.interfaces)
    )


@pytest.fixture
def tree(pristine: Path, tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """A copy of the capture whose device 2-2.1 is put back before each use."""
    root = tmp_path / "mixed"
    shutil.copytree(pristine, root, symlinks=True)
    dev, clean = Path(_real(root)), Path(_real(pristine))

    def link(src: str, dst: str) -> None:
        # hard links: cheap; the files a step rewrites get a copy of their own
        if Path(src).name in ACTCONFIG:
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    def fresh() -> Path:
        if dev.exists():
            shutil.rmtree(dev)
        shutil.copytree(clean, dev, symlinks=True, copy_function=link)
        return root

    yield fresh


def _read(monkeypatch: pytest.MonkeyPatch, kernel: Kernel, path: str) -> UsbDevice | None:
    with monkeypatch.context() as m:
        m.setattr(sysfs, "os", kernel)
        return sysfs.read_device(path, PORT)


def test_a_device_read_during_its_unplug_is_whole_or_none(
    tree: Callable[[], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every open() of the read, before and after it, with every prefix of
    the kernel's removal done: either the device as it was, or None."""
    root = tree()
    path = _real(root)
    full = sysfs.read_device(path, PORT)
    assert full is not None and full.serial == "1-0000:00:0b.0-2.1" and full.interfaces
    steps, lock_end = removal(Path(path))
    probe = Kernel(steps, lock_end, at=0, upto=0, before=True)
    assert _read(monkeypatch, probe, path) == full
    prefixes = _mattering(steps, probe.seen | _links(path))
    outcomes = {"none": 0, "whole": 0}
    for at in range(1, probe.opens + 1):
        for before in (True, False):
            for upto in prefixes:
                tree()
                kernel = Kernel(removal(Path(path))[0], lock_end, at, upto, before)
                dev = _read(monkeypatch, kernel, path)
                where = f"open #{at} {'before' if before else 'after'}, {upto} steps"
                if dev is None:
                    outcomes["none"] += 1
                    continue
                outcomes["whole"] += 1
                assert _decisive(dev) == _decisive(full), where
                assert dev.identity == full.identity and dev.qemu_id == full.qemu_id, where
    # both answers happen: the sweep really straddles the removal
    assert outcomes["none"] > 0 and outcomes["whole"] > 0, outcomes


def test_strings_vanishing_one_by_one_give_no_second_identity(
    tree: Callable[[], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's log: the product and serial gone, the manufacturer ("QEMU")
    read.  That read must not produce the port-path identity."""
    root = tree()
    path = _real(root)
    full = sysfs.read_device(path, PORT)
    assert full is not None
    steps, lock_end = removal(Path(path))
    product = next(i for i, st in enumerate(steps) if st.path == Path(path, "product"))
    # the product and serial go just as the reader opens the product
    at = _open_number(monkeypatch, steps, lock_end, path, "product")
    kernel = Kernel(steps, lock_end, at, product + 1, before=True)
    assert _read(monkeypatch, kernel, path) is None
    assert not Path(path, "product").exists()  # the removal really happened mid-read


def _links(path: str) -> set[str]:
    """What the reader looks at besides the files it opens."""
    found = {f"{path}/uevent", f"{path}/port", f"{path}/port/connect_type"}
    found |= {str(p / "driver") for p in Path(path).iterdir() if ":" in p.name}
    return found


def _mattering(steps: list[Step], seen: set[str]) -> list[int]:
    """The prefixes worth trying: those whose last step removes (or empties)
    something the reader looks at, or a directory above it; every other step
    changes nothing the read can see."""
    out = []
    for i, step in enumerate(steps):
        p = str(step.path)
        if any(s == p or s.startswith(p + "/") for s in seen):
            out.append(i + 1)
    return out


def _open_number(
    monkeypatch: pytest.MonkeyPatch, steps: list[Step], lock_end: int, path: str, name: str
) -> int:
    """Which open() of a whole read opens ``name``."""
    seen: list[str] = []

    class Spy(Kernel):
        def open(self, p: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            seen.append(Path(p).name)
            return super().open(p, flags, mode, dir_fd=dir_fd)

    assert _read(monkeypatch, Spy(steps, lock_end, 0, 0, True), path) is not None
    return seen.index(name) + 1


def test_a_device_replaced_at_the_same_path_during_the_read_is_none(
    tree: Callable[[], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unplugged and another one plugged into the port while we read: the
    uevent we began with is not the one there now."""
    root = tree()
    path = _real(root)
    copy = Path(path).parent / "replacement"
    shutil.copytree(path, copy, symlinks=True)

    def swap() -> None:
        shutil.rmtree(path)
        copy.rename(path)

    kernel = Kernel([swap], 0, at=3, upto=1, before=True)
    assert _read(monkeypatch, kernel, path) is None
    assert sysfs.read_device(path, PORT) is not None  # the new one reads whole


def test_not_yet_linked_to_its_port_is_none_but_a_tree_without_ports_is_fine(
    tree: Callable[[], Path],
) -> None:
    """The port link comes last when the kernel sets a device up and goes
    before device_del: a hub port without it means "in flux".  A tree whose
    hub has no port devices at all (old kernels, umockdev) is read as before."""
    root = tree()
    path = Path(_real(root))
    (path / "port").unlink()
    assert sysfs.read_device(str(path), PORT) is None
    hub_port = path.parent / "2-2:1.0" / "2-2-port1"
    shutil.rmtree(hub_port)
    dev = sysfs.read_device(str(path), PORT)
    assert dev is not None and dev.connect_type is None and dev.serial


def test_a_rescan_during_an_unplug_has_no_half_device(
    tree: Callable[[], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sysfs.scan while 2-2.1 goes, at each of its opens: every device it
    returns is whole, and 2-2.1 is whole or absent."""
    root = tree()
    full = {d.port: d for d in sysfs.scan(root)}
    path = _real(root)
    steps, lock_end = removal(Path(path))
    probe = Kernel(steps, lock_end, 0, 0, True)
    with monkeypatch.context() as m:
        m.setattr(sysfs, "os", probe)
        assert {d.port: d for d in sysfs.scan(root)} == full
    absent = 0
    for at in range(1, probe.opens + 1, 3):
        tree()
        kernel = Kernel(removal(Path(path))[0], lock_end, at, len(steps), before=True)
        with monkeypatch.context() as m:
            m.setattr(sysfs, "os", kernel)
            got = {d.port: d for d in sysfs.scan(root)}
        for port, dev in got.items():
            assert _decisive(dev) == _decisive(full[port]), (at, port)
        absent += PORT not in got
        assert set(full) - set(got) <= {PORT}, at
    assert absent > 0
