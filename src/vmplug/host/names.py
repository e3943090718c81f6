"""Vendor and product names from the system's ``usb.ids`` database.

Used only for devices that give no manufacturer or product string.  The file
(≈700 KB) is read once, lazily, and searched with ``str.find`` for the one
vendor block needed, so a lookup costs microseconds and nothing is parsed
for devices that name themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

TYPE_CHECKING = False  # `vmplug list --json` imports this module: no typing, no pathlib
if TYPE_CHECKING:
    from pathlib import Path

#: Where Debian (usb.ids, usbutils), Fedora/Arch (hwdata) and others put it.
SEARCH_PATHS = (
    "/usr/share/misc/usb.ids",
    "/var/lib/usbutils/usb.ids",
    "/usr/share/hwdata/usb.ids",
    "/usr/share/usb.ids",
    "/usr/share/libosinfo/usb.ids",
)


def find_usb_ids() -> Path | None:
    """The first usb.ids present; ``VMPLUG_USB_IDS`` overrides (empty: none)."""
    from pathlib import Path  # noqa: PLC0415 - only for a device that names itself not

    override = os.environ.get("VMPLUG_USB_IDS")
    if override is not None:
        return Path(override) if override and os.path.isfile(override) else None  # noqa: PTH113
    return next((Path(p) for p in SEARCH_PATHS if os.path.isfile(p)), None)  # noqa: PTH113


@dataclass
class UsbIds:
    """A lazily loaded usb.ids file."""

    path: Path | None
    _text: str | None = field(default=None, init=False, repr=False)

    def _load(self) -> str:
        if self._text is None:
            try:
                raw = self.path.read_bytes() if self.path else b""
            except OSError:
                raw = b""
            # The file is UTF-8 today; older copies were Latin-1.
            try:
                self._text = "\n" + raw.decode("utf-8")
            except UnicodeDecodeError:
                self._text = "\n" + raw.decode("latin-1")
        return self._text

    def lookup(self, vendor_id: int, product_id: int | None) -> tuple[str | None, str | None]:
        """(vendor name, product name), either ``None`` when unknown."""
        text = self._load()
        start = text.find(f"\n{vendor_id:04x}  ")
        if start < 0:
            return None, None
        line_end = text.find("\n", start + 1)
        vendor = text[start + 7 : line_end if line_end > 0 else None].strip() or None
        if product_id is None or line_end < 0:
            return vendor, None
        # The vendor's products are the tab-indented lines right after it.
        key = f"\n\t{product_id:04x}  "
        pos = line_end
        while pos >= 0 and text.startswith("\n\t", pos):
            if text.startswith(key, pos):
                end = text.find("\n", pos + 1)
                return vendor, text[pos + len(key) : end if end > 0 else None].strip() or None
            pos = text.find("\n", pos + 1)
        return vendor, None
