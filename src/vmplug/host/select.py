"""Device selectors shared by ``attach``, ``detach``, ``generate`` and ``doctor``.

A selector is one of:

* a port path: ``3-1.2`` (exactly one device);
* ``vid:pid`` in hex: ``1235:821a`` (every device with that id);
* a serial number: ``S/N 123`` (every device with that serial);
* a rule in the rule language: ``rule:with-interface one-of { 01:*:* }``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from vmplug.errors import SelectorError
from vmplug.model import UsbDevice

_PORT_RE = re.compile(r"^\d+-\d+(\.\d+)*$")
_VIDPID_RE = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")


def describe(device: UsbDevice) -> str:
    """One line that tells a person which device this is."""
    name = device.display_name
    serial = f" serial={device.serial}" if device.serial else ""
    return f"{device.port}  {device.vidpid or '????:????'}  {name or '(no name)'}{serial}"


def select(devices: Iterable[UsbDevice], selector: str) -> list[UsbDevice]:
    """Every device the selector names (possibly none), root hubs excluded."""
    pool = [d for d in devices if not d.is_root_hub]
    text = selector.strip()
    if text.startswith("rule:"):
        from vmplug.rules import parse_rule  # noqa: PLC0415 - avoids an import cycle

        rule = parse_rule(text[len("rule:") :])
        return [d for d in pool if rule.matches(d)]
    if _PORT_RE.match(text):
        return [d for d in pool if d.port == text]
    m = _VIDPID_RE.match(text)
    if m:
        vid, pid = int(m.group(1), 16), int(m.group(2), 16)
        return [d for d in pool if d.vendor_id == vid and d.product_id == pid]
    return [d for d in pool if d.serial is not None and d.serial == text]


def select_one(devices: Sequence[UsbDevice], selector: str) -> UsbDevice:
    """Exactly one device, or a :class:`SelectorError` that lists the candidates."""
    found = select(devices, selector)
    if len(found) == 1:
        return found[0]
    if not found:
        present = tuple(describe(d) for d in devices if not d.is_root_hub)
        raise SelectorError(
            f"no USB device matches {selector!r} (a port path like 3-1.2, vid:pid, "
            "a serial, or rule:RULE)",
            present,
        )
    raise SelectorError(
        f"{selector!r} is ambiguous: {len(found)} devices match; name one by port path or serial",
        tuple(describe(d) for d in found),
    )


def select_many(devices: Sequence[UsbDevice], selectors: Sequence[str]) -> list[UsbDevice]:
    """The union of what every selector names, in order; each must name at least one."""
    out: list[UsbDevice] = []
    for selector in selectors:
        found = select(devices, selector)
        if not found:
            select_one(devices, selector)  # raises with the candidates
        out.extend(d for d in found if d not in out)
    return out
