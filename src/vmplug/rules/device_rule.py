r"""A device as a usbguard rule: what ``usbguard generate-policy`` prints for it.

``usbguard generate-policy`` (``DevicePrivate::getDeviceRule`` and
``RulePrivate::toString``) writes, for each device::

    allow id VVVV:PPPP serial "S" name "N" hash "H" parent-hash "P" [via-port "PORT"]
          [with-interface X | with-interface { X Y ... }] with-connect-type "C"

in that order: every attribute that has a value, strings quoted even when
empty, ``via-port`` only for a device without a serial (its default
``--no-ports-sn``), ``with-interface`` in the set form when there is more
than one interface descriptor (and left out when there is none), and strings
escaped as ``Utility::escapeString`` does: ``\"`` and ``\\``, every byte
that is not printable ASCII as ``\xHH``.  :func:`device_rule` makes the same
line without the leading target (vmplug's config holds the target), which
:func:`vmplug.rules.parse_rule` reads back and which matches that device.

A device usbguard would skip (no IDs, descriptors its parser refuses) has no
rule: :func:`device_rule` says why instead.

One known difference: a product or serial string that is not UTF-8 reaches
vmplug with U+FFFD in place of the bad bytes (the reader decodes with
``replace``), so its ``name``/``serial`` are not the ``\xHH`` bytes usbguard
prints; the ``hash`` is still usbguard's, since it is taken over the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmplug.model import UsbDevice

__all__ = ["DeviceRule", "device_rule", "usbguard_quote"]

#: Bytes ``std::isprint`` accepts in the "C" locale.
_PRINTABLE = range(0x20, 0x7F)


def usbguard_quote(value: str) -> str:
    r"""``value`` in double quotes, escaped byte by byte like usbguard's ``escapeString``.

    Non-ASCII text goes out as its UTF-8 bytes in ``\xHH`` form (usbguard
    works on bytes and only trusts printable ASCII); vmplug's parser joins
    such runs back into the text.
    """
    out = ['"']
    for byte in value.encode("utf-8", "surrogateescape"):
        if byte in (0x22, 0x5C):  # " and \
            out.append("\\" + chr(byte))
        elif byte in _PRINTABLE:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    out.append('"')
    return "".join(out)


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """One device's rule: the text and its attribute values in print order."""

    port: str
    #: The rule text (None when usbguard would not make one; see ``error``).
    text: str | None
    #: Attribute -> value: strings, or for ``with-interface`` a list of ``cc:ss:pp``.
    fields: dict[str, str | list[str]]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "rule": self.text, "fields": self.fields}
        if self.error is not None:
            out["error"] = self.error
        return out


def device_rule(device: UsbDevice, *, with_port: bool | None = None) -> DeviceRule:
    """The rule ``usbguard generate-policy`` prints for ``device``, minus ``allow``.

    ``with_port``: True adds ``via-port`` always (``generate-policy
    --with-ports``); None (the default) only when the device has no serial,
    as ``generate-policy`` does by default.
    """
    port = device.port
    if device.vendor_id is None or device.product_id is None:
        return DeviceRule(port, None, {}, "no vendor/product ID (usbguard skips such a device)")
    if device.descriptors_sha256 is None:
        return DeviceRule(
            port,
            None,
            {},
            "no hash: the descriptors are missing or usbguard's parser refuses them "
            "(usbguard skips such a device)",
        )
    if device.parent_hash is None:
        return DeviceRule(port, None, {}, "no parent hash: the parent device could not be read")
    serial = device.serial or ""
    fields: dict[str, str | list[str]] = {
        "id": f"{device.vendor_id:04x}:{device.product_id:04x}",
        "serial": serial,
        "name": device.product or "",
        "hash": device.descriptors_sha256,
        "parent-hash": device.parent_hash,
    }
    if with_port or (with_port is None and not serial):
        fields["via-port"] = port
    interfaces = [f"{c:02x}:{s:02x}:{p:02x}" for c, s, p in device.interface_triples]
    if interfaces:
        fields["with-interface"] = interfaces
    # usbguard reads no connect type for a root hub (it has no port).
    fields["with-connect-type"] = "" if device.is_root_hub else (device.connect_type or "")
    parts: list[str] = []
    for name, value in fields.items():
        if isinstance(value, list):
            text = value[0] if len(value) == 1 else "{ " + " ".join(value) + " }"
        elif name == "id":
            text = value
        else:
            text = usbguard_quote(value)
        parts.append(f"{name} {text}")
    return DeviceRule(port, " ".join(parts), fields)
