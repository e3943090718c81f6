"""SPICE usbredir filters: which client devices may be redirected into the guest.

The filter language is usbredir's (``usbredirfilter.h``): rules of five
integers ``class,vendor,product,version,allow`` (``-1`` = any; numbers in C
syntax, so ``0x1235`` works), separated by ``|``.  The first rule that matches
decides.  usbredir checks the device class and every interface class
separately and each must be allowed, so device rules here use class ``-1``.

Two spellings of the same filter exist:

* ``,`` between fields: what SPICE clients take
  (``remote-viewer --spice-usbredir-auto-redirect-filter=…`` and
  ``--spice-usbredir-redirect-on-connect=…``);
* ``:`` between fields: QEMU's ``-device usb-redir,filter=…``, because a comma
  would end the QEMU option (``usbredirfilter_string_to_rules(dev->filter_str,
  ":", "|", …)`` in ``hw/usb/redirect.c``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vmplug.generate.common import check_passable, device_label
from vmplug.model import UsbDevice

ANY = -1


@dataclass(frozen=True)
class FilterRule:
    cls: int
    vendor: int
    product: int
    version: int
    allow: bool
    label: str = ""

    def fields(self) -> list[str]:
        def num(value: int, width: int) -> str:
            return "-1" if value == ANY else f"0x{value:0{width}x}"

        return [
            num(self.cls, 2),
            num(self.vendor, 4),
            num(self.product, 4),
            num(self.version, 4),
            "1" if self.allow else "0",
        ]


@dataclass(frozen=True)
class SpicePlan:
    rules: tuple[FilterRule, ...]

    def filter(self, separator: str = ",") -> str:
        return "|".join(separator.join(r.fields()) for r in self.rules)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": [asdict(r) for r in self.rules],
            "spice": self.filter(","),
            "qemu": self.filter(":"),
        }


def plan_spice(
    devices: Sequence[UsbDevice], *, allow_others: bool = False, match_version: bool = False
) -> SpicePlan:
    """Allow exactly ``devices`` (by vendor/product), then block everything else.

    ``match_version`` also pins bcdDevice (a firmware update then blocks the
    device); ``allow_others`` ends with an allow-all rule instead of block-all.
    """
    check_passable(devices)
    rules = []
    for dev in devices:
        assert dev.vendor_id is not None and dev.product_id is not None
        version = dev.bcd_device if match_version and dev.bcd_device is not None else ANY
        rules.append(
            FilterRule(ANY, dev.vendor_id, dev.product_id, version, True, device_label(dev))
        )
    rules.append(
        FilterRule(
            ANY,
            ANY,
            ANY,
            ANY,
            allow_others,
            "everything else" if allow_others else "block the rest",
        )
    )
    return SpicePlan(tuple(rules))


def render(plan: SpicePlan, fmt: str = "spice") -> str:
    """The filter string alone on one line (easy to paste or use in ``$(…)``)."""
    return plan.filter(":" if fmt == "qemu" else ",") + "\n"
