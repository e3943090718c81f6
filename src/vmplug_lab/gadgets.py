"""Real USB devices with the descriptors of real audio gear, made by the lab kernel.

QEMU's emulated devices cover keyboards, tablets, sticks and a full-speed
audio device, but not a MIDI keyboard or two identical serial adapters
without serial numbers.  The lab kernel can make those for real: the
``dummy_hcd`` module is a host controller and a device controller joined
back to back, and a configfs gadget (``libcomposite``) bound to its device
side is enumerated by the host side like any device plugged into a port.
sysfs, descriptors, drivers and uevents are the kernel's own.

The identities are the real products' (vendor and product ids, strings,
device class triple); the functions are the kernel's MIDI and ACM gadget
functions, whose descriptors follow the USB MIDI 1.0 and CDC ACM
specifications as real devices of these kinds do.

What cannot be made here: isochronous endpoints.  ``dummy_hcd`` offers none
(its iso endpoints are compiled out), so the UAC1/UAC2 gadget functions fail
to bind ("afunc_bind ... Error", -ENODEV, seen in the 6.1 lab kernel); the
isochronous audio device in the fixtures is QEMU's ``usb-audio``.

    .venv/bin/python -m vmplug_lab.capture_all gadgets
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gadget:
    """One configfs gadget: device descriptor fields and its functions."""

    name: str
    vendor_id: int
    product_id: int
    bcd_device: int
    manufacturer: str
    product: str
    serial: str | None
    #: (function type.instance, {attribute: value}) in configfs terms
    functions: tuple[tuple[str, dict[str, str]], ...]
    device_class: tuple[int, int, int] = (0, 0, 0)
    max_power_ma: int = 100
    attributes: dict[str, str] = field(default_factory=dict)


GADGETS: tuple[Gadget, ...] = (
    # The identity of a Focusrite Scarlett 4i4 3rd gen (ids, strings, serial,
    # misc/IAD class triple, 500 mA) with its MIDI function; its isochronous
    # audio streaming interfaces cannot be made here (see above).
    Gadget(
        "scarlett",
        0x1235,
        0x821A,
        0x0643,
        "Focusrite",
        "Scarlett 4i4 USB",
        "P9EDDN6231A8D1",
        (("midi.0", {"in_ports": "1", "out_ports": "1"}),),
        device_class=(0xEF, 0x02, 0x01),
        max_power_ma=500,
    ),
    # Arturia KeyLab mkII 61: USB MIDI (audio control + MIDI streaming), no serial.
    Gadget(
        "keylab",
        0x1C75,
        0x02CB,
        0x0100,
        "Arturia",
        "KeyLab mkII 61",
        None,
        (("midi.0", {"in_ports": "1", "out_ports": "1"}),),
    ),
    # Two identical serial adapters with no serial number at all: Linux's own
    # CDC ACM gadget serial ids (NetChip 0525:a4a7), told apart only by port.
    Gadget(
        "serial1",
        0x0525,
        0xA4A7,
        0x0100,
        "Linux",
        "Gadget Serial v2.4",
        None,
        (("acm.GS0", {}),),
        device_class=(0x02, 0x00, 0x00),
    ),
    Gadget(
        "serial2",
        0x0525,
        0xA4A7,
        0x0100,
        "Linux",
        "Gadget Serial v2.4",
        None,
        (("acm.GS0", {}),),
        device_class=(0x02, 0x00, 0x00),
    ),
)

CONFIGFS = "/sys/kernel/config/usb_gadget"


def setup_script(
    gadgets: tuple[Gadget, ...] = GADGETS,
    after_bind: Callable[[Gadget], list[str]] | None = None,
) -> str:
    """A POSIX shell script that loads dummy_hcd and binds one gadget per UDC;
    ``after_bind`` gives shell lines run right after each gadget is bound."""
    q = shlex.quote
    lines = [
        "set -e",
        f"modprobe dummy_hcd num={len(gadgets)}",
        "modprobe libcomposite",
        "mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config",
    ]
    for n, g in enumerate(gadgets):
        d = f"{CONFIGFS}/{g.name}"
        cls, sub, proto = g.device_class
        lines += [
            f"mkdir -p {d}/strings/0x409 {d}/configs/c.1/strings/0x409",
            f"echo 0x{g.vendor_id:04x} > {d}/idVendor",
            f"echo 0x{g.product_id:04x} > {d}/idProduct",
            f"echo 0x{g.bcd_device:04x} > {d}/bcdDevice",
            f"echo 0x0200 > {d}/bcdUSB",
            f"echo 0x{cls:02x} > {d}/bDeviceClass",
            f"echo 0x{sub:02x} > {d}/bDeviceSubClass",
            f"echo 0x{proto:02x} > {d}/bDeviceProtocol",
            f"echo {q(g.manufacturer)} > {d}/strings/0x409/manufacturer",
            f"echo {q(g.product)} > {d}/strings/0x409/product",
            f"echo {g.max_power_ma} > {d}/configs/c.1/MaxPower",
            f"echo {q(g.product)} > {d}/configs/c.1/strings/0x409/configuration",
        ]
        if g.serial is not None:
            lines.append(f"echo {q(g.serial)} > {d}/strings/0x409/serialnumber")
        for func, attrs in g.functions:
            lines.append(f"mkdir -p {d}/functions/{func}")
            lines += [f"echo {q(v)} > {d}/functions/{func}/{k}" for k, v in attrs.items()]
            lines.append(f"ln -s {d}/functions/{func} {d}/configs/c.1/")
        lines.append(f"echo dummy_udc.{n} > {d}/UDC")
        if after_bind is not None:
            lines += after_bind(g)
    return "\n".join(lines) + "\n"
