"""Copy a live USB sysfs tree into a small fixture directory that is itself a sysfs root.

Run inside the lab guest (or on any Linux host with USB) with the project's
Python::

    python -m vmplug_lab.capture OUT [--sysfs /sys] [--meta META.json]

The result under ``OUT`` has the shape the kernel gives, so the sysfs reader
can be pointed at it as its root:

* ``bus/usb/devices/<name>`` — relative symlinks, exactly like the kernel's,
  into ``devices/pci0000:00/<controller>/usbN/...``;
* every USB device and interface directory with its readable regular
  attributes (``descriptors`` byte for byte), ``power/*``, and the
  ``driver`` / ``subsystem`` / ``port`` symlinks recreated relative to
  ``bus/usb/drivers/<name>`` (a directory holding only ``.keep``), ``bus/usb`` and the hub
  port directory (``<hub-if>/<hub>-portN`` with ``connect_type``...);
* the controller's PCI directory with its ids and ``driver`` link;
* ``capture.json``: kernel, capture time, and whatever ``--meta`` adds (the
  lab driver records QEMU's version and the device list there).

Endpoint directories (``ep_XX``) and class children (SCSI hosts, HID, sound
cards, input devices) are left out: the reader works from ``descriptors``.
Write-only and unreadable files are skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

_DEVICE = re.compile(r"^(usb\d+|\d+-\d+(\.\d+)*)$")
_INTERFACE = re.compile(r"^\d+-\d+(\.\d+)*:\d+\.\d+$")
_PORT = re.compile(r"^(usb\d+|\d+-\d+(\.\d+)*)-port\d+$")
_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
#: Files never worth copying (write-only triggers, huge or side-effecting).
_SKIP_FILES = frozenset({"remove", "bind", "unbind", "new_id", "remove_id", "reset", "rescan"})
_MAX_FILE = 64 * 1024
#: Symlinks recreated when their target is inside the capture.
_LINKS = ("driver", "subsystem", "port", "peer")
#: ``power/`` files kept: configuration, not ever-changing counters (runtime_*_time...).
_POWER = frozenset(
    {
        "control",
        "autosuspend",
        "autosuspend_delay_ms",
        "runtime_status",
        "persist",
        "level",
        "wakeup",
    }
)


class _Capture:
    def __init__(self, sysfs: Path, out: Path) -> None:
        self.sysfs = sysfs.resolve()
        self.out = out
        self.drivers: set[tuple[str, str]] = set()  # (bus, driver)
        self.files = 0

    def rel(self, real: Path) -> Path:
        return real.relative_to(self.sysfs)

    def copy_files(self, real: Path, dest: Path, only: frozenset[str] | None = None) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        try:
            entries = list(os.scandir(real))
        except OSError:
            return
        for entry in entries:
            if entry.name in _SKIP_FILES or (only is not None and entry.name not in only):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o444:
                continue
            try:
                with open(entry.path, "rb") as f:
                    data = f.read(_MAX_FILE)
            except OSError:
                continue  # EIO/EINVAL/EACCES: attribute not readable on this device
            (dest / entry.name).write_bytes(data)
            self.files += 1

    def copy_links(self, real: Path, dest: Path) -> None:
        for name in _LINKS:
            link = real / name
            if not link.is_symlink():
                continue
            target = link.resolve()
            try:
                target_rel = self.rel(target)
            except ValueError:
                continue
            parts = target_rel.parts
            if name == "driver" and len(parts) >= 4 and parts[0] == "bus":
                # bus/<bus>/drivers/<name>: an empty directory stands for the driver.
                self.drivers.add((parts[1], parts[3]))
            elif name == "subsystem":
                (self.out / target_rel).mkdir(parents=True, exist_ok=True)
            dest_link = dest / name
            rel_target = os.path.relpath(self.out / target_rel, dest)
            if dest_link.is_symlink():
                dest_link.unlink()
            dest_link.symlink_to(rel_target)

    def copy_node(self, real: Path, with_power: bool = True) -> Path:
        dest = self.out / self.rel(real)
        self.copy_files(real, dest)
        if with_power and (real / "power").is_dir():
            self.copy_files(real / "power", dest / "power", only=_POWER)
        self.copy_links(real, dest)
        return dest

    def device(self, real: Path) -> None:
        self.copy_node(real)
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            if entry.is_symlink() or not entry.is_dir():
                continue
            if _INTERFACE.match(entry.name):
                self.copy_node(Path(entry.path))
                for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    if _PORT.match(sub.name) and sub.is_dir() and not sub.is_symlink():
                        self.copy_node(Path(sub.path), with_power=False)

    def controller(self, real: Path) -> None:
        dest = self.out / self.rel(real)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class",
                     "revision", "uevent"):  # fmt: skip
            src = real / name
            try:
                (dest / name).write_bytes(src.read_bytes())
            except OSError:
                continue
            self.files += 1
        self.copy_links(real, dest)

    def run(self) -> list[str]:
        devices_dir = self.sysfs / "bus/usb/devices"
        if not devices_dir.is_dir():
            raise SystemExit(f"{devices_dir}: no USB in this kernel (modprobe usbcore?)")
        names = sorted(p.name for p in devices_dir.iterdir())
        out_devices = self.out / "bus/usb/devices"
        out_devices.mkdir(parents=True, exist_ok=True)
        controllers: set[Path] = set()
        for name in names:
            real = (devices_dir / name).resolve()
            if _DEVICE.match(name):
                self.device(real)
                # a PCI controller, or a platform one (SoCs, dummy_hcd)
                if name.startswith("usb") and (
                    _PCI.match(real.parent.name) or real.parent.parent.name == "platform"
                ):
                    controllers.add(real.parent)
            elif _INTERFACE.match(name):
                pass  # copied with its device
            else:
                continue
            link = out_devices / name
            link.symlink_to(os.path.relpath(self.out / self.rel(real), out_devices))
        for ctrl in sorted(controllers):
            self.controller(ctrl)
        for bus, drv in sorted(self.drivers):
            drv_dir = self.out / "bus" / bus / "drivers" / drv
            drv_dir.mkdir(parents=True, exist_ok=True)
            # git keeps no empty directories: without a file the link would dangle.
            (drv_dir / ".keep").touch()
        return names


def capture(
    out: Path, sysfs: Path = Path("/sys"), meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Capture ``sysfs``'s USB tree into ``out`` (replaced); return the metadata written."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cap = _Capture(sysfs, out)
    names = cap.run()
    info: dict[str, Any] = {
        "kernel": os.uname().release,
        "captured_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "sysfs": str(sysfs),
        "usb_devices": [n for n in names if _DEVICE.match(n)],
        "files": cap.files,
    }
    info.update(meta or {})
    (out / "capture.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="fixture directory to (re)create")
    parser.add_argument("--sysfs", type=Path, default=Path("/sys"))
    parser.add_argument("--meta", type=Path, help="JSON object merged into capture.json")
    args = parser.parse_args(argv)
    meta = json.loads(args.meta.read_text()) if args.meta else None
    info = capture(args.out, args.sysfs, meta)
    print(f"captured {len(info['usb_devices'])} USB devices, {info['files']} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
