"""A lean Python program printing what ``vmplug list --json`` prints.

bench_list's alternative for the `list --json` goal: the same attribute files
read the same way (one directory fd per device, each attribute opened
relative to it), and the same JSON, byte for byte on the trees bench_list
reads (it checks), built straight into dicts: no model, no dataclasses, no
usbguard hash, no warnings, no consistency checks, no usb.ids names (every
device of the trees it is held to gives its strings), no config, no option
parsing.  What it costs over interpreter start is close to the least a Python
program printing that output pays: it does nothing else.  vmplug's reader
does more (see vmplug.host.sysfs) and is compared against it.

Not vmplug's code and never imported by it: a measuring stick.

Run: python bench/lean_list.py SYSFS_ROOT
"""

# ruff: noqa: PTH115, PTH118, PTH119, PTH208 - os.path, not pathlib: pathlib is ~3 ms of a start

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing is ~5 ms of a start: for mypy only
if TYPE_CHECKING:
    from typing import Any

    #: address, bmAttributes, wMaxPacketSize, bInterval, then the SuperSpeed
    #: companion's bMaxBurst, bmAttributes, wBytesPerInterval (None without one)
    _Ep = list[Any]
    #: bAlternateSetting, the class triple, the endpoints
    _Alt = tuple[int, int, int, int, list[_Ep]]

if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:
        from _sha256 import sha256  # 3.11: hashlib loads OpenSSL
    except ImportError:
        from hashlib import sha256

_F = os.O_RDONLY | os.O_CLOEXEC
_NAMES = ("in", "out")
_TYPES = ("control", "isochronous", "bulk", "interrupt")


def _at(dirfd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, _F, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _text(dirfd: int, name: str) -> str | None:
    raw = _at(dirfd, name)
    return None if raw is None else raw.decode("utf-8", "replace").rstrip("\n")


def _string(dirfd: int, name: str) -> str | None:
    raw = _at(dirfd, name)
    return None if raw is None else raw.rstrip(b"\0\n\r\t\b").decode("utf-8", "replace")


def _bandwidth(ep: _Ep, speed: float) -> int:
    _address, attrs, mps, interval, burst, ss_attrs, ss_bytes = ep
    kind = attrs & 3
    if not kind & 1:
        return 0
    size = mps & 0x7FF
    if ss_bytes is not None and speed >= 5000:
        per = ss_bytes
    elif speed >= 5000:
        per = size * ((burst or 0) + 1) * ((((ss_attrs or 0) & 3) + 1) if kind == 1 else 1)
    elif speed >= 480:
        per = size * (((mps >> 11) & 3) + 1)
    else:
        per = size
    b = max(interval, 1)
    if speed >= 480:
        secs = float(2 ** (min(b, 16) - 1)) * 125e-6
    elif kind == 1:
        secs = float(2 ** (min(b, 16) - 1)) * 1e-3
    else:
        secs = b * 1e-3
    bps: int = round(per * 8 / secs)
    return bps


def _configs(data: bytes) -> dict[int, dict[int, list[_Alt]]]:
    configs: dict[int, dict[int, list[_Alt]]] = {}
    config = None
    endpoints: list[_Ep] = []
    pos, end = data[0], len(data)
    while pos + 2 <= end:
        length, kind = data[pos], data[pos + 1]
        if length < 2 or pos + length > end:
            break
        if kind == 2 and length >= 9:
            config = configs.setdefault(data[pos + 5], {})
        elif kind == 4 and length >= 9 and config is not None:
            endpoints = []
            config.setdefault(data[pos + 2], []).append(
                (data[pos + 3], data[pos + 5], data[pos + 6], data[pos + 7], endpoints)
            )
        elif kind == 5 and length >= 7:
            mps = data[pos + 4] | data[pos + 5] << 8
            endpoints.append([data[pos + 2], data[pos + 3], mps, data[pos + 6], None, None, None])
        elif kind == 0x30 and length >= 6 and endpoints:
            endpoints[-1][4:] = data[pos + 2], data[pos + 3], data[pos + 4] | data[pos + 5] << 8
        pos += length
    return configs


def _controller(path: str) -> str | None:
    found = previous = None
    for part in path.split("/"):
        if len(part) == 12 and part[4] == ":" and part[7] == ":" and part[10] == ".":
            found = part
        elif part.startswith("usb") and part[3:].isdigit():
            return found or previous
        previous = part
    return found


def _device(path: str, name: str) -> dict[str, object]:
    dirfd = os.open(path, _F | os.O_DIRECTORY)
    try:
        d = _at(dirfd, "descriptors") or b""
        vid, pid, bcd = d[8] | d[9] << 8, d[10] | d[11] << 8, d[12] | d[13] << 8
        dclass = d[4]
        ctext = _text(dirfd, "bConfigurationValue")
        cfg = int(ctext) if ctext else None
        speed_text = _text(dirfd, "speed")
        speed = float(speed_text) if speed_text else 0.0
        ev = dict(
            line.partition("=")[::2] for line in (_at(dirfd, "uevent") or b"").decode().splitlines()
        )
        interfaces, is_hub, iso = [], dclass == 9, 0
        layout = _configs(d).get(cfg, {}) if cfg else {}
        intf = f"{name[3:]}-0" if name.startswith("usb") else name
        for number, alts in layout.items():
            try:
                driver = os.path.basename(
                    os.readlink(f"{intf}:{cfg}.{number}/driver", dir_fd=dirfd)
                )
            except OSError:
                driver = None
            first = alts[0]
            is_hub = is_hub or first[1] == 9
            worst = 0
            jalts = []
            for alternate, _c, _s, _p, eps in alts:
                jeps, alt_iso = [], 0
                for ep in eps:
                    bw = _bandwidth(ep, speed)
                    if ep[1] & 3 == 1:
                        alt_iso += bw
                    jeps.append(
                        {
                            "address": f"0x{ep[0]:02x}",
                            "direction": _NAMES[not ep[0] & 0x80],
                            "type": _TYPES[ep[1] & 3],
                            "max_packet_size": ep[2] & 0x7FF,
                            "interval": ep[3],
                            "bandwidth_bps": bw,
                        }
                    )
                worst = max(worst, alt_iso)
                jalts.append({"alternate": alternate, "endpoints": jeps})
            iso += worst
            interfaces.append(
                {
                    "number": number,
                    "class": first[1],
                    "subclass": first[2],
                    "protocol": first[3],
                    "driver": driver,
                    "alt_settings": jalts,
                }
            )
        delay = _text(dirfd, "power/autosuspend_delay_ms")
        maxchild = _text(dirfd, "maxchild") if dclass == 9 else None
        authorized = _text(dirfd, "authorized")
        serial = _string(dirfd, "serial") if d[16] else None
        return {
            "port": name,
            "busnum": int(ev["BUSNUM"]),
            "devnum": int(ev["DEVNUM"]),
            "vendor_id": f"{vid:04x}",
            "product_id": f"{pid:04x}",
            "bcd_device": f"{bcd:04x}",
            "manufacturer": _text(dirfd, "manufacturer") if d[14] else None,
            "product": _string(dirfd, "product") if d[15] else None,
            "serial": serial,
            "speed_mbps": int(speed) if speed.is_integer() else speed,
            "usb_version": f"{d[3]:x}.{d[2]:02x}",
            "device_class": dclass,
            "device_subclass": d[5],
            "device_protocol": d[6],
            "is_hub": is_hub,
            "num_ports": int(maxchild) or None if maxchild else None,
            "removable": _text(dirfd, "removable"),
            "authorized": None if authorized is None else authorized.strip() == "1",
            "connect_type": _text(dirfd, "port/connect_type"),
            "power_control": _text(dirfd, "power/control"),
            "autosuspend_delay_ms": int(delay) if delay else None,
            "driver": ev.get("DRIVER"),
            "controller": _controller(path),
            "iso_bandwidth_bps": iso,
            "interfaces": interfaces,
            "vid:pid": f"{vid:04x}:{pid:04x}",
        }
    finally:
        os.close(dirfd)


def _key(name: str) -> tuple[int, tuple[int, ...]]:
    if name.startswith("usb"):
        return (int(name[3:]), ())
    bus, _, chain = name.partition("-")
    return (int(bus), tuple(int(p) for p in chain.split(".")))


def main() -> None:
    base = os.path.join(sys.argv[1], "bus/usb/devices")
    dirs: dict[str, str] = {}
    out = []
    for name in sorted((n for n in os.listdir(base) if ":" not in n), key=_key):
        if name.startswith("usb"):
            path = os.path.normpath(os.path.join(base, os.readlink(os.path.join(base, name))))
        else:
            bus, _, chain = name.partition("-")
            head, dot, _ = chain.rpartition(".")
            path = f"{dirs[f'{bus}-{head}' if dot else f'usb{bus}']}/{name}"
        dirs[name] = path
        dev = _device(path, name)
        if not name.startswith("usb"):
            out.append(dev)
    serials: dict[tuple[object, object], int] = {}
    for dev in out:
        if dev["serial"]:
            key = (dev["vid:pid"], dev["serial"])
            serials[key] = serials.get(key, 0) + 1
    for dev in out:
        vidpid = dev.pop("vid:pid")
        serial = dev["serial"]
        if serial and serials[(vidpid, serial)] == 1:
            identity = f"{vidpid}/serial={serial}"
        else:
            identity = f"{vidpid}/port={dev['port']}"
        dev["identity"] = identity
        dev["qemu_id"] = "vmplug-" + sha256(identity.encode()).hexdigest()[:12]
        dev["host"] = dev["vm"] = None
        dev["warnings"] = []
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
