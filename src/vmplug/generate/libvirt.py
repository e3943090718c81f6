"""libvirt ``<hostdev>`` elements (and the QMP socket that lets vmplug manage a domain).

* ``<vendor>``/``<product>`` only, by default.  With an ``<address>`` libvirt
  hands QEMU ``hostdevice=/dev/bus/usb/BBB/DDD``, which names one device
  number: after a replug the device has another and is lost.  ``--by-address``
  adds it anyway (libvirt needs it to tell identical devices apart).
* ``startupPolicy='optional'``: the domain starts when the device is
  unplugged, instead of failing.
* ``<qemu:commandline>`` with ``-qmp unix:…`` gives vmplug a QMP socket of its
  own next to libvirt's private monitor; the element lives in the
  ``http://libvirt.org/schemas/domain/qemu/1.0`` namespace, which must be
  declared (this module declares it on the element it writes, and on
  ``<domain>`` in the full domain).
* a remote device (usbredir from a device host, mutual TLS):
  :func:`redirdev_element` and the qemu.conf lines libvirt takes the TLS
  credentials from (:func:`qemu_conf_tls_lines`).  Put the element in the
  domain's XML: Debian 12's libvirt 9.0 starts it with the TLS credentials,
  but a *hot-plugged* redirdev's ``chardev-add`` lacks ``tls-creds`` (read in
  libvirtd's QMP log: the ``tls-creds-x509`` object is made, the chardev
  does not name it), so the stream would leave in plaintext.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vmplug.generate.common import (
    CannotExpress,
    check_passable,
    comment_text,
    device_label,
    share_text,
    shared_ids,
)
from vmplug.generate.qemu import qmp_chardev
from vmplug.model import UsbDevice

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: libvirt requires user aliases to start with this.
ALIAS_PREFIX = "ua-"


def qemu_conf_tls_lines(tls_dir: str) -> str:
    """The qemu.conf lines libvirt needs for vmplug's TLS usb-redir chardevs
    (``tls_dir``: ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""
    return (
        f'chardev_tls = 1\nchardev_tls_x509_cert_dir = "{tls_dir}"\nchardev_tls_x509_verify = 1\n'
    )


def redirdev_element(
    dev_id: str, host: str, port: int, *, tls: bool = True, reconnect: int = 1
) -> str:
    """A ``<redirdev bus='usb' type='tcp'>`` connecting (and reconnecting) to a
    device host's export endpoint, aliased ``ua-<dev_id>``."""
    red = ET.Element("redirdev", bus="usb", type="tcp")
    source = ET.SubElement(
        red,
        "source",
        mode="connect",
        host=host,
        service=str(port),
        tls="yes" if tls else "no",
    )
    ET.SubElement(source, "reconnect", enabled="yes", timeout=str(reconnect))
    ET.SubElement(red, "protocol", type="raw")
    ET.SubElement(red, "alias", name=ALIAS_PREFIX + dev_id)
    return ET.tostring(red, encoding="unicode")


@dataclass(frozen=True)
class Hostdev:
    vendor: str
    product: str
    bus: int | None
    device: int | None
    label: str


@dataclass(frozen=True)
class LibvirtPlan:
    hostdevs: tuple[Hostdev, ...]
    qmp: str | None
    by_address: bool

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["qmp_arg"] = None if self.qmp is None else qmp_chardev(self.qmp)
        return data


def plan_libvirt(
    devices: Sequence[UsbDevice], *, by_address: bool = False, qmp: str | None = None
) -> LibvirtPlan:
    check_passable(devices)
    if not by_address:
        dup = shared_ids(devices)
        if dup:
            raise CannotExpress(
                f"{share_text(devices, dup)}: libvirt refuses a vendor/product match that "
                "fits several devices. Use --by-address (bus and device number; lost on replug)."
            )
    hostdevs = []
    for dev in devices:
        assert dev.vendor_id is not None and dev.product_id is not None
        if by_address and (dev.busnum is None or dev.devnum is None):
            raise CannotExpress(f"{dev.port}: the kernel gave no bus/device number")
        hostdevs.append(
            Hostdev(
                vendor=f"0x{dev.vendor_id:04x}",
                product=f"0x{dev.product_id:04x}",
                bus=dev.busnum if by_address else None,
                device=dev.devnum if by_address else None,
                label=device_label(dev),
            )
        )
    if qmp is not None:
        qmp_chardev(qmp)  # validates
    return LibvirtPlan(hostdevs=tuple(hostdevs), qmp=qmp, by_address=by_address)


def _hostdev_element(h: Hostdev) -> ET.Element:
    el = ET.Element("hostdev", {"mode": "subsystem", "type": "usb", "managed": "yes"})
    src = ET.SubElement(el, "source", {"startupPolicy": "optional"})
    ET.SubElement(src, "vendor", {"id": h.vendor})
    ET.SubElement(src, "product", {"id": h.product})
    if h.bus is not None and h.device is not None:
        ET.SubElement(src, "address", {"bus": str(h.bus), "device": str(h.device)})
    return el


def _commandline_element(qmp: str, declare_ns: bool) -> ET.Element:
    attrs = {"xmlns:qemu": QEMU_NS} if declare_ns else {}
    el = ET.Element("qemu:commandline", attrs)
    ET.SubElement(el, "qemu:arg", {"value": "-qmp"})
    ET.SubElement(el, "qemu:arg", {"value": qmp_chardev(qmp)})
    return el


def _to_text(el: ET.Element, level: int) -> str:
    ET.indent(el, space="  ", level=level)
    return ET.tostring(el, encoding="unicode")


def _comment(text: str) -> str:
    return f"<!-- {comment_text(text)} -->"


def render_fragment(plan: LibvirtPlan) -> str:
    """Elements to paste into a domain: ``<hostdev>`` under ``<devices>``, and the
    ``<qemu:commandline>`` (a child of ``<domain>``) when a QMP socket is asked for."""
    lines = [
        _comment("vmplug: paste each <hostdev> into <devices> (virsh edit DOMAIN)"),
    ]
    if plan.by_address:
        lines.append(
            _comment(
                "by address: libvirt opens /dev/bus/usb/BUS/DEVICE, so a replugged device "
                "(new device number) is not found again"
            )
        )
    for h in plan.hostdevs:
        lines.append(_comment(h.label))
        lines.append(_to_text(_hostdev_element(h), 0))
    if plan.qmp is not None:
        lines.append(
            _comment(
                "vmplug: a QMP socket of its own; put this directly under <domain> (libvirt keeps "
                "the xmlns:qemu declaration on <domain> when it saves)"
            )
        )
        lines.append(_to_text(_commandline_element(plan.qmp, declare_ns=True), 0))
    return "\n".join(lines) + "\n"


def render_domain(
    plan: LibvirtPlan,
    name: str,
    *,
    memory_mib: int = 128,
    emulator: str = "/usr/bin/qemu-system-x86_64",
    domain_type: str = "qemu",
) -> str:
    """A complete minimal q35 domain (TCG by default) with the hostdevs and QMP socket."""
    if not name or any(c in name for c in "/\0\n"):
        raise CannotExpress(f"domain name {name!r}: no '/', newline or NUL, not empty")
    attrs = {"type": domain_type}
    if plan.qmp is not None:
        attrs["xmlns:qemu"] = QEMU_NS
    dom = ET.Element("domain", attrs)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "q35"}).text = "hvm"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    ports = max(8, len(plan.hostdevs))
    ET.SubElement(
        devices,
        "controller",
        {"type": "usb", "index": "0", "model": "qemu-xhci", "ports": str(ports)},
    )
    for h in plan.hostdevs:
        devices.append(ET.Comment(f" {comment_text(h.label)} "))
        devices.append(_hostdev_element(h))
    if plan.qmp is not None:
        dom.append(_commandline_element(plan.qmp, declare_ns=False))
    return _to_text(dom, 0) + "\n"
