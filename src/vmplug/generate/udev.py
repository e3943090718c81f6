"""udev rules for devices that go to a VM: no autosuspend, a stable symlink, group access.

One rule line per device::

    ACTION!="remove", SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device",
      ATTR{idVendor}=="1235", ATTR{idProduct}=="821a", ATTR{serial}=="…",
      TEST=="power/control", ATTR{power/control}="on",
      GROUP="kvm", MODE="0660", SYMLINK+="vmplug/1235-821a-…"

* ``power/control`` = ``on`` keeps the kernel from autosuspending the device
  while the guest owns it (a suspended audio interface drops out; the guest
  cannot resume it through usbfs).  It is set on every event but ``remove``
  so that it holds again after a driver bind or a ``change``.
* ``GROUP``/``MODE`` let a QEMU that does not run as root open the
  ``/dev/bus/usb`` node.
* ``SYMLINK`` gives ``/dev/vmplug/VID-PID-SERIAL`` (or ``-PORT``), stable across
  replug while the device number changes.

Quoting: udev values are double-quoted with ``\\"`` as the only escape, and
match values are shell globs (``* ? [ |``).  Only values vmplug controls go
into the rules, with one exception, the serial number: every character of it
that is not a letter, digit, ``.``, ``_`` or ``-`` becomes ``?`` (one byte of
any value; udev compares bytes), so the pattern still matches the device and
nothing can break out of the quotes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmplug.generate.common import (
    CannotExpress,
    check_passable,
    device_label,
)
from vmplug.model import UsbDevice

RULES_DIR = Path("/etc/udev/rules.d")
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_MODE_RE = re.compile(r"^0?[0-7]{3}$")
_PORT_RE = re.compile(r"^\d+-\d+(\.\d+)*$")


@dataclass(frozen=True)
class UdevRule:
    """One device's rule: the match and assignment pairs, in order."""

    port: str
    label: str
    symlink: str
    filename: str
    matches: tuple[tuple[str, str, str], ...]  # (key, op, value)
    assignments: tuple[tuple[str, str, str], ...]

    def lines(self) -> list[str]:
        """The access line, then the power line (which only runs where the
        kernel has runtime power management, ``TEST=="power/control"``)."""

        def fmt(pairs: Sequence[tuple[str, str, str]]) -> str:
            return ", ".join(f'{k}{op}"{v}"' for k, op, v in pairs)

        return [
            fmt([*self.matches, *self.assignments]),
            fmt(
                [*self.matches, ("TEST", "==", "power/control"), ("ATTR{power/control}", "=", "on")]
            ),
        ]

    def text(self) -> str:
        return f"# {self.label}\n" + "\n".join(self.lines()) + "\n"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lines"] = self.lines()
        return data


def serial_pattern(serial: str) -> str:
    """A udev glob that matches ``serial`` and contains only safe characters.

    An ASCII character outside ``[A-Za-z0-9._-]`` becomes ``?`` (exactly one
    byte); a run of non-ASCII characters becomes ``*`` (the kernel's UTF-8
    may take any number of bytes, and the reader may have replaced bytes it
    could not decode).  udev ignores trailing white space of a sysfs value
    unless the pattern ends in white space, so that is dropped first.  An
    empty result means: do not match the serial.
    """
    # sysfs shows a C string: nothing after a NUL reaches user space.
    text = serial.split("\0", 1)[0].rstrip(" \t\n\r\f\v")
    out: list[str] = []
    for ch in text:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append("?")
        elif not out or out[-1] != "*":
            out.append("*")
    return "".join(out)


def _slug(text: str, limit: int = 48) -> str:
    slug = "".join(ch if _SAFE.fullmatch(ch) else "_" for ch in text)[:limit]
    return slug.strip(".") or "_"


def plan_udev(
    devices: Sequence[UsbDevice],
    *,
    group: str = "kvm",
    mode: str = "0660",
    by_port: bool = False,
    match_serial: bool = True,
) -> list[UdevRule]:
    check_passable(devices)
    if not _GROUP_RE.match(group):
        raise CannotExpress(f"group {group!r}: not a valid group name")
    if not _MODE_RE.match(mode):
        raise CannotExpress(f"mode {mode!r}: expected an octal mode like 0660")
    mode = mode if len(mode) == 4 else f"0{mode}"
    rules: list[UdevRule] = []
    for dev in devices:
        assert dev.vendor_id is not None and dev.product_id is not None
        vid, pid = f"{dev.vendor_id:04x}", f"{dev.product_id:04x}"
        matches: list[tuple[str, str, str]] = [
            ("ACTION", "!=", "remove"),
            ("SUBSYSTEM", "==", "usb"),
            ("ENV{DEVTYPE}", "==", "usb_device"),
        ]
        if by_port:
            if not _PORT_RE.match(dev.port):
                raise CannotExpress(f"{dev.port}: not a device port path")
            matches.append(("KERNEL", "==", dev.port))
        matches += [("ATTR{idVendor}", "==", vid), ("ATTR{idProduct}", "==", pid)]
        tail = f"port{dev.port}"
        if dev.serial and match_serial and not by_port:
            pattern = serial_pattern(dev.serial)
            if pattern:
                matches.append(("ATTR{serial}", "==", pattern))
            tail = _slug(dev.serial)
        if by_port:
            tail = f"port{dev.port}"
        symlink = f"vmplug/{vid}-{pid}-{tail}"
        assignments = [
            ("GROUP", "=", group),
            ("MODE", "=", mode),
            ("SYMLINK", "+=", symlink),
        ]
        rules.append(
            UdevRule(
                port=dev.port,
                label=device_label(dev),
                symlink=symlink,
                filename=f"70-vmplug-{vid}-{pid}-{tail}.rules",
                matches=tuple(matches),
                assignments=tuple(assignments),
            )
        )
    return rules


def render_rules(rules: Sequence[UdevRule]) -> str:
    head = [
        "# vmplug: USB devices passed to a VM: no autosuspend (power/control=on),",
        "# a stable /dev/vmplug/ symlink, and group access to the /dev/bus/usb node.",
        "# Install: vmplug generate udev ... --install (or copy to /etc/udev/rules.d/",
        "# and run: udevadm control --reload && udevadm trigger --subsystem-match=usb)",
    ]
    return "\n".join(head) + "\n\n" + "\n".join(r.text() for r in rules)
