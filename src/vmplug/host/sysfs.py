"""Read the host's USB tree from a sysfs root.

The kernel lays USB devices out as ``bus/usb/devices/<name>`` symlinks into
``devices/pci.../usbN/N-P.P``.  Each device directory has attribute files
(``busnum``, ``speed``, ``serial``…), a binary ``descriptors`` file (the device
descriptor followed by every configuration's descriptors), a ``driver`` link,
a ``port`` link to the hub port it hangs from, and one sub-directory per
interface of the active configuration (``N-P.P:C.I``).

The reader is tolerant: a missing or garbled attribute leaves that field
``None`` and adds a warning to the device; it never raises for one device's
data.  It is also all or nothing: a device read while the kernel removes it
(or has not finished setting it up) is no device (None), never one with
half its attributes, because an identity or a rule decision taken from such
a read would be wrong (see :func:`_in_flux`).  It is also frugal, because
it runs on every rescan: the device descriptor supplies the ids and class
codes in one read, and ``uevent`` supplies bus and device numbers and the
driver in another.
"""

from __future__ import annotations

import os
import re
from binascii import b2a_base64
from dataclasses import dataclass, field

from vmplug.errors import UsageError
from vmplug.model import AltSetting, Endpoint, Interface, UsbDevice, sha256

TYPE_CHECKING = False  # `vmplug list --json` imports this module: no typing, no pathlib
if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_ROOT = "/sys"

_PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_DEVICE_NAME = re.compile(r"^(usb\d+|\d+-\d+(\.\d+)*)$")

# Descriptor types (USB 2.0 table 9-5, USB 3.2 table 9-6).
_DT_DEVICE = 0x01
_DT_CONFIG = 0x02
_DT_INTERFACE = 0x04
_DT_ENDPOINT = 0x05
_DT_SS_EP_COMPANION = 0x30


class SysfsError(UsageError):
    """The sysfs root itself is unusable (not one device's attribute)."""


def _read_bytes(path: str, dir_fd: int | None = None) -> bytes | None:
    """All of a file (relative to ``dir_fd`` when given), or None when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _in_flux(path: str, name: str) -> bool:
    """Whether a device without a readable ``port/connect_type`` is being torn
    down (or not yet fully set up) rather than from a tree that has no port
    devices (an old kernel, a umockdev recording, a partial copy).

    The kernel's order (drivers/usb/core/hub.c ``usb_disconnect``, then
    drivers/base/core.c ``device_del``): with the device lock held, the
    interfaces go and the configuration with them (``bConfigurationValue``
    reads empty), then the ``port`` link; then the lock is let go and
    device_del removes ``descriptors`` and the USB ``power/`` files, the rest
    of ``power/``, ``dev``, ``uevent``, every other attribute and the strings,
    unbinds the driver, sends ``remove`` and removes the directory.  Setting
    up, the ``port`` link comes last, after the probe (usb_new_device).
    ``bConfigurationValue`` and the strings wait for the device lock, so a
    read that started before the teardown sees the configuration as it was,
    and one that waited sees the port link gone.  Hence: a hub port that exists
    without any ``port`` link to it (a link whose target is missing is a copied
    or recorded tree, not the kernel) means the link is going or coming, and
    nothing read from the device before it (configuration, interfaces,
    ``power/``, ``descriptors``) can be trusted.  Everything removed after
    ``uevent`` is covered by :func:`read_device`'s last look at ``uevent``.
    """
    if name.startswith("usb") or os.path.lexists(path + "/port"):
        return False  # a root hub hangs from no hub port; a link there is no teardown
    parent = os.path.dirname(path)
    hub = os.path.basename(parent)
    bus, _, chain = name.partition("-")
    number = chain.rsplit(".", 1)[-1]
    hub_intf = f"{bus}-0:1.0" if hub.startswith("usb") else f"{hub}:1.0"
    return os.path.isdir(f"{parent}/{hub_intf}/{hub}-port{number}")


@dataclass(slots=True)
class _Parsed:
    """What the binary descriptors file gives."""

    vendor_id: int | None = None
    product_id: int | None = None
    bcd_device: int | None = None
    bcd_usb: int | None = None
    device_class: int | None = None
    device_subclass: int | None = None
    device_protocol: int | None = None
    #: configuration value -> interface number -> alternate settings
    configs: dict[int, dict[int, list[AltSetting]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_descriptors(data: bytes) -> _Parsed:
    """Parse a sysfs ``descriptors`` blob; truncation and junk become warnings."""
    out = _Parsed()
    if len(data) < 18 or data[1] != _DT_DEVICE:
        out.warnings.append("descriptors: no valid device descriptor")
        return out
    out.vendor_id = int.from_bytes(data[8:10], "little")
    out.product_id = int.from_bytes(data[10:12], "little")
    out.bcd_device = int.from_bytes(data[12:14], "little")
    out.bcd_usb = int.from_bytes(data[2:4], "little")
    out.device_class, out.device_subclass, out.device_protocol = data[4], data[5], data[6]

    pos = data[0]
    config: dict[int, list[AltSetting]] | None = None
    alt: tuple[int, int, int, int, int] | None = None  # number, alternate, class triple
    endpoints: list[Endpoint] = []

    def close_alt() -> None:
        nonlocal alt, endpoints
        if alt is not None and config is not None:
            number, alternate, cls, sub, proto = alt
            config.setdefault(number, []).append(
                AltSetting(alternate, cls, sub, proto, tuple(endpoints))
            )
        alt, endpoints = None, []

    while pos + 2 <= len(data):
        length, dtype = data[pos], data[pos + 1]
        if length < 2 or pos + length > len(data):
            out.warnings.append(f"descriptors: truncated descriptor at byte {pos}")
            break
        body = data[pos : pos + length]
        if dtype == _DT_CONFIG and length >= 9:
            close_alt()
            config = out.configs.setdefault(body[5], {})
        elif dtype == _DT_INTERFACE and length >= 9:
            close_alt()
            alt = (body[2], body[3], body[5], body[6], body[7])
        elif dtype == _DT_ENDPOINT and length >= 7 and alt is not None:
            endpoints.append(
                Endpoint(
                    address=body[2],
                    attributes=body[3],
                    max_packet_size=int.from_bytes(body[4:6], "little"),
                    interval=body[6],
                )
            )
        elif dtype == _DT_SS_EP_COMPANION and length >= 6 and endpoints:
            last = endpoints[-1]
            endpoints[-1] = Endpoint(
                last.address,
                last.attributes,
                last.max_packet_size,
                last.interval,
                ss_max_burst=body[2],
                ss_attributes=body[3],
                ss_bytes_per_interval=int.from_bytes(body[4:6], "little"),
            )
        pos += length
    close_alt()
    return out


# --------------------------------------------------------------------------- usbguard hashes

#: What usbguard's ``SysFSDevice::readAttribute`` trims off the end of a string.
_USBGUARD_TRIM = b"\0\n\r\t\b"
#: Sizes usbguard's ``USBDescriptorParser`` insists on; any other size it refuses.
_USBGUARD_SIZES = {_DT_DEVICE: (18,), _DT_CONFIG: (9,), _DT_INTERFACE: (9,), _DT_ENDPOINT: (7, 9)}
#: Linux root hubs (1.1, 2.0, 3.0): usbguard hashes their device descriptor with
#: bcdDevice zeroed, so the hash survives a kernel update.
_LINUX_ROOT_HUBS = frozenset({(0x1D6B, 0x0001), (0x1D6B, 0x0002), (0x1D6B, 0x0003)})


def _read_string(path: str) -> bytes | None:
    """A string attribute's bytes as usbguard reads them (trailing NUL/CR/LF/TAB/BS cut)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).rstrip(_USBGUARD_TRIM)
    except OSError:
        return None
    finally:
        os.close(fd)


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


def _b64(data: bytes) -> str:
    """base64.b64encode(data).decode() (base64 and struct: not imported for `list`)."""
    return b2a_base64(data, newline=False).decode()


def _b64sha256(data: bytes) -> str:
    return _b64(sha256(data).digest())


#: What usbguard makes of a descriptors blob it takes: the bytes it hashes (a
#: Linux root hub's bcdDevice zeroed), idVendor and idProduct as it hashes them,
#: and the ``with-interface`` list.
_Guard = tuple[bytes, bytes, tuple[tuple[int, int, int], ...]]


def usbguard_hash(
    descriptors: bytes, name: bytes | None, serial: bytes | None
) -> tuple[str, tuple[tuple[int, int, int], ...]] | None:
    """usbguard's device hash and ``with-interface`` list, or None where usbguard refuses.

    As ``DevicePrivate::initializeHash`` and ``DeviceBase::parseUSBDescriptor``:
    SHA-256 over the product string, ``idVendor`` and ``idProduct`` as 4 hex
    digits, the serial, then each descriptor's ``bLength`` bytes (a Linux root
    hub's device descriptor with bcdDevice 0); base64.  usbguard skips a device
    whose descriptors its parser rejects (bad sizes, wrong nesting, trailing
    junk), so it has no hash here either.
    """
    guard = _usbguard_blob(descriptors)
    return None if guard is None else _usbguard_digest(guard, name, serial)


def _usbguard_digest(
    guard: _Guard, name: bytes | None, serial: bytes | None
) -> tuple[str, tuple[tuple[int, int, int], ...]]:
    """:func:`usbguard_hash` of a device whose descriptors usbguard takes."""
    hashed, ids, interfaces = guard
    digest = sha256()
    digest.update(name or b"")
    digest.update(ids)
    digest.update(serial or b"")
    digest.update(hashed)
    return _b64(digest.digest()), interfaces


def _usbguard_blob(descriptors: bytes) -> _Guard | None:
    """The part of :func:`usbguard_hash` the descriptors alone decide (None:
    usbguard refuses them)."""
    if len(descriptors) < 18 or descriptors[1] != _DT_DEVICE:
        return None
    vendor = int.from_bytes(descriptors[8:10], "little")
    product = int.from_bytes(descriptors[10:12], "little")
    interfaces: list[tuple[int, int, int]] = []
    seen: set[int] = set()  # the parser's "have a descriptor of this type"
    pos, end = 0, len(descriptors)
    while pos < end:
        if end - pos < 2:
            return None  # "partial read while reading header data"
        length, dtype = descriptors[pos], descriptors[pos + 1]
        if length < 2 or pos + length > end:
            return None
        if dtype in _USBGUARD_SIZES and length not in _USBGUARD_SIZES[dtype]:
            return None
        if dtype == _DT_DEVICE:
            if _DT_DEVICE in seen:
                return None  # two device descriptors
        elif dtype == _DT_CONFIG:
            if _DT_DEVICE not in seen:
                return None
            seen -= {_DT_INTERFACE, _DT_ENDPOINT}
        elif dtype == _DT_INTERFACE:
            if _DT_CONFIG not in seen:
                return None
            interfaces.append((descriptors[pos + 5], descriptors[pos + 6], descriptors[pos + 7]))
        elif dtype == _DT_ENDPOINT and _DT_INTERFACE not in seen:
            return None
        seen.add(dtype)
        pos += length
    # Every descriptor's bLength bytes, in order, are the whole blob (the device
    # descriptor first, 18 bytes): one update, not one per descriptor.
    if (vendor, product) in _LINUX_ROOT_HUBS:
        descriptors = descriptors[:12] + b"\0\0" + descriptors[14:]
    return descriptors, f"{vendor:04x}{product:04x}".encode(), tuple(interfaces)


class _Blob:
    """What a descriptors blob alone gives a device's read."""

    __slots__ = ("guard", "has_strings", "layouts", "parsed", "version")

    def __init__(self, raw: bytes | None) -> None:
        parsed = _Parsed() if raw is None else parse_descriptors(raw)
        self.parsed = parsed
        self.guard = None if raw is None else _usbguard_blob(raw)
        #: iManufacturer, iProduct, iSerialNumber: 0 means no string, and no file
        #: (without a device descriptor: look for each)
        self.has_strings = (
            (True, True, True)
            if raw is None or parsed.vendor_id is None
            else (raw[14] != 0, raw[15] != 0, raw[16] != 0)
        )
        #: the USB version as the kernel's ``version`` attribute prints bcdUSB
        self.version = None if parsed.bcd_usb is None else _bcd(parsed.bcd_usb)
        #: configuration value -> (interface number, its alternate settings in
        #: order), in interface number order
        self.layouts: dict[int, tuple[tuple[int, tuple[AltSetting, ...]], ...]] = {
            value: tuple(
                (number, tuple(sorted(cfg[number], key=lambda a: a.alternate)))
                for number in sorted(cfg)
            )
            for value, cfg in parsed.configs.items()
        }


_NO_BLOB = _Blob(None)

#: The :class:`_Blob` of each distinct descriptors blob: every rescan reads the
#: same devices again, and identical devices (one model of hub, of stick) have
#: one blob.  Only blobs of up to 4 KiB, at most _BLOBS_MAX of them (then it
#: starts again): a few hundred KiB at worst.
_BLOBS: dict[bytes, _Blob] = {}
_BLOBS_MAX = 256


def _blob(raw: bytes | None) -> _Blob:
    """The :class:`_Blob` of ``raw`` (shared: not to be changed)."""
    if raw is None:
        return _NO_BLOB
    found = _BLOBS.get(raw)
    if found is None:
        found = _Blob(raw)
        if len(raw) <= 4096:
            if len(_BLOBS) >= _BLOBS_MAX:
                _BLOBS.clear()
            _BLOBS[raw] = found
    return found


def usbguard_parent_hash(
    path: str, root: str | None = None, known: dict[str, str | None] | None = None
) -> str | None:
    """usbguard's ``parent-hash`` of the device at ``path`` (under sysfs ``root``).

    A device's parent is its hub, whose hash it is (taken from ``known``, by
    path, or read).  A root hub's parent is its controller, which is no USB
    device: usbguard hashes the controller's sysfs path instead, as the kernel
    names it (``/devices/pci0000:00/0000:00:14.0``, whatever the sysfs root).
    """
    parent = os.path.dirname(path)
    if _DEVICE_NAME.match(os.path.basename(parent)):
        if known is not None and parent in known:
            return known[parent]
        raw = _read_bytes(parent + "/descriptors")
        found = raw and usbguard_hash(
            raw, _read_string(parent + "/product"), _read_string(parent + "/serial")
        )
        return found[0] if found else None
    if root is not None:
        base = os.path.normpath(os.fspath(root))
        if not parent.startswith(base.rstrip("/") + "/"):
            return None
        rel = parent[len(base.rstrip("/")) :]
    else:
        at = parent.rfind("/devices/")
        if at < 0:
            return None
        rel = parent[at:]
    return _b64sha256(rel.encode("utf-8", "surrogateescape"))


def _bcd(value: int) -> str:
    """bcdUSB as the kernel's ``version`` attribute prints it: 0x0210 -> "2.10"."""
    return f"{value >> 8:x}.{value & 0xFF:02x}"


def _uevent(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _int(value: str | None, base: int, what: str, warnings: list[str]) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip(), base)
    except ValueError:
        warnings.append(f"{what}: garbled value {value!r}")
        return None


def _speed(value: str | None, warnings: list[str]) -> float | None:
    if value is None:
        warnings.append("speed: missing")
        return None
    try:
        speed = float(value)
    except ValueError:
        warnings.append(f"speed: garbled value {value!r}")
        return None
    return speed if speed > 0 else None


def _controller(real: str) -> str | None:
    """The host controller: the last PCI address above usbN, else (a platform
    controller: SoCs, dummy_hcd) the device usbN hangs from, e.g. ``xhci-hcd.0``."""
    found = None
    previous = None
    for part in real.split("/"):
        if _PCI_ADDR.match(part):
            found = part
        elif part.startswith("usb") and part[3:].isdigit():
            return found or previous
        previous = part
    return found


def _driver_at(dirfd: int, link: str) -> str | None:
    """The driver a ``driver`` link (relative to ``dirfd``) names, or None."""
    try:
        return os.path.basename(os.readlink(link, dir_fd=dirfd))
    except OSError:
        return None


def _interfaces(
    dirfd: int, name: str, configuration: int | None, blob: _Blob, warnings: list[str]
) -> tuple[Interface, ...]:
    layouts = blob.layouts
    layout = layouts.get(configuration) if configuration is not None else None
    if layout is None and len(layouts) == 1 and configuration is None:
        layout = next(iter(layouts.values()))
    if layout is None:
        if layouts and configuration is not None:
            warnings.append(f"descriptors: no configuration {configuration}")
        return ()
    return tuple(
        Interface(
            number,
            alts[0].cls,
            alts[0].subclass,
            alts[0].protocol,
            _driver_at(dirfd, f"{name}:{configuration}.{number}/driver") if configuration else None,
            alts,
        )
        for number, alts in layout
    )


_O_FILE = os.O_RDONLY | os.O_CLOEXEC
_O_DIR = _O_FILE | os.O_DIRECTORY


def _at(dirfd: int, name: str, size: int = 65536) -> bytes | None:
    """The bytes of attribute ``name`` of the directory open as ``dirfd``, or None.

    Relative to the device's directory, so the kernel walks one name, not the
    whole path, and a directory the kernel removed (and perhaps made again for
    a new device) answers nothing: its old node has no attributes any more.
    """
    try:
        fd = os.open(name, _O_FILE, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None  # ENODEV: removed between open and read
    finally:
        os.close(fd)


def _at_all(dirfd: int, name: str) -> bytes | None:
    """All of a binary attribute (``descriptors`` can pass 64 KiB), or None."""
    data = _at(dirfd, name)
    if data is None or len(data) < 65536:
        return data
    return _read_bytes(name, dirfd)


def _at_text(dirfd: int, name: str) -> str | None:
    """An attribute as text without its trailing newline, or None (as :func:`_at`,
    inlined: a scan makes ten of these per device)."""
    try:
        fd = os.open(name, _O_FILE, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return None  # ENODEV: removed between open and read
    finally:
        os.close(fd)


def _at_string(dirfd: int, name: str) -> bytes | None:
    """A string attribute as usbguard reads it (as :func:`_read_string`; :func:`_at` inlined)."""
    try:
        fd = os.open(name, _O_FILE, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).rstrip(_USBGUARD_TRIM)
    except OSError:
        return None  # ENODEV: removed between open and read
    finally:
        os.close(fd)


#: The controller of each ``.../usbN`` directory already seen (a scan asks once per bus).
_CONTROLLERS: dict[str, str | None] = {}


def _controller_of(path: str) -> str | None:
    """:func:`_controller` of ``path``, worked out once per root hub's directory."""
    at = path.find("/usb")
    while at >= 0:
        end = path.find("/", at + 1)
        head = path[: end if end >= 0 else len(path)]
        if head[at + 4 :].isdigit():
            if head not in _CONTROLLERS:
                if len(_CONTROLLERS) > 256:
                    _CONTROLLERS.clear()
                _CONTROLLERS[head] = _controller(head)
            return _CONTROLLERS[head]
        at = path.find("/usb", at + 1)
    return _controller(path)


def read_device(
    path: str,
    name: str,
    *,
    root: str | None = None,
    known_hashes: dict[str, str | None] | None = None,
) -> UsbDevice | None:
    """Read one device directory (already resolved) into a :class:`UsbDevice`.

    All or nothing: None when the directory holds no device, or not one that
    could be read as one consistent set of attributes (being removed, or not
    yet fully set up; see :func:`_in_flux`).  Callers treat None as "not there".

    ``root`` (the sysfs root) and ``known_hashes`` (usbguard hashes of devices
    already read, by path) only serve the ``parent-hash``: without them it is
    worked out from the path and by reading the parent hub.

    Frugal, since it runs on every rescan: every file is opened relative to
    the device's directory; ``uevent`` gives the bus and device numbers and
    the driver, ``descriptors`` the ids, class codes, USB version and every
    interface and endpoint; a string the device descriptor says the device
    has no index for (the kernel then makes no file) is not looked for.
    """
    try:
        dirfd = os.open(path, _O_DIR)
    except OSError:
        return None  # no device here (any more)
    try:
        return _read_at(dirfd, path, name, root, known_hashes)
    finally:
        os.close(dirfd)


def _read_at(
    dirfd: int,
    path: str,
    name: str,
    root: str | None,
    known_hashes: dict[str, str | None] | None,
) -> UsbDevice | None:
    warnings: list[str] = []
    raw = _at_all(dirfd, "descriptors")
    if raw is None:
        warnings.append("descriptors: missing")
    blob = _blob(raw)
    parsed = blob.parsed
    warnings.extend(parsed.warnings)

    vendor_id, product_id, bcd = parsed.vendor_id, parsed.product_id, parsed.bcd_device
    dclass, dsub, dproto = parsed.device_class, parsed.device_subclass, parsed.device_protocol
    if vendor_id is None:  # fall back to the attribute files
        vendor_id = _int(_at_text(dirfd, "idVendor"), 16, "idVendor", warnings)
        product_id = _int(_at_text(dirfd, "idProduct"), 16, "idProduct", warnings)
        bcd = _int(_at_text(dirfd, "bcdDevice"), 16, "bcdDevice", warnings)
        dclass = _int(_at_text(dirfd, "bDeviceClass"), 16, "bDeviceClass", warnings)
        dsub = _int(_at_text(dirfd, "bDeviceSubClass"), 16, "bDeviceSubClass", warnings)
        dproto = _int(_at_text(dirfd, "bDeviceProtocol"), 16, "bDeviceProtocol", warnings)
    has_strings = blob.has_strings
    numbers_at = len(warnings)  # where the bus and device numbers' warnings go

    config_text = _at_text(dirfd, "bConfigurationValue")
    configuration = _int(config_text, 10, "bConfigurationValue", warnings) if config_text else None
    authorized_text = _at_text(dirfd, "authorized")
    authorized = None if authorized_text is None else authorized_text.strip() == "1"
    # Only hubs have ports; the USB version is bcdUSB in the device descriptor.
    num_ports = _int(_at_text(dirfd, "maxchild"), 10, "maxchild", warnings) if dclass == 9 else None
    version = _at_text(dirfd, "version") if blob.version is None else blob.version
    delay = _at_text(dirfd, "power/autosuspend_delay_ms")
    product_raw = _at_string(dirfd, "product") if has_strings[1] else None
    serial_raw = _at_string(dirfd, "serial") if has_strings[2] else None
    guard = _usbguard_digest(blob.guard, product_raw, serial_raw) if blob.guard else None
    if raw and guard is None:
        warnings.append("descriptors: usbguard would refuse them (no hash)")

    power_control = _at_text(dirfd, "power/control")
    # a root hub "usbN" names its interfaces "N-0:C.I" (N: its name's, as busnum's)
    intf_name = f"{name[3:]}-0" if name.startswith("usb") else name
    interfaces = _interfaces(dirfd, intf_name, configuration, blob, warnings)
    # Read after everything usb_disconnect/device_del remove before the port link
    # goes (interfaces, the configuration, power/, descriptors): see _in_flux.
    connect_type = _at_text(dirfd, "port/connect_type")
    if connect_type is None and _in_flux(path, name):
        return None
    manufacturer = _at_text(dirfd, "manufacturer") if has_strings[0] else None
    speed = _at_text(dirfd, "speed")
    removable = _at_text(dirfd, "removable")
    # uevent last: device_del removes it before every attribute and string, and
    # the directory open as ``dirfd`` never gets it back (a device plugged in
    # again is a new directory), so a uevent still there now means all of the
    # above came from one live device.  It gives the bus and device numbers and
    # the driver.
    data = _at(dirfd, "uevent")
    if data is None:
        return None  # no device here (any more)
    ev = _uevent(data.decode("utf-8", "replace"))
    numbers: list[str] = []
    busnum = _int(ev.get("BUSNUM") or _at_text(dirfd, "busnum"), 10, "busnum", numbers)
    devnum = _int(ev.get("DEVNUM") or _at_text(dirfd, "devnum"), 10, "devnum", numbers)
    warnings[numbers_at:numbers_at] = numbers
    return UsbDevice(
        port=name,
        busnum=busnum,
        devnum=devnum,
        vendor_id=vendor_id,
        product_id=product_id,
        bcd_device=bcd,
        manufacturer=manufacturer,
        product=_text(product_raw),
        serial=_text(serial_raw),
        speed_mbps=_speed(speed, warnings),
        usb_version=version.strip() if version else None,
        device_class=dclass,
        device_subclass=dsub,
        device_protocol=dproto,
        num_ports=num_ports if num_ports else None,
        removable=removable,
        authorized=authorized,
        power_control=power_control,
        autosuspend_delay_ms=_int(delay, 10, "autosuspend_delay_ms", warnings),
        driver=ev.get("DRIVER") or _driver_at(dirfd, "driver"),
        controller=_controller_of(path),
        connect_type=connect_type,
        configuration=configuration,
        interfaces=interfaces,
        descriptors_sha256=guard[0] if guard else None,
        parent_hash=usbguard_parent_hash(path, root, known_hashes),
        descriptor_interfaces=guard[1] if guard else None,
        sysfs_path=path,
        warnings=tuple(warnings),
    )


def _sort_key(name: str) -> tuple[int, tuple[int, ...]]:
    if name.startswith("usb"):
        return (int(name[3:]), ())
    bus, _, chain = name.partition("-")
    return (int(bus), tuple(int(p) for p in chain.split(".")))


def scan(root: Path | str = DEFAULT_ROOT) -> list[UsbDevice]:
    """Every USB device (root hubs included) under ``root``, in bus/port order, as
    the kernel gives it (:func:`vmplug.host.inventory.read_devices` names them).

    Raises :class:`SysfsError` only when ``root`` has no USB bus at all in a way
    that is not simply "no USB here": an empty list is a valid answer.
    """
    base = os.path.join(os.fspath(root), "bus/usb/devices")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        if not os.path.isdir(os.fspath(root)):
            raise SysfsError(f"sysfs root {os.fspath(root)} does not exist") from None
        return []  # a kernel without USB
    except OSError as exc:
        raise SysfsError(f"cannot list {base}: {exc.strerror}") from exc
    top = os.fspath(root)
    devices: list[UsbDevice] = []
    hashes: dict[str, str | None] = {}  # by path: a hub comes before what hangs from it
    dirs: dict[str, str] = {}  # port -> directory of the devices read so far
    for name in sorted((n for n in names if _DEVICE_NAME.match(n)), key=_sort_key):
        # A USB device's directory is its hub's sub-directory of its own name
        # (drivers/usb/core/usb.c usb_alloc_dev: its parent is the hub), so
        # only a root hub's link needs reading: its parent is the controller.
        hub = dirs.get(_hub_port(name))
        device = None
        if hub is not None:
            device = read_device(f"{hub}/{name}", name, root=top, known_hashes=hashes)
        if device is None:  # a root hub, or the layout of a tree copied some other way
            real = _resolve(base, name)
            # vanished between listdir and now (unplugged): read_device says None
            device = read_device(real, name, root=top, known_hashes=hashes)
        if device is None:
            continue  # being removed (or not yet set up): not there
        assert device.sysfs_path is not None
        dirs[name] = device.sysfs_path
        hashes[device.sysfs_path] = device.descriptors_sha256
        devices.append(device)
    return devices


def _hub_port(name: str) -> str:
    """The port path of the hub device ``name`` hangs from ("usbN" for the root
    hub), or "" for a root hub itself (it hangs from its controller)."""
    if name.startswith("usb"):
        return ""
    bus, _, chain = name.partition("-")
    head, dot, _last = chain.rpartition(".")
    return f"{bus}-{head}" if dot else f"usb{bus}"


def _resolve(base: str, name: str) -> str:
    """The directory ``base/name`` links to."""
    link = os.path.join(base, name)
    try:  # the kernel's links are relative and point straight at the device
        return os.path.normpath(os.path.join(base, os.readlink(link)))
    except OSError:
        return os.path.realpath(link)  # not a link (a copied tree): resolve fully
