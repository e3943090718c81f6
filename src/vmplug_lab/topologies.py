"""Named USB topologies for the lab guest (fixtures, lab tests, ``vmplug demo``).

What the guest kernel shows (QEMU 7.2, Debian 6.1 kernel): ``qemu-xhci`` sits
at PCI 0000:00:0b.0 and ``usb-ehci`` at 0000:00:0c.0; the boot script loads
ehci_pci before xhci_pci, so EHCI is bus 1, xHCI's USB 2 root hub bus 2 and
its USB 3 root hub bus 3.  In ``mixed``: the hubs are 2-2 and 2-2.4, the
keyboard 2-2.4.2, the SuperSpeed stick on QEMU xhci port 1 is 3-1.
"""

from __future__ import annotations

from vmplug_lab.guest import LabDevice

MIXED: tuple[LabDevice, ...] = (
    # xHCI, USB 2 side: hub on port 2 with a nested hub on its port 4.
    LabDevice("usb-hub", "xhci.0", "2", "hub1"),
    LabDevice("usb-audio", "xhci.0", "2.1", "audio1"),
    LabDevice("usb-hub", "xhci.0", "2.4", "hub2"),
    LabDevice("usb-tablet", "xhci.0", "2.4.1", "tablet1"),
    LabDevice("usb-kbd", "xhci.0", "2.4.2", "kbd1"),
    # xHCI port 1: a SuperSpeed stick lands on the USB 3 root hub.
    LabDevice("usb-storage", "xhci.0", "1", "stick1", {"serial": "LABSTICK0001"}),
    # EHCI: a high-speed stick and a tablet.
    LabDevice("usb-storage", "ehci.0", "1", "stick2", {"serial": "LABSTICK0002"}),
    LabDevice("usb-tablet", "ehci.0", "3", "tablet2"),
)

IDENTICAL: tuple[LabDevice, ...] = (
    # Two keyboards with no serial at all (QEMU would otherwise invent one from
    # the port path; an empty serial property makes the device report none),
    # told apart only by their port paths.
    LabDevice("usb-kbd", "xhci.0", "1", "kbd1", {"serial": ""}),
    LabDevice("usb-kbd", "xhci.0", "3", "kbd2", {"serial": ""}),
    # Two sticks with the same serial (cheap clones do this) on EHCI.
    LabDevice("usb-storage", "ehci.0", "1", "stick1", {"serial": "CLONE0001"}),
    LabDevice("usb-storage", "ehci.0", "2", "stick2", {"serial": "CLONE0001"}),
)

MINIMAL: tuple[LabDevice, ...] = (LabDevice("usb-tablet", "xhci.0", "1", "tablet1"),)

TOPOLOGIES: dict[str, tuple[LabDevice, ...]] = {
    "mixed": MIXED,
    "identical": IDENTICAL,
    "minimal": MINIMAL,
}
