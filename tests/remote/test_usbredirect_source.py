"""UsbredirectSource runs the real usbredirect: a device that is not there
gives no stream and usbredirect's own reason, never a hang."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmplug.errors import UsageError
from vmplug.remote.export import ExportError, Location, SysfsLocator, UsbredirectSource

pytestmark = pytest.mark.skipif(
    shutil.which("usbredirect") is None, reason="usbredirect not installed"
)


def _sysfs(root: Path, port: str, bus: int, dev: int, ids: tuple[str, str]) -> Path:
    d = root / "bus" / "usb" / "devices" / port
    d.mkdir(parents=True)
    (d / "busnum").write_text(f"{bus}\n")
    (d / "devnum").write_text(f"{dev}\n")
    (d / "idVendor").write_text(f"{ids[0]}\n")
    (d / "idProduct").write_text(f"{ids[1]}\n")
    return root


def test_locator_reads_the_port_and_checks_ids(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, "2-1", 2, 7, ("0627", "0001"))
    assert SysfsLocator("2-1", sysfs=root)() == Location(2, 7)
    assert SysfsLocator("2-1", vendor=0x0627, product=0x0001, sysfs=root)() == Location(2, 7)
    assert SysfsLocator("2-1", vendor=0x046D, sysfs=root)() is None  # another device there
    assert SysfsLocator("2-2", sysfs=root)() is None
    with pytest.raises(UsageError, match="invalid USB port path"):
        SysfsLocator("../2-1")


async def test_absent_device_gives_no_stream(tmp_path: Path) -> None:
    source = UsbredirectSource(SysfsLocator("9-9", sysfs=tmp_path))
    assert await source.open() is None
    assert source.starts == 0  # nothing started for a device that is not there


async def test_a_device_usbredirect_cannot_open_gives_its_reason(tmp_path: Path) -> None:
    # sysfs says bus 250 device 127 is there; the kernel has no such device
    root = _sysfs(tmp_path, "250-1", 250, 127, ("0627", "0001"))
    source = UsbredirectSource(SysfsLocator("250-1", sysfs=root), start_timeout=10)
    assert await source.open() is None
    assert source.starts == 1
    assert source.last_error is not None and "250-127" in source.last_error, source.last_error


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(ExportError, match="apt-get install usbredirect"):
        UsbredirectSource(lambda: None, program="no-such-usbredirect")
