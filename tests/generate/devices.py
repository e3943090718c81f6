"""USB devices the generator tests use, read from sysfs trees captured in the lab.

From ``tests/fixtures/sysfs`` (re-made by ``python -m vmplug_lab.capture_all``):

* ``AUDIO``: QEMU's usb-audio (``mixed`` 2-2.1): audio control + streaming
  with an isochronous OUT endpoint, full speed, so it gets iso buffers;
* ``KEYLAB``: the lab kernel's MIDI gadget with an Arturia KeyLab mkII's
  identity (``gadgets`` 5-1): audio class, but MIDI over bulk, no serial;
* ``DISK``: a usb-storage stick at 5000 Mbit/s on xHCI's USB 3 root hub
  (``mixed`` 3-1);
* ``SERIAL_A``/``SERIAL_B``: two identical CDC ACM gadgets without serial
  numbers (``gadgets`` 6-1 and 7-1);
* ``HUB`` and ``ROOT``: QEMU's usb-hub (``mixed`` 2-2) and xHCI's USB 2 root hub.
"""

from __future__ import annotations

from pathlib import Path

from vmplug.host.sysfs import read_devices
from vmplug.model import UsbDevice

CAPTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"


def _by_port(capture: str) -> dict[str, UsbDevice]:
    return {d.port: d for d in read_devices(CAPTURES / capture)}


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
