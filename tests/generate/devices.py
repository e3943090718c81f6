"""USB devices the generator tests use, shaped like what the sysfs reader returns.

The descriptors follow the real devices: a Focusrite Scarlett 4i4 3rd gen
(high speed, UAC2 streaming over isochronous endpoints), an Arturia KeyLab
mkII (full speed, audio control + MIDI streaming over bulk), a USB 3 disk,
two identical USB-serial adapters without serials, and a hub.
"""

from __future__ import annotations

import dataclasses

from vmplug.model import AltSetting, Endpoint, Interface, UsbDevice

SCARLETT = UsbDevice(
    port="3-1.2",
    busnum=3,
    devnum=7,
    vendor_id=0x1235,
    product_id=0x821A,
    bcd_device=0x0643,
    manufacturer="Focusrite",
    product="Scarlett 4i4 USB",
    serial="D8NHM9B0A67C3F",
    speed_mbps=480.0,
    usb_version="2.00",
    device_class=0xEF,
    device_subclass=0x02,
    device_protocol=0x01,
    interfaces=(
        Interface(
            number=0,
            cls=0x01,
            subclass=0x01,
            protocol=0x20,
            driver="snd-usb-audio",
            alt_settings=(AltSetting(0, 0x01, 0x01, 0x20),),
        ),
        Interface(
            number=1,
            cls=0x01,
            subclass=0x02,
            protocol=0x20,
            driver="snd-usb-audio",
            alt_settings=(
                AltSetting(0, 0x01, 0x02, 0x20),
                AltSetting(
                    1,
                    0x01,
                    0x02,
                    0x20,
                    (Endpoint(0x01, 0x05, 0x0048, 1), Endpoint(0x81, 0x11, 0x0004, 4)),
                ),
            ),
        ),
        Interface(
            number=2,
            cls=0x01,
            subclass=0x02,
            protocol=0x20,
            driver="snd-usb-audio",
            alt_settings=(
                AltSetting(0, 0x01, 0x02, 0x20),
                AltSetting(1, 0x01, 0x02, 0x20, (Endpoint(0x82, 0x05, 0x0048, 1),)),
            ),
        ),
    ),
)

KEYLAB = UsbDevice(
    port="3-1.3",
    busnum=3,
    devnum=8,
    vendor_id=0x1C75,
    product_id=0x02CB,
    bcd_device=0x0100,
    manufacturer="Arturia",
    product="KeyLab mkII 61",
    serial="0123456789",
    speed_mbps=12.0,
    usb_version="2.00",
    device_class=0x00,
    interfaces=(
        Interface(0, 0x01, 0x01, 0x00, "snd-usb-audio", (AltSetting(0, 0x01, 0x01, 0x00),)),
        Interface(
            1,
            0x01,
            0x03,
            0x00,
            "snd-usb-audio",
            (
                AltSetting(
                    0,
                    0x01,
                    0x03,
                    0x00,
                    (Endpoint(0x02, 0x02, 0x0040, 0), Endpoint(0x81, 0x02, 0x0040, 0)),
                ),
            ),
        ),
    ),
)

DISK = UsbDevice(
    port="4-2",
    busnum=4,
    devnum=2,
    vendor_id=0x0BC2,
    product_id=0x2322,
    manufacturer="Seagate",
    product="Expansion SSD",
    serial="NAAB1234",
    speed_mbps=5000.0,
    usb_version="3.20",
    device_class=0x00,
    interfaces=(Interface(0, 0x08, 0x06, 0x50, "uas"),),
)

SERIAL_A = UsbDevice(
    port="1-4",
    busnum=1,
    devnum=5,
    vendor_id=0x1A86,
    product_id=0x7523,
    product="USB Serial",
    speed_mbps=12.0,
    usb_version="1.10",
    device_class=0xFF,
    interfaces=(Interface(0, 0xFF, 0x01, 0x02, "ch341"),),
)
SERIAL_B = dataclasses.replace(SERIAL_A, port="1-5", devnum=6)

HUB = UsbDevice(
    port="3-1",
    busnum=3,
    devnum=2,
    vendor_id=0x05E3,
    product_id=0x0610,
    product="USB2.0 Hub",
    speed_mbps=480.0,
    usb_version="2.10",
    device_class=0x09,
    num_ports=4,
    interfaces=(Interface(0, 0x09, 0x00, 0x01, "hub"),),
)

ROOT = UsbDevice(
    port="usb3",
    busnum=3,
    devnum=1,
    vendor_id=0x1D6B,
    product_id=0x0002,
    device_class=0x09,
    speed_mbps=480.0,
)

ALL = [ROOT, HUB, SCARLETT, KEYLAB, DISK, SERIAL_A, SERIAL_B]
