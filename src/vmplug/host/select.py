"""Device selectors shared by ``attach``, ``detach``, ``generate`` and ``doctor``.

A selector is one of:

* a port path: ``3-1.2`` (exactly one device);
* ``vid:pid`` in hex: ``1235:821a`` (every device with that id);
* a serial number: ``S/N 123`` (every device with that serial);
* a rule in the rule language: ``rule:with-interface one-of { 01:*:* }``.

The command line is friendly (surrounding white space is ignored); the API
asks for ``exact=True``: ``GET /v1/devices/3-1%0a`` names no device, not
``3-1``.  Either way a selector's pattern must match all of it: Python's
``$`` also matches before a trailing newline, so the patterns are used with
:meth:`re.Pattern.fullmatch`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from vmplug.errors import SelectorError
from vmplug.model import UsbDevice
from vmplug.textsafe import printable

_PORT_RE = re.compile(r"\d+-\d+(\.\d+)*")
_VIDPID_RE = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")


def describe(device: UsbDevice, *, exact: bool = False) -> str:
    """One line that tells a person which device this is.

    The device's own strings (name, serial) go through
    :func:`~vmplug.textsafe.printable` (control characters visible, cut when
    long) unless ``exact``, which is for JSON.
    """
    name = device.display_name or "(no name)"
    serial = device.serial
    if not exact:
        name = printable(name)
        serial = printable(serial) if serial else serial
    serial_part = f" serial={serial}" if serial else ""
    return f"{device.port}  {device.vidpid or '????:????'}  {name}{serial_part}"


def select(devices: Iterable[UsbDevice], selector: str, *, exact: bool = False) -> list[UsbDevice]:
    """Every device the selector names (possibly none), root hubs excluded.

    ``exact``: the selector is taken as it is (the API); otherwise white space
    around it is ignored (the command line).
    """
    pool = [d for d in devices if not d.is_root_hub]
    text = selector if exact else selector.strip()
    if text.startswith("rule:"):
        from vmplug.rules import parse_rule  # noqa: PLC0415 - avoids an import cycle

        rule = parse_rule(text[len("rule:") :])
        return [d for d in pool if rule.matches(d)]
    if _PORT_RE.fullmatch(text):
        return [d for d in pool if d.port == text]
    m = _VIDPID_RE.fullmatch(text)
    if m:
        vid, pid = int(m.group(1), 16), int(m.group(2), 16)
        return [d for d in pool if d.vendor_id == vid and d.product_id == pid]
    return [d for d in pool if d.serial is not None and d.serial == text]


def select_one(devices: Sequence[UsbDevice], selector: str, *, exact: bool = False) -> UsbDevice:
    """Exactly one device, or a :class:`SelectorError` that lists the candidates."""
    found = select(devices, selector, exact=exact)
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


def select_many(
    devices: Sequence[UsbDevice], selectors: Sequence[str], *, exact: bool = False
) -> list[UsbDevice]:
    """The union of what every selector names, in order; each must name at least one."""
    out: list[UsbDevice] = []
    for selector in selectors:
        found = select(devices, selector, exact=exact)
        if not found:
            select_one(devices, selector, exact=exact)  # raises with the candidates
        out.extend(d for d in found if d not in out)
    return out
