"""An independent reading of a USB sysfs tree, run inside the lab guest.

Deliberately shares no code with ``vmplug``: it runs with the guest's system
``python3`` and reads plain attribute files (not ``descriptors``), so the lab
test can check vmplug's reader against the kernel's own attributes field by
field.  Prints a JSON object keyed by the device's sysfs name.

    python3 sysfs_probe.py [SYSFS_ROOT]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DEVICE = re.compile(r"^(usb\d+|\d+-\d+(\.\d+)*)$")


def attr(path: Path, name: str) -> str | None:
    try:
        return (path / name).read_text(encoding="utf-8", errors="replace").rstrip("\n")
    except OSError:
        return None


def driver(path: Path) -> str | None:
    try:
        return (path / "driver").readlink().name
    except OSError:
        return None


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/sys")
    base = root / "bus/usb/devices"
    out: dict[str, dict[str, object]] = {}
    for name in sorted(p.name for p in base.iterdir()):
        if not DEVICE.match(name):
            continue
        path = (base / name).resolve()
        interfaces = []
        for ipath in sorted(path.iterdir()):
            if ":" not in ipath.name or not ipath.is_dir():
                continue
            interfaces.append(
                {
                    "number": int(attr(ipath, "bInterfaceNumber") or "-1", 16),
                    "class": int(attr(ipath, "bInterfaceClass") or "-1", 16),
                    "subclass": int(attr(ipath, "bInterfaceSubClass") or "-1", 16),
                    "protocol": int(attr(ipath, "bInterfaceProtocol") or "-1", 16),
                    "driver": driver(ipath),
                }
            )
        port = None
        if (path / "port").is_symlink():
            port = attr((path / "port").resolve(), "connect_type")
        out[name] = {
            "busnum": int(attr(path, "busnum") or "-1"),
            "devnum": int(attr(path, "devnum") or "-1"),
            "vendor_id": attr(path, "idVendor"),
            "product_id": attr(path, "idProduct"),
            "bcd_device": attr(path, "bcdDevice"),
            "manufacturer": attr(path, "manufacturer"),
            "product": attr(path, "product"),
            "serial": attr(path, "serial"),
            "speed": attr(path, "speed"),
            "device_class": int(attr(path, "bDeviceClass") or "-1", 16),
            "num_ports": int(attr(path, "maxchild") or "0"),
            "configuration": attr(path, "bConfigurationValue"),
            "authorized": attr(path, "authorized"),
            "removable": attr(path, "removable"),
            "power_control": attr(path, "power/control"),
            "driver": driver(path),
            "connect_type": port,
            "interfaces": sorted(interfaces, key=lambda i: (i["number"], i["class"])),
        }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
