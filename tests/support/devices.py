"""USB devices the tests use, read from sysfs trees captured in the lab.

Every device comes from a real kernel (``tests/fixtures/sysfs``, re-made by
``python -m vmplug_lab.capture_all``): QEMU's emulated devices from ``mixed``,
and from ``gadgets`` devices the lab kernel makes itself with ``dummy_hcd``
and configfs (see :mod:`vmplug_lab.gadgets`): the identity of a Focusrite
Scarlett 4i4 and an Arturia KeyLab mkII with their MIDI functions, and two
identical serial adapters without serial numbers.

By name, for the generator tests:

* ``AUDIO``: QEMU's usb-audio (``mixed`` 2-2.1): audio control + streaming
  with an isochronous OUT endpoint, full speed, so it gets iso buffers;
* ``KEYLAB``: the lab kernel's MIDI gadget with an Arturia KeyLab mkII's
  identity (``gadgets`` 5-1): audio class, but MIDI over bulk, no serial;
* ``DISK``: a usb-storage stick at 5000 Mbit/s on xHCI's USB 3 root hub
  (``mixed`` 3-1);
* ``SERIAL_A``/``SERIAL_B``: two identical CDC ACM gadgets without serial
  numbers (``gadgets`` 6-1 and 7-1);
* ``HUB`` and ``ROOT``: QEMU's usb-hub (``mixed`` 2-2) and xHCI's USB 2 root hub.

By key in :data:`DEVICES`, for the rule tests.  The one device there not from
a capture is ``unreadable``: a device whose sysfs files could not be read at
all, which is what the reader returns then (a port and nothing else), not a
tree.
"""

from __future__ import annotations

from pathlib import Path

from vmplug.host.sysfs import scan
from vmplug.model import UsbDevice

CAPTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"


def _by_port(capture: str) -> dict[str, UsbDevice]:
    return {d.port: d for d in scan(CAPTURES / capture)}


_MIXED = _by_port("mixed")
_GADGETS = _by_port("gadgets")

AUDIO = _MIXED["2-2.1"]
KEYLAB = _GADGETS["5-1"]
DISK = _MIXED["3-1"]
SERIAL_A = _GADGETS["6-1"]
SERIAL_B = _GADGETS["7-1"]
HUB = _MIXED["2-2"]
ROOT = _MIXED["usb2"]

ALL = [ROOT, HUB, AUDIO, KEYLAB, DISK, SERIAL_A, SERIAL_B]

DEVICES: dict[str, UsbDevice] = {
    # -device usb-audio: audio control 01:01:04, audio streaming 01:02:00 alt 0 and alt 1
    "qemu-audio": AUDIO,
    # -device usb-hub (a nested hub, the keyboard and a tablet hang from it)
    "qemu-hub": HUB,
    # -device usb-kbd: HID boot keyboard 03:01:01
    "qemu-kbd": _MIXED["2-2.4.2"],
    # -device usb-tablet: HID 03:00:00 (no boot subclass), same IDs as the keyboard
    "qemu-tablet": _MIXED["2-2.4.1"],
    # -device usb-storage: mass storage, SCSI, bulk-only 08:06:50 (SuperSpeed)
    "qemu-storage": DISK,
    # gadget with a Scarlett 4i4's identity: 1235:821a, misc/IAD, MIDI 01:01:00 01:03:00
    "scarlett-4i4": _GADGETS["4-1"],
    # gadget with an Arturia KeyLab mkII's identity: audio control + MIDI, no serial
    "keylab-mkii": KEYLAB,
    # two identical CDC ACM serial adapters, no serial: only the port tells them apart
    "serial-a": SERIAL_A,
    "serial-b": SERIAL_B,
    # A device whose sysfs files could not be read: no IDs, no strings, no interfaces
    "unreadable": UsbDevice(port="2-4"),
}
