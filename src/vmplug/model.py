"""Frozen data model shared by every layer of vmplug.

Everything here is pure data: the sysfs reader produces it, the rule matcher,
the reconciler, the generators and the doctor consume it.  Nothing in this
module performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

TYPE_CHECKING = False  # `vmplug list --json` imports this module: typing costs a few ms
if TYPE_CHECKING:
    from hashlib import sha256 as sha256  # noqa: PLC0414 - the reader takes it from here
    from typing import Any
else:
    try:  # CPython's own SHA-256, built in: hashlib loads OpenSSL (~3 ms of `list`'s start)
        from _sha256 import sha256  # 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # 3.12+
        except ImportError:
            from hashlib import sha256

#: Prefix of every QEMU device id vmplug creates (:attr:`UsbDevice.qemu_id`);
#: the one definition (the VM side reads it through :mod:`vmplug.vms.base`).
ID_PREFIX = "vmplug-"

#: USB class codes that matter to vmplug's policy.
CLASS_PER_INTERFACE = 0x00
CLASS_AUDIO = 0x01
CLASS_HID = 0x03
CLASS_MASS_STORAGE = 0x08
CLASS_HUB = 0x09


class TransferType(IntEnum):
    """bmAttributes bits 1..0 of an endpoint descriptor."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3


#: TransferType by bmAttributes & 3 (an index, not a call of the enum: to_json asks per endpoint).
_TRANSFER_TYPES = tuple(TransferType)
#: Each one's name in ``--json`` output.
_TRANSFER_NAMES = tuple(t.name.lower() for t in _TRANSFER_TYPES)


#: Link speeds the kernel reports in ``speed`` (Mbit/s).
LOW_SPEED = 1.5
FULL_SPEED = 12.0
HIGH_SPEED = 480.0
SUPER_SPEED = 5000.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint descriptor (plus its SuperSpeed companion, when present)."""

    address: int
    attributes: int
    max_packet_size: int
    interval: int
    #: bMaxBurst / bmAttributes / wBytesPerInterval of the SuperSpeed companion.
    ss_max_burst: int | None = None
    ss_attributes: int | None = None
    ss_bytes_per_interval: int | None = None

    @property
    def number(self) -> int:
        return self.address & 0x0F

    @property
    def direction(self) -> str:
        return "in" if self.address & 0x80 else "out"

    @property
    def transfer_type(self) -> TransferType:
        return _TRANSFER_TYPES[self.attributes & 0x03]

    def bytes_per_interval(self, speed_mbps: float | None) -> int:
        """Payload bytes the endpoint may move in one service interval."""
        if self.ss_bytes_per_interval is not None and (speed_mbps or 0) >= SUPER_SPEED:
            return self.ss_bytes_per_interval
        size = self.max_packet_size & 0x07FF
        if speed_mbps is not None and speed_mbps >= SUPER_SPEED:
            burst = (self.ss_max_burst or 0) + 1
            mult = ((self.ss_attributes or 0) & 0x03) + 1
            if self.transfer_type is not TransferType.ISOCHRONOUS:
                mult = 1
            return size * burst * mult
        if speed_mbps is not None and speed_mbps >= HIGH_SPEED:
            return size * (((self.max_packet_size >> 11) & 0x03) + 1)
        return size

    def interval_seconds(self, speed_mbps: float | None) -> float:
        """Service interval in seconds, as the USB 2.0/3.x specs define it."""
        binterval = max(self.interval, 1)
        periodic = self.transfer_type in (TransferType.ISOCHRONOUS, TransferType.INTERRUPT)
        if speed_mbps is not None and speed_mbps >= HIGH_SPEED and periodic:
            # 2^(bInterval-1) microframes of 125 us (capped at 16 per the spec).
            return float(2 ** (min(binterval, 16) - 1)) * 125e-6
        if self.transfer_type is TransferType.ISOCHRONOUS:
            return float(2 ** (min(binterval, 16) - 1)) * 1e-3
        return binterval * 1e-3

    def bandwidth_bps(self, speed_mbps: float | None) -> float:
        """Bits per second reserved by a periodic endpoint (0 for bulk/control)."""
        if self.transfer_type not in (TransferType.ISOCHRONOUS, TransferType.INTERRUPT):
            return 0.0
        return self.bytes_per_interval(speed_mbps) * 8 / self.interval_seconds(speed_mbps)

    def to_json(self, speed_mbps: float | None) -> dict[str, Any]:
        address, kind = self.address, self.attributes & 0x03
        return {
            "address": f"0x{address:02x}",
            "direction": "in" if address & 0x80 else "out",
            "type": _TRANSFER_NAMES[kind],
            "max_packet_size": self.max_packet_size & 0x07FF,
            "interval": self.interval,
            # control and bulk endpoints reserve nothing (bandwidth_bps's 0.0)
            "bandwidth_bps": round(self.bandwidth_bps(speed_mbps)) if kind & 1 else 0,
        }


@dataclass(frozen=True, slots=True)
class AltSetting:
    """One interface descriptor: an alternate setting of an interface."""

    alternate: int
    cls: int
    subclass: int
    protocol: int
    endpoints: tuple[Endpoint, ...] = ()

    def iso_bandwidth_bps(self, speed_mbps: float | None) -> float:
        return sum(
            ep.bandwidth_bps(speed_mbps)
            for ep in self.endpoints
            if ep.transfer_type is TransferType.ISOCHRONOUS
        )


@dataclass(frozen=True, slots=True)
class Interface:
    """An interface of the active configuration with all its alternate settings."""

    number: int
    cls: int
    subclass: int
    protocol: int
    driver: str | None = None
    alt_settings: tuple[AltSetting, ...] = ()

    @property
    def type_triple(self) -> tuple[int, int, int]:
        return (self.cls, self.subclass, self.protocol)

    def iso_bandwidth_bps(self, speed_mbps: float | None) -> float:
        """Worst case over alternate settings: what the host must be able to reserve."""
        return max((alt.iso_bandwidth_bps(speed_mbps) for alt in self.alt_settings), default=0.0)

    def to_json(self, speed_mbps: float | None) -> dict[str, Any]:
        return {
            "number": self.number,
            "class": self.cls,
            "subclass": self.subclass,
            "protocol": self.protocol,
            "driver": self.driver,
            "alt_settings": [
                {
                    "alternate": alt.alternate,
                    "endpoints": [ep.to_json(speed_mbps) for ep in alt.endpoints],
                }
                for alt in self.alt_settings
            ],
        }


def _qemu_id(identity: str) -> str:
    digest = sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{ID_PREFIX}{digest}"


@dataclass(frozen=True, slots=True)
class UsbDevice:
    """One USB device as the host kernel sees it.

    Every attribute the kernel may fail to give (or give garbled) is optional;
    the reader records why in ``warnings`` instead of failing.
    """

    port: str  # sysfs name: "2-2.4.2", or "usb2" for a root hub
    busnum: int | None = None
    devnum: int | None = None
    vendor_id: int | None = None
    product_id: int | None = None
    bcd_device: int | None = None
    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None
    speed_mbps: float | None = None
    usb_version: str | None = None
    device_class: int | None = None
    device_subclass: int | None = None
    device_protocol: int | None = None
    num_ports: int | None = None
    removable: str | None = None
    authorized: bool | None = None
    power_control: str | None = None
    autosuspend_delay_ms: int | None = None
    driver: str | None = None
    controller: str | None = None  # PCI address of the host controller
    connect_type: str | None = None  # "hotplug", "hardwired", "not used", "unknown"
    configuration: int | None = None  # bConfigurationValue
    interfaces: tuple[Interface, ...] = ()
    #: Names from usb.ids, used when the device gives no string.
    vendor_name: str | None = None
    product_name: str | None = None
    #: usbguard's device ``hash``: base64 SHA-256 over the product string, the IDs,
    #: the serial and every descriptor (a root hub's bcdDevice zeroed).
    descriptors_sha256: str | None = None
    #: usbguard's ``parent-hash``: the hub's hash, or for a root hub the hash of
    #: its controller's sysfs path (``/devices/pci0000:00/0000:00:14.0``).
    parent_hash: str | None = None
    #: Every interface descriptor's class triple in ``descriptors`` order, all
    #: configurations: usbguard's ``with-interface`` list (None: not read).
    descriptor_interfaces: tuple[tuple[int, int, int], ...] | None = None
    sysfs_path: str | None = None  # resolved path under the sysfs root
    #: False when another present device has the same vid:pid and serial
    #: (cheap devices often share one): then the port tells them apart.
    serial_unique: bool = True
    #: the device host it is plugged into (``[host.NAME]``, reached over
    #: usbredir); None: this host
    host: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_root_hub(self) -> bool:
        return self.port.startswith("usb")

    @property
    def is_hub(self) -> bool:
        return self.device_class == CLASS_HUB or any(i.cls == CLASS_HUB for i in self.interfaces)

    @property
    def parent_port(self) -> str | None:
        """Port path of the hub this device hangs from ("usbN" for the root hub)."""
        if self.is_root_hub:
            return None
        bus, _, chain = self.port.partition("-")
        if "." in chain:
            return f"{bus}-{chain.rsplit('.', 1)[0]}"
        return f"usb{bus}"

    @property
    def depth(self) -> int:
        if self.is_root_hub:
            return 0
        return self.port.partition("-")[2].count(".") + 1

    @property
    def vidpid(self) -> str | None:
        if self.vendor_id is None or self.product_id is None:
            return None
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    @property
    def display_manufacturer(self) -> str | None:
        return self.manufacturer or self.vendor_name

    @property
    def display_product(self) -> str | None:
        return self.product or self.product_name

    @property
    def display_name(self) -> str:
        """Maker and product for people: "Focusrite Scarlett 4i4 USB", "QEMU USB Audio"
        (not "QEMU QEMU USB Audio": many products already begin with the maker)."""
        maker, product = self.display_manufacturer, self.display_product
        if maker and product and product.casefold().startswith(maker.casefold()):
            return product
        return " ".join(p for p in (maker, product) if p)

    @property
    def identity(self) -> str:
        """What survives a replug: vid:pid + serial, else vid:pid + port path.

        A serial shared by two present devices with the same vid:pid is no
        identity: both fall back to their port paths.  A remote device's
        identity ends in ``@HOST``: the same stick on two device hosts is two
        devices.
        """
        vidpid = self.vidpid or "????:????"
        where = "" if self.host is None else f"@{self.host}"
        if self.serial and self.serial_unique:
            return f"{vidpid}/serial={self.serial}{where}"
        return f"{vidpid}/port={self.port}{where}"

    @property
    def qemu_id(self) -> str:
        """A valid QEMU device id derived from the stable identity."""
        return _qemu_id(self.identity)

    @property
    def interface_triples(self) -> tuple[tuple[int, int, int], ...]:
        """Every interface descriptor's class triple, alternate settings included.

        This is the list usbguard's ``with-interface`` works on: the one the
        descriptors give (every configuration, in their order) when it was read.
        """
        if self.descriptor_interfaces is not None:
            return self.descriptor_interfaces
        triples: list[tuple[int, int, int]] = []
        for iface in self.interfaces:
            if iface.alt_settings:
                triples.extend((a.cls, a.subclass, a.protocol) for a in iface.alt_settings)
            else:
                triples.append(iface.type_triple)
        return tuple(triples)

    def iso_bandwidth_bps(self) -> float:
        return sum(i.iso_bandwidth_bps(self.speed_mbps) for i in self.interfaces)

    def has_interface_class(self, cls: int) -> bool:
        return self.device_class == cls or any(i.cls == cls for i in self.interfaces)

    def to_json(self) -> dict[str, Any]:
        speed = self.speed_mbps
        speed_out: float | int | None = speed
        if speed is not None and speed.is_integer():
            speed_out = int(speed)
        vendor_id, product_id, bcd = self.vendor_id, self.product_id, self.bcd_device
        interfaces = self.interfaces
        # One pass over the interfaces for is_hub and whether any endpoint is
        # isochronous (`list --json` asks this of every device; most have none).
        is_hub = self.device_class == CLASS_HUB
        iso = False
        for iface in interfaces:
            if iface.cls == CLASS_HUB:
                is_hub = True
            for alt in iface.alt_settings:
                for ep in alt.endpoints:
                    if ep.attributes & 0x03 == TransferType.ISOCHRONOUS:
                        iso = True
        identity = self.identity
        return {
            "port": self.port,
            "busnum": self.busnum,
            "devnum": self.devnum,
            "vendor_id": None if vendor_id is None else f"{vendor_id:04x}",
            "product_id": None if product_id is None else f"{product_id:04x}",
            "bcd_device": None if bcd is None else f"{bcd:04x}",
            "manufacturer": self.manufacturer or self.vendor_name,
            "product": self.product or self.product_name,
            "serial": self.serial,
            "speed_mbps": speed_out,
            "usb_version": self.usb_version,
            "device_class": self.device_class,
            "device_subclass": self.device_subclass,
            "device_protocol": self.device_protocol,
            "is_hub": is_hub,
            "num_ports": self.num_ports,
            "removable": self.removable,
            "authorized": self.authorized,
            "connect_type": self.connect_type,
            "power_control": self.power_control,
            "autosuspend_delay_ms": self.autosuspend_delay_ms,
            "driver": self.driver,
            "controller": self.controller,
            "iso_bandwidth_bps": round(self.iso_bandwidth_bps()) if iso else 0,
            "interfaces": [i.to_json(speed) for i in interfaces],
            "identity": identity,
            "qemu_id": _qemu_id(identity),
            "host": self.host,
            "vm": None,
            "warnings": list(self.warnings),
        }
