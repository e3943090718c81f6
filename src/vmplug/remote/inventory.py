"""A VM host's second device source: the devices its device hosts export.

For each ``[host.NAME]`` one task follows the device host's ``GET /v1/export``
(mutual TLS with this VM host's certificate, :func:`vmplug.wire.tls.client_context`;
a long poll: ``If-None-Match`` + ``?wait=``, so a replug there is known here
within one round trip).  Each present device becomes a
:class:`~vmplug.model.UsbDevice` with ``host = NAME``: the reconciler matches
it with the same rules and attaches it as a ``usb-redir``
(:meth:`RemoteInventory.attach_spec`: a :class:`~vmplug.vms.base.UsbRedirSpec`
to its endpoint).  A device host that does not answer (down at start, cut
off) has no devices; that is journaled once (``remote-host-down``) and its
devices come back with it (``remote-host-up``).  A device another VM host
holds is not wanted here (first come wins, decided by the device host) and
the reason is journaled (``device-held``) and shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vmplug.aio import cancel_and_wait
from vmplug.config import RemoteHostConfig
from vmplug.errors import UsageError
from vmplug.history.store import EventKind
from vmplug.model import AltSetting, Endpoint, Interface, TransferType, UsbDevice
from vmplug.remote.certs import CA_CERT, HostFiles, check, qemu_client_dir
from vmplug.remote.export import tune_keepalive
from vmplug.vms.base import UsbRedirSpec
from vmplug.wire.tls import client_context, describe_tls_error

log = logging.getLogger("vmplug.remote.inventory")

#: seconds a device host may hold a poll (``?wait=``) before it answers 304
POLL_WAIT_S = 20.0
#: seconds between tries while a device host does not answer
RETRY_S = 2.0
#: seconds the poll's connection may go without an ACK from the device host
#: (keepalive probes every second while a poll waits) before it is given up:
#: a network cut shows as the device host down after this long, not after the
#: poll's own timeout (``poll_wait`` + 15 s); the device host's endpoints let
#: a silent VM host go after the same 10 s (``ExportEndpoint.link_timeout``)
POLL_SILENCE_S = 10.0
#: seconds another VM host keeps its claim here after its link ended (its
#: device replugged on the device host, a short cut): this VM host does not
#: race it for the device meanwhile (the device host still arbitrates)
CLAIM_GRACE_S = 15.0

#: (kind, device) for each device that came or went
Changes = list[tuple[EventKind, UsbDevice]]


def _hex(value: Any) -> int | None:
    return int(value, 16) if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def device_from_json(data: Mapping[str, Any], host: str) -> UsbDevice:
    """The device a device host describes (:meth:`UsbDevice.to_json`), on ``host``.

    Its identity is the device host's, ``@host`` appended: ``serial_unique``
    follows from it (a serial the device host found shared is no identity)."""
    interfaces: list[Interface] = []
    for iface in data.get("interfaces") or []:
        alts = []
        for alt in iface.get("alt_settings") or []:
            eps = tuple(
                Endpoint(
                    address=int(ep["address"], 16),
                    attributes=TransferType[str(ep["type"]).upper()].value,
                    max_packet_size=int(ep["max_packet_size"]),
                    interval=int(ep["interval"]),
                )
                for ep in alt.get("endpoints") or []
            )
            alts.append(
                AltSetting(
                    int(alt["alternate"]),
                    int(iface["class"]),
                    int(iface["subclass"]),
                    int(iface["protocol"]),
                    eps,
                )
            )
        interfaces.append(
            Interface(
                number=int(iface["number"]),
                cls=int(iface["class"]),
                subclass=int(iface["subclass"]),
                protocol=int(iface["protocol"]),
                driver=_str(iface.get("driver")),
                alt_settings=tuple(alts),
            )
        )
    speed = data.get("speed_mbps")
    return UsbDevice(
        port=str(data["port"]),
        busnum=_int(data.get("busnum")),
        devnum=_int(data.get("devnum")),
        vendor_id=_hex(data.get("vendor_id")),
        product_id=_hex(data.get("product_id")),
        bcd_device=_hex(data.get("bcd_device")),
        manufacturer=_str(data.get("manufacturer")),
        product=_str(data.get("product")),
        serial=_str(data.get("serial")),
        speed_mbps=float(speed) if isinstance(speed, (int, float)) else None,
        usb_version=_str(data.get("usb_version")),
        device_class=_int(data.get("device_class")),
        device_subclass=_int(data.get("device_subclass")),
        device_protocol=_int(data.get("device_protocol")),
        num_ports=_int(data.get("num_ports")),
        removable=_str(data.get("removable")),
        connect_type=_str(data.get("connect_type")),
        driver=_str(data.get("driver")),
        interfaces=tuple(interfaces),
        serial_unique="/serial=" in str(data.get("identity", "/serial=")),
        host=host,
    )


@dataclass(slots=True)
class RemoteDevice:
    """One device a device host exports, as this VM host last heard of it."""

    device: UsbDevice
    #: the TCP port of its export endpoint on the device host
    endpoint_port: int
    #: the VM host streaming it now (its certificate's name), or None
    holder: str | None
    streaming: bool
    #: the device host's latest refusals of this endpoint ("peer: reason")
    refusals: tuple[str, ...] = ()
    #: streams its endpoint began, and links it ended for a silent VM host (a cut)
    sessions: int = 0
    dead_links: int = 0


@dataclass(slots=True)
class _Stream:
    """What this VM host last knew of its own stream of one remote device.

    The guest loses the device whenever its stream ends without vmplug asking
    (the device host ended a link gone silent, usbredirect died) and QEMU's
    reconnect brings it back: vmplug sends nothing, so only the device host's
    counters tell.  ``sessions``/``dead_links``: the endpoint's counters when
    this VM host last saw it streaming here."""

    sessions: int
    dead_links: int
    #: a loss journaled, the stream not back yet
    lost: bool = False
    #: usb-redir attaches vmplug made since: the sessions they begin are no loss
    ours: int = 0


@dataclass(slots=True)
class HostLink:
    """One ``[host.NAME]`` and what its device host last said."""

    config: RemoteHostConfig
    #: "connecting" (never answered yet), "up", "down"
    state: str = "connecting"
    error: str | None = None
    since: float = field(default_factory=time.time)
    #: identity -> device (present on the device host)
    devices: dict[str, RemoteDevice] = field(default_factory=dict)
    etag: str | None = None
    polls: int = 0
    #: seconds the last answered request took (a 304 after a wait excluded)
    rtt_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "address": c.address,
            "api_port": c.api_port,
            "me": c.me,
            "tls": not c.insecure,
            "state": self.state,
            "error": self.error,
            "since": self.since,
            "devices": len(self.devices),
            "polls": self.polls,
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 2),
        }


class RemoteInventory:
    """The devices of every ``[host.NAME]`` (see the module doc).

    ``on_change`` gets what came and went (the reconciler journals it and
    plans again); ``journal(kind, detail, identity)`` records host-level events."""

    def __init__(
        self,
        hosts: Mapping[str, RemoteHostConfig],
        *,
        tls_root: Path,
        on_change: Callable[[Changes], None] = lambda _c: None,
        journal: Callable[[EventKind, dict[str, Any], str | None], None] = lambda *_a: None,
        poll_wait: float = POLL_WAIT_S,
        retry: float = RETRY_S,
    ) -> None:
        self.links = {name: HostLink(cfg) for name, cfg in sorted(hosts.items())}
        self.tls_root = tls_root
        self.on_change = on_change
        self.journal = journal
        self.poll_wait = poll_wait
        self.retry = retry
        self._tasks: list[asyncio.Task[None]] = []
        #: host -> (its client context, QEMU's tls-creds directory)
        self._tls: dict[str, tuple[ssl.SSLContext, Path] | None] = {}
        #: (identity, holder) pairs already journaled as held elsewhere
        self._held_told: set[tuple[str, str]] = set()
        #: identity -> (another VM host that holds it, when it let go: None while it holds)
        self._claims: dict[str, tuple[str, float | None]] = {}
        self.claim_grace = CLAIM_GRACE_S
        #: identity -> this VM host's own stream of it (see _Stream)
        self._streams: dict[str, _Stream] = {}
        for name, link in self.links.items():
            self._tls[name] = self._prepare_tls(link.config)

    # -- certificates -------------------------------------------------------------

    def _prepare_tls(self, cfg: RemoteHostConfig) -> tuple[ssl.SSLContext, Path] | None:
        if cfg.insecure:
            return None
        if cfg.certs is None:
            raise UsageError(f"[host.{cfg.name}]: certs is needed (or insecure = true)")
        d = Path(cfg.certs)
        files = HostFiles(d / CA_CERT, d / f"{cfg.me}-cert.pem", d / f"{cfg.me}-key.pem")
        info = check(files)
        if info.problems:
            raise UsageError(f"[host.{cfg.name}]: " + "; ".join(info.problems))
        for warning in info.warnings:
            log.warning("[host.%s]: %s", cfg.name, warning)
        qemu_dir = qemu_client_dir(files, self.tls_root / cfg.name)
        return client_context(files.ca, files.cert, files.key), qemu_dir

    # -- what the reconciler reads -------------------------------------------------

    def devices(self) -> list[UsbDevice]:
        """Every remote device present now, host by host."""
        return [rd.device for link in self.links.values() for rd in link.devices.values()]

    def find(self, qemu_id: str) -> tuple[HostLink, RemoteDevice] | None:
        for link in self.links.values():
            for rd in link.devices.values():
                if rd.device.qemu_id == qemu_id:
                    return link, rd
        return None

    def attach_spec(self, qemu_id: str) -> UsbRedirSpec | None:
        """How QEMU reaches remote device ``qemu_id``'s endpoint (None: not remote)."""
        hit = self.find(qemu_id)
        if hit is None:
            return None
        link, rd = hit
        cfg = link.config
        stream = self._streams.get(rd.device.identity)
        if stream is not None:
            stream.ours += 1  # the session this attach begins is vmplug's own
        tls = self._tls.get(cfg.name)
        return UsbRedirSpec(
            cfg.address,
            rd.endpoint_port,
            cfg.name,
            None if tls is None else str(tls[1]),
            insecure=cfg.insecure,
            reconnect=cfg.reconnect,
        )

    def held_elsewhere(self, dev: UsbDevice) -> str | None:
        """The other VM host holding remote ``dev`` (its certificate name), or None."""
        if dev.host is None:
            return None
        link = self.links.get(dev.host)
        rd = None if link is None else link.devices.get(dev.identity)
        if link is None or rd is None or link.config.insecure:
            return None  # without TLS the holder is an address, not a name to compare
        if rd.holder is None:
            claim = self._claims.get(dev.identity)
            let_go = None if claim is None else claim[1]
            if (
                claim is not None
                and let_go is not None
                and time.monotonic() - let_go < self.claim_grace
            ):
                return claim[0]  # its link just ended: let it come back first
            return None
        return None if rd.holder == link.config.me else rd.holder

    def settled(self) -> bool:
        """Every device host answered, or was found down, at least once."""
        return all(link.state != "connecting" for link in self.links.values())

    def to_json(self) -> list[dict[str, Any]]:
        return [link.to_json() for link in self.links.values()]

    # -- following the device hosts ------------------------------------------------

    async def start(self) -> None:
        for name in self.links:
            self._tasks.append(asyncio.create_task(self._follow(name), name=f"remote-{name}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(list(tasks))

    def url(self, cfg: RemoteHostConfig) -> str:
        scheme = "http" if cfg.insecure else "https"
        host = f"[{cfg.address}]" if ":" in cfg.address else cfg.address
        return f"{scheme}://{host}:{cfg.api_port}/v1/export"

    async def _follow(self, name: str) -> None:
        link = self.links[name]
        tls = self._tls.get(name)
        connector = aiohttp.TCPConnector(
            ssl=tls[0] if tls is not None else False, limit=1, socket_factory=_poll_socket
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    await self._poll(session, link)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._down(link, _describe(exc))
                    await asyncio.sleep(self.retry)

    async def _poll(self, session: aiohttp.ClientSession, link: HostLink) -> None:
        headers = {}
        params = {}
        if link.etag is not None and link.state == "up":
            headers["If-None-Match"] = link.etag
            params["wait"] = f"{self.poll_wait:g}"
        timeout = aiohttp.ClientTimeout(total=self.poll_wait + 15, connect=10)
        t0 = time.monotonic()
        async with session.get(
            self.url(link.config), headers=headers, params=params, timeout=timeout
        ) as resp:
            link.polls += 1
            if resp.status == 304:
                self._up(link)
                return
            if resp.status != 200:
                text = await resp.text()
                raise _Refused(f"HTTP {resp.status}: {text[:300]}")
            data = await resp.json()
            link.rtt_s = time.monotonic() - t0
            link.etag = resp.headers.get("ETag")
        self._up(link)
        self._apply(link, data)

    def _up(self, link: HostLink) -> None:
        if link.state != "up":
            was = link.state
            link.state, link.error, link.since = "up", None, time.time()
            log.info("device host %s: up (%s)", link.config.name, self.url(link.config))
            self.journal(
                EventKind.REMOTE_HOST_UP,
                {"host": link.config.name, "was": was},
                None,
            )

    def _down(self, link: HostLink, reason: str) -> None:
        link.etag = None
        if link.state != "down":
            # journaled once an outage; a reason that changes meanwhile
            # (refused, then unreachable) is logged and shown, not journaled
            link.state, link.error, link.since = "down", reason, time.time()
            log.warning("device host %s: not answering: %s", link.config.name, reason)
            self.journal(
                EventKind.REMOTE_HOST_DOWN,
                {"host": link.config.name, "reason": reason},
                None,
            )
        elif link.error != reason:
            link.error = reason
            log.warning("device host %s: still not answering: %s", link.config.name, reason)
        if link.devices:
            gone = [(EventKind.DEVICE_REMOVE, rd.device) for rd in link.devices.values()]
            link.devices = {}
            self.on_change(gone)

    def _apply(self, link: HostLink, data: Mapping[str, Any]) -> None:
        name = link.config.name
        fresh: dict[str, RemoteDevice] = {}
        for row in data.get("devices") or []:
            if not row.get("present") or not isinstance(row.get("device"), dict):
                continue
            try:
                dev = device_from_json(row["device"], name)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("device host %s: unreadable device %r: %s", name, row.get("name"), exc)
                continue
            fresh[dev.identity] = RemoteDevice(
                dev,
                int(row["endpoint_port"]),
                _str(row.get("holder")),
                bool(row.get("streaming")),
                tuple(f"{r.get('peer')}: {r.get('reason')}" for r in row.get("refusals") or []),
                _int(row.get("sessions")) or 0,
                _int(row.get("dead_links")) or 0,
            )
        now = time.monotonic()
        for row in data.get("devices") or []:
            holder, ident = _str(row.get("holder")), _str(row.get("identity"))
            if ident is None:
                continue
            key = f"{ident}@{name}"
            claim = self._claims.get(key)
            if holder is not None and holder != link.config.me:
                self._claims[key] = (holder, None)
            elif holder is not None:
                self._claims.pop(key, None)
            elif claim is not None and claim[1] is None:
                self._claims[key] = (claim[0], now)  # it let go just now
        old = link.devices
        changes: Changes = []
        for ident, rd in fresh.items():
            before = old.get(ident)
            if before is None:
                changes.append((EventKind.DEVICE_ADD, rd.device))
            elif before.device != rd.device:  # re-read there (drivers, a new number)
                changes.append((EventKind.DEVICE_BIND, rd.device))
        changes += [(EventKind.DEVICE_REMOVE, rd.device) for i, rd in old.items() if i not in fresh]
        link.devices = fresh
        for ident in old.keys() - fresh.keys():
            self._streams.pop(ident, None)
        for ident, rd in fresh.items():
            if ident not in old:
                self._streams.pop(ident, None)  # new here: its counters start anew
            if self._follow_stream(link, rd):
                # back in the guest by QEMU's reconnect: the reconciler, which
                # finds its usb-redir in the VM, journals it adopted
                changes.append((EventKind.DEVICE_ADD, rd.device))
        for rd in fresh.values():
            holder = self.held_elsewhere(rd.device)
            if holder is not None and (rd.device.identity, holder) not in self._held_told:
                self._held_told.add((rd.device.identity, holder))
                reason = next((r for r in reversed(rd.refusals) if "held by" in r), None)
                log.warning("%s on %s: held by %s", rd.device.identity, name, holder)
                self.journal(
                    EventKind.DEVICE_HELD,
                    {"host": name, "holder": holder, "reason": f"held by {holder}", "last": reason},
                    rd.device.identity,
                )
            elif holder is None:
                self._held_told = {t for t in self._held_told if t[0] != rd.device.identity}
        if changes or any(
            (old.get(i) is not None and old[i].holder != rd.holder) for i, rd in fresh.items()
        ):
            self.on_change(changes)

    def _follow_stream(self, link: HostLink, rd: RemoteDevice) -> bool:
        """Journal each time this VM host's guest lost remote ``rd`` without
        vmplug asking; True when it is streamed here again after a loss."""
        ident, me = rd.device.identity, link.config.me
        stream = self._streams.get(ident)
        if rd.holder == me and rd.streaming:
            if stream is None:
                self._streams[ident] = _Stream(rd.sessions, rd.dead_links)
                return False
            renewed = rd.sessions - stream.sessions
            renewed -= min(stream.ours, max(renewed, 0))
            back = stream.lost
            if back:
                renewed -= 1  # the session that brought it back
            # sessions that began and ended unseen (between two answers): each
            # one an end of the guest's device and a return
            unseen = max(renewed, 0)
            for _ in range(unseen):
                self._lost(link, rd, "its stream ended and QEMU reconnected")
            stream.sessions, stream.dead_links = rd.sessions, rd.dead_links
            stream.lost, stream.ours = False, 0
            return back or unseen > 0
        if stream is None or rd.holder == me:
            return False  # ours, the device not streamed yet: no news
        if rd.holder is not None:
            del self._streams[ident]  # another VM host's now: its links are not ours
        elif not stream.lost and rd.dead_links > stream.dead_links:
            stream.lost, stream.dead_links = True, rd.dead_links
            self._lost(
                link,
                rd,
                "the device host heard nothing from this VM host for its link "
                "timeout (network cut?) and let the device go",
            )
        return False

    def _lost(self, link: HostLink, rd: RemoteDevice, reason: str) -> None:
        name = link.config.name
        log.warning("%s on %s: the guest lost it: %s", rd.device.identity, name, reason)
        self.journal(
            EventKind.ATTACHMENT_LOST,
            {"host": name, "reason": reason, "sessions": rd.sessions, "dead_links": rd.dead_links},
            rd.device.identity,
        )


def _poll_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """The poll's TCP socket: keepalive every second, given up after
    :data:`POLL_SILENCE_S` without an ACK (``TCP_USER_TIMEOUT`` bounds the
    keepalive probes as well as unacknowledged data)."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    tune_keepalive(sock)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(POLL_SILENCE_S * 1000))
    return sock


class _Refused(Exception):
    """The device host answered, but not with its export list."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return describe_tls_error(exc.certificate_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        inner = exc.os_error if hasattr(exc, "os_error") else exc
        return describe_tls_error(inner)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    with contextlib.suppress(Exception):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


__all__ = ["HostLink", "RemoteDevice", "RemoteInventory", "device_from_json"]
