"""QEMU command-line arguments (or a ``-readconfig`` file) for USB pass-through.

What this writes, and why:

* One ``qemu-xhci`` controller of vmplug's own (``id=vmplug-xhci``), so the
  port numbers below never collide with a controller the VM already has.
  QEMU's xHCI model exposes ``max(p2, p3)`` USB ports to ``port=``; USB port
  *n* carries a USB 2 link when ``n <= p2`` and a USB 3 link when
  ``n <= p3`` (``usb_xhci_init`` in ``hw/usb/hcd-xhci.c``: every ``uports[i]``
  gets a USB 2 xHCI port for ``i < numports_2`` and a USB 3 one for
  ``i < numports_3``; a SuperSpeed device is routed to the USB 3 one).  So
  USB 3 devices take ports ``1..n3`` and ``p3 >= n3``; everything else comes
  after them, and ``p2`` covers every port.  Both are at most 15.
* One ``usb-host`` per device with a fixed ``port=`` (Windows keys the
  drivers and settings of a device without a serial number to the port it
  sits on, so a stable guest port keeps it from "finding new hardware") and
  the stable ``id`` vmplug uses to recognise its own devices.
* Matching by ``vendorid``/``productid`` (or ``hostbus``/``hostport`` with
  ``by_port``): QEMU re-grabs those after a replug (``usb_host_auto_check``).
  Never ``hostaddr``: the device number changes on every replug.
* Audio devices with isochronous endpoints get more and larger iso buffers
  (QEMU's default is ``isobufs=4,isobsize=32``, see ``host-libusb.c``).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vmplug.generate.common import (
    CannotExpress,
    check_passable,
    comment_text,
    device_label,
    has_iso_audio,
    host_bus_port,
    is_high_speed_or_faster,
    is_usb3,
    share_text,
    shared_ids,
)
from vmplug.model import UsbDevice

CONTROLLER_ID = "vmplug-xhci"
#: XHCI_MAXPORTS_2 / XHCI_MAXPORTS_3 in hw/usb/hcd-xhci.h.
MAX_PORTS = 15
#: QEMU's defaults when nothing is given (p2=4, p3=4).
DEFAULT_PORTS = 4
#: QEMU's usb-host defaults (host-libusb.c): 4 URBs of 32 packets.
QEMU_ISOBUFS, QEMU_ISOBSIZE = 4, 32
#: vmplug's values for audio: URBs of 8 ms at both speeds (a URB's data reaches
#: the guest only when the whole URB completes, so shorter URBs mean less
#: latency), and more of them queued, so a host scheduling delay finds room:
#: high speed 8 x 64 microframes = 64 ms, full speed 16 x 8 frames = 128 ms
#: (QEMU's 4 x 32 makes 32 ms URBs at full speed).
AUDIO_HS = (8, 64)
AUDIO_FS = (16, 8)
#: A readconfig line is read with fgets() into 1024 bytes; values max 1023.
_READCONFIG_LINE = 1022


@dataclass(frozen=True)
class UsbHost:
    """One ``-device usb-host`` with its properties in QEMU's order of meaning."""

    id: str
    port: int
    match: tuple[tuple[str, str], ...]
    isobufs: int | None = None
    isobsize: int | None = None
    label: str = ""
    usb3: bool = False
    notes: tuple[str, ...] = ()

    def properties(self, bus: str) -> list[tuple[str, str]]:
        props = [("driver", "usb-host"), ("id", self.id), ("bus", bus), ("port", str(self.port))]
        props.extend(self.match)
        if self.isobufs is not None:
            props.append(("isobufs", str(self.isobufs)))
        if self.isobsize is not None:
            props.append(("isobsize", str(self.isobsize)))
        return props


@dataclass(frozen=True)
class QemuPlan:
    """Everything the ``qemu`` generator decided, rendered by the functions below."""

    controller_id: str
    p2: int
    p3: int
    devices: tuple[UsbHost, ...]
    by_port: bool
    qmp: str | None = None
    notes: tuple[str, ...] = field(default=())
    #: False: the controller is someone else's (dockurr's own ``-device $USB``);
    #: only the devices are written, on its bus
    own_controller: bool = True

    @property
    def bus(self) -> str:
        return f"{self.controller_id}.0"

    def controller_properties(self) -> list[tuple[str, str]]:
        return [
            ("driver", "qemu-xhci"),
            ("id", self.controller_id),
            ("p2", str(self.p2)),
            ("p3", str(self.p3)),
        ]

    def args(self) -> list[str]:
        """The QEMU arguments as a list (one element per argv word)."""
        out = ["-device", _device_opt(self.controller_properties())] if self.own_controller else []
        for dev in self.devices:
            out += ["-device", _device_opt(dev.properties(self.bus))]
        if self.qmp is not None:
            out += ["-qmp", qmp_chardev(self.qmp)]
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["bus"] = self.bus
        data["args"] = self.args()
        for dev, raw in zip(self.devices, data["devices"], strict=True):
            raw["match"] = dict(dev.match)
            raw["properties"] = dict(dev.properties(self.bus))
        return data


def _opt_value(value: str) -> str:
    """A QemuOpts value: a comma is written as two."""
    return value.replace(",", ",,")


def _device_opt(props: Sequence[tuple[str, str]]) -> str:
    driver = props[0][1]
    return ",".join([driver, *(f"{k}={_opt_value(v)}" for k, v in props[1:])])


def qmp_chardev(path: str) -> str:
    """``-qmp`` value for a unix socket vmplug can connect to (no client needed at start)."""
    if not path:
        raise CannotExpress("the QMP socket path is empty")
    if "\0" in path or "\n" in path:
        raise CannotExpress("a QMP socket path cannot contain NUL or newline characters")
    return f"unix:{_opt_value(path)},server=on,wait=off"


def plan_qemu(
    devices: Sequence[UsbDevice],
    *,
    by_port: bool = False,
    controller_id: str = CONTROLLER_ID,
    qmp: str | None = None,
    isobufs: int | None = None,
    isobsize: int | None = None,
) -> QemuPlan:
    """Decide controller size, ports, matching and buffers for ``devices``."""
    check_passable(devices)
    if not by_port:
        dup = shared_ids(devices)
        if dup:
            raise CannotExpress(
                f"{share_text(devices, dup)}: usb-host matches by "
                "vendor/product only (it cannot match a serial), so QEMU could not tell them "
                "apart. Use --by-port to match each by its host port instead."
            )
    if by_port:
        ports = [d.port for d in devices]
        if len(set(ports)) != len(ports):
            raise CannotExpress("the same port path was named twice")
    usb3 = [d for d in devices if is_usb3(d)]
    usb2 = [d for d in devices if not is_usb3(d)]
    if len(devices) > MAX_PORTS:
        raise CannotExpress(
            f"{len(devices)} devices: one qemu-xhci controller has at most {MAX_PORTS} ports"
        )
    p3 = max(DEFAULT_PORTS, len(usb3))
    p2 = max(DEFAULT_PORTS, len(devices))
    hosts: list[UsbHost] = []
    for number, dev in enumerate([*usb3, *usb2], start=1):
        hosts.append(_usb_host(dev, number, by_port, isobufs, isobsize))
    # Keep the user's order in the output; the port numbers carry the layout.
    order = {d.port: i for i, d in enumerate(devices)}
    by_user_order = sorted(zip([*usb3, *usb2], hosts, strict=True), key=lambda t: order[t[0].port])
    notes = []
    if by_port:
        notes.append(
            "matched by host bus and port: the device must stay in that socket; the bus "
            "number can change if the host's controllers enumerate in another order"
        )
    return QemuPlan(
        controller_id=controller_id,
        p2=p2,
        p3=p3,
        devices=tuple(h for _, h in by_user_order),
        by_port=by_port,
        qmp=qmp,
        notes=tuple(notes),
    )


def _usb_host(
    dev: UsbDevice, port: int, by_port: bool, isobufs: int | None, isobsize: int | None
) -> UsbHost:
    assert dev.vendor_id is not None and dev.product_id is not None
    if by_port:
        bus, chain = host_bus_port(dev)
        match: tuple[tuple[str, str], ...] = (("hostbus", str(bus)), ("hostport", chain))
    else:
        match = (("vendorid", f"0x{dev.vendor_id:04x}"), ("productid", f"0x{dev.product_id:04x}"))
    notes: list[str] = []
    bufs, bsize = isobufs, isobsize
    if has_iso_audio(dev) and (bufs is None or bsize is None):
        hs = is_high_speed_or_faster(dev)
        auto_bufs, auto_bsize = AUDIO_HS if hs else AUDIO_FS
        bufs = auto_bufs if bufs is None else bufs
        bsize = auto_bsize if bsize is None else bsize
        frame = "microframes of 125 us" if hs else "frames of 1 ms"
        in_flight_default = QEMU_ISOBUFS * QEMU_ISOBSIZE * (0.125 if hs else 1.0)
        in_flight = bufs * bsize * (0.125 if hs else 1.0)
        urb_ms = bsize * (0.125 if hs else 1.0)
        urb_default_ms = QEMU_ISOBSIZE * (0.125 if hs else 1.0)
        notes.append(
            f"audio with isochronous endpoints: isobufs={bufs},isobsize={bsize} queues up to "
            f"{in_flight:g} ms of audio in {bufs} URBs of {bsize} {frame} ({urb_ms:g} ms each; "
            f"QEMU's {QEMU_ISOBUFS}x{QEMU_ISOBSIZE}: {in_flight_default:g} ms in URBs of "
            f"{urb_default_ms:g} ms), so a host scheduling delay does not drop packets "
            "(clicks and crackles in the guest) and each URB adds little latency"
        )
    for name, value in (("isobufs", bufs), ("isobsize", bsize)):
        if value is not None and not 1 <= value <= 1024:
            raise CannotExpress(f"{name}={value}: expected 1..1024")
    return UsbHost(
        id=dev.qemu_id,
        port=port,
        match=match,
        isobufs=bufs,
        isobsize=bsize,
        label=device_label(dev),
        usb3=is_usb3(dev),
        notes=tuple(comment_text(n, 400) for n in notes),
    )


def _wrap_comment(text: str, width: int = 78) -> list[str]:
    words = text.split(" ")
    lines: list[str] = []
    cur = ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines


def _device_comments(plan: QemuPlan, dev: UsbHost) -> list[str]:
    speed = "USB 3 port" if dev.usb3 else "USB 2 port"
    lines = [f"# {dev.label}: guest {speed} {dev.port} of {plan.controller_id}"]
    for note in dev.notes:
        lines.extend(f"#   {line}" for line in _wrap_comment(note, 74))
    return lines


def render_args(plan: QemuPlan) -> str:
    """Comment lines and one shell-quoted ``-device`` option per line."""
    out = [
        "# vmplug: USB pass-through for qemu-system-*; add these to the QEMU command line.",
        "# Matched by "
        + ("host bus and port" if plan.by_port else "vendor/product id")
        + ": QEMU grabs each device again after a replug.",
    ]
    out.extend(f"# Note: {line}" for n in plan.notes for line in _wrap_comment(n, 70))
    out.append(
        f"# {plan.controller_id}: USB 3 devices on ports 1..{plan.p3}, USB 2 on ports 1..{plan.p2}"
    )
    out.append(f"-device {shlex.quote(_device_opt(plan.controller_properties()))}")
    for dev in plan.devices:
        out.extend(_device_comments(plan, dev))
        out.append(f"-device {shlex.quote(_device_opt(dev.properties(plan.bus)))}")
    if plan.qmp is not None:
        out.append("# QMP socket of vmplug's own (a QMP socket serves one client at a time)")
        out.append(f"-qmp {shlex.quote(qmp_chardev(plan.qmp))}")
    return "\n".join(out) + "\n"


def _readconfig_value(key: str, value: str) -> str:
    if '"' in value or "\n" in value or "\0" in value:
        raise CannotExpress(
            f"{key}={value!r}: a QEMU -readconfig value cannot contain a double quote or newline "
            "(QEMU reads it with sscanf and has no escape); use the argument form"
        )
    line = f'  {key} = "{value}"'
    if len(line.encode()) > _READCONFIG_LINE:
        raise CannotExpress(f"{key}: value too long for a -readconfig line (1023 bytes)")
    return line


def render_readconfig(plan: QemuPlan) -> str:
    """A ``-readconfig`` file: ``[device "id"]`` sections with ``key = "value"`` lines.

    QEMU's parser (``qemu_config_parse`` in ``util/qemu-config.c``) takes a
    comment only when ``#`` is the first byte of the line, an empty line only
    when it is exactly empty, and values between double quotes with no
    escapes; QemuOpts commas need no doubling here.
    """
    out = [
        "# vmplug: USB pass-through; load with: qemu-system-x86_64 ... -readconfig FILE",
        f"# {plan.controller_id}: USB 3 devices on ports 1..{plan.p3}, USB 2 on ports 1..{plan.p2}",
        f'[device "{plan.controller_id}"]',
    ]
    out.extend(_readconfig_value(k, v) for k, v in plan.controller_properties() if k != "id")
    for dev in plan.devices:
        out.append("")
        out.extend(_device_comments(plan, dev))
        out.append(f'[device "{dev.id}"]')
        out.extend(_readconfig_value(k, v) for k, v in dev.properties(plan.bus) if k != "id")
    if plan.qmp is not None:
        out += [
            "",
            "# QMP socket of vmplug's own (a QMP socket serves one client at a time)",
            '[chardev "vmplug-qmp"]',
            _readconfig_value("backend", "socket"),
            _readconfig_value("path", plan.qmp),
            _readconfig_value("server", "on"),
            _readconfig_value("wait", "off"),
            "",
            '[mon "vmplug-qmp"]',
            _readconfig_value("chardev", "vmplug-qmp"),
            _readconfig_value("mode", "control"),
        ]
    return "\n".join(out) + "\n"
