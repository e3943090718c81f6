"""Run inside the lab guest (as root): pull one of vmplug.host.usbctl's levers on
a real kernel and print, as JSON, the kernel's uevents for the device's port
seen meanwhile (a raw NETLINK_KOBJECT_UEVENT socket) and its devnum before and
after.  Usage: usbctl_probe.py reset|port-cycle|reauthorize PORT."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from vmplug.host import usbctl

SYS = Path("/sys")


def devnum(port: str) -> int | None:
    try:
        return int((SYS / "bus/usb/devices" / port / "devnum").read_text())
    except OSError:
        return None


def main() -> int:
    lever, port = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
    sock.bind((0, 1))
    sock.settimeout(0.2)
    dev = SYS / "bus/usb/devices" / port
    before = devnum(port)
    busnum = int((dev / "busnum").read_text())
    extra: dict[str, object] = {}
    t0 = time.monotonic()
    error = None
    try:
        if lever == "reset":
            assert before is not None
            usbctl.reset_device(usbctl.devnode(busnum, before))
        elif lever == "port-cycle":
            cycled = usbctl.cycle_port(SYS, port, dev_root=Path("/dev"))
            extra["disable"] = str(cycled.disable)
            extra["power"] = cycled.note
            extra["switching"] = cycled.switching
        elif lever == "reauthorize":
            extra["authorized"] = str(usbctl.reauthorize(SYS, port))
        hub = usbctl.port_of(port).hub
        desc = SYS / "bus/usb/devices" / hub / "descriptors"
        if desc.exists():
            raw = desc.read_bytes()
            # the hub descriptor is not in sysfs' descriptors (device + configs only)
            extra["hub_descriptors_bytes"] = len(raw)
    except usbctl.UsbCtlError as exc:
        error = str(exc)
    events: list[tuple[str, str]] = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if devnum(port) is not None and time.monotonic() - t0 > 2.5:
                break
            continue
        fields = data.split(b"\0")
        props = dict(f.decode(errors="replace").split("=", 1) for f in fields[1:] if b"=" in f)
        path = props.get("DEVPATH", "")
        if path.rsplit("/", 1)[-1].split(":")[0] == port:
            events.append((props.get("ACTION", ""), path.rsplit("/", 1)[-1]))
    out = {"lever": lever, "port": port, "before": before, "after": devnum(port),
           "events": events, "error": error, **extra}  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
