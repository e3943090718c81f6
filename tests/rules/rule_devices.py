"""Devices the rule tests match against, with the values real devices report.

QEMU's emulated devices carry what a 6.1 kernel read from them in the lab guest
(tests/fixtures/sysfs/mixed): IDs, product strings, interface triples with
alternate settings, and serial numbers of the ``<string>-<controller PCI
path>-<port>`` form QEMU's ``usb_desc_create_serial`` gives them (here for an
xHCI controller at 0000:00:04.0).
The Focusrite and Arturia devices carry their real IDs and product strings; their
interface lists are representative of UAC2 audio + MIDI devices.  Hashes are
made up.
"""

from __future__ import annotations

from vmplug.model import AltSetting, Interface, UsbDevice


def _iface(number: int, *alts: tuple[int, int, int]) -> Interface:
    cls, sub, proto = alts[0]
    return Interface(
        number=number,
        cls=cls,
        subclass=sub,
        protocol=proto,
        alt_settings=tuple(AltSetting(i, c, s, p) for i, (c, s, p) in enumerate(alts)),
    )


DEVICES: dict[str, UsbDevice] = {
    # -device usb-audio: audio control 01:01:04, audio streaming 01:02:00 alt 0 and alt 1
    "qemu-audio": UsbDevice(
        port="3-1",
        vendor_id=0x46F4,
        product_id=0x0002,
        manufacturer="QEMU",
        product="QEMU USB Audio",
        serial="1-0000:00:04.0-1",
        connect_type="unknown",
        interfaces=(_iface(0, (1, 1, 4)), _iface(1, (1, 2, 0), (1, 2, 0))),
        descriptors_sha256="nY8hQyLx8c2CzGgkT0t8pW2YpR0S4mN1q3cM7C7Vb2s=",
    ),
    # -device usb-hub (the keyboard and the tablet hang from it)
    "qemu-hub": UsbDevice(
        port="3-2",
        vendor_id=0x0409,
        product_id=0x55AA,
        manufacturer="QEMU",
        product="QEMU USB Hub",
        serial="314159-0000:00:04.0-2",
        connect_type="unknown",
        device_class=9,
        interfaces=(_iface(0, (9, 0, 0)),),
        descriptors_sha256="4mC0Hn2m3Z8V5x4HkqS3mD0j1d6m2cQYx9l7tW3qv0E=",
    ),
    # -device usb-kbd: HID boot keyboard 03:01:01
    "qemu-kbd": UsbDevice(
        port="3-2.1",
        vendor_id=0x0627,
        product_id=0x0001,
        manufacturer="QEMU",
        product="QEMU USB Keyboard",
        serial="68284-0000:00:04.0-2.1",
        connect_type="unknown",
        interfaces=(_iface(0, (3, 1, 1)),),
        descriptors_sha256="Jd1v8N0Rk3sZ1o0N5gEw0oHqv8hX6cN2a5mB9y4pL1Q=",
    ),
    # -device usb-tablet: HID 03:00:00 (no boot subclass), same IDs as the keyboard
    "qemu-tablet": UsbDevice(
        port="3-2.2",
        vendor_id=0x0627,
        product_id=0x0001,
        manufacturer="QEMU",
        product="QEMU USB Tablet",
        serial="28754-0000:00:04.0-2.2",
        connect_type="unknown",
        interfaces=(_iface(0, (3, 0, 0)),),
        descriptors_sha256="Q2v0c8m1Nf3xR7kL0pZ4sW9eH2bT6yU1iO5aD8gJ3nM=",
    ),
    # -device usb-storage: mass storage, SCSI, bulk-only 08:06:50
    "qemu-storage": UsbDevice(
        port="3-3",
        vendor_id=0x46F4,
        product_id=0x0001,
        manufacturer="QEMU",
        product="QEMU USB HARDDRIVE",
        serial="1-0000:00:04.0-3",
        connect_type="unknown",
        interfaces=(_iface(0, (8, 6, 0x50)),),
        descriptors_sha256="x7Yq2Lr9Ct4Vb8Nm1Kp6Hs3Jd0Fg5Wz2Ea9Ru4Ti7Oo=",
    ),
    # Focusrite Scarlett 4i4 3rd gen: UAC2 control, 2 streaming (alt 0/1), MIDI, DFU
    "scarlett-4i4": UsbDevice(
        port="1-1.2",
        vendor_id=0x1235,
        product_id=0x821A,
        manufacturer="Focusrite",
        product="Scarlett 4i4 USB",
        serial="P9EDDN6231A8D1",
        connect_type="hotplug",
        interfaces=(
            _iface(0, (1, 1, 0x20)),
            _iface(1, (1, 2, 0x20), (1, 2, 0x20)),
            _iface(2, (1, 2, 0x20), (1, 2, 0x20)),
            _iface(3, (1, 3, 0)),
            _iface(4, (0xFE, 1, 1)),
        ),
        descriptors_sha256="kF3d9Xs1Qm7Lp2Vz8Nc4Rb6Ty0Hg5Ju3Wa1Ei9Oq2Ks=",
    ),
    # Arturia KeyLab mkII 61: audio control + MIDI streaming, no serial number
    "keylab-mkii": UsbDevice(
        port="1-1.3",
        vendor_id=0x1C75,
        product_id=0x02CB,
        manufacturer="Arturia",
        product="KeyLab mkII 61",
        serial=None,
        connect_type="hotplug",
        interfaces=(_iface(0, (1, 1, 0)), _iface(1, (1, 3, 0))),
        descriptors_sha256="Ab3De5Gh7Jk9Lm1Np3Qr5St7Uv9Wx1Yz3Bc5Df7Gh9I=",
    ),
    # A device whose sysfs files could not be read: no IDs, no strings, no interfaces
    "unreadable": UsbDevice(port="2-4"),
}
