"""A device host inside ``vmplug run``: endpoints for the devices its
``[export]`` rules let go, and the export list its API serves.

* Which devices may leave is decided by ``[[export.rule]]`` (the rule
  language, first match wins, ``block = true`` keeps a device here) over the
  daemon's own inventory; static ``[export.device.NAME]`` tables (a port path
  on a pinned port, for firewalls) are served as well.
* Each allowed device gets one :class:`~vmplug.remote.export.ExportEndpoint`
  the first time it is seen, on a port of ``[export] ports`` derived from its
  identity (a hash, probing upwards past a port taken by another device or
  another program), so a VM host finds the same device on the same port after
  a restart of either side.  The endpoint stays while the daemon runs: a
  device unplugged here is absent from the list but its endpoint keeps
  holding the VM host's connection, and its replug is streamed on it.
* :meth:`DeviceHostExport.listing` is what ``GET /v1/export`` answers (with
  an ETag over its content); :meth:`DeviceHostExport.wait_change` lets that
  request wait for the next change (a long poll), so a VM host learns of a
  replug at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vmplug.config import ExportConfig
from vmplug.errors import UsageError
from vmplug.model import UsbDevice
from vmplug.remote.certs import CA_CERT, HostFiles, check
from vmplug.remote.export import (
    ExportEndpoint,
    ExportError,
    Location,
    PlainSource,
    SysfsLocator,
    UsbredirectSource,
)
from vmplug.wire.tls import server_context

log = logging.getLogger("vmplug.remote.devicehost")

#: how many refusals of each endpoint the export list carries
REFUSALS_LISTED = 5


def export_tls(export: ExportConfig) -> ssl.SSLContext | None:
    """The server context of ``[export]``'s certificates (None with ``insecure``);
    refuses missing, mismatched or expired files with the reason."""
    if export.insecure:
        return None
    if export.certs is None:
        raise UsageError("[export]: certs is needed (or insecure = true)")
    d = Path(export.certs)
    files = HostFiles(d / CA_CERT, d / f"{export.name}-cert.pem", d / f"{export.name}-key.pem")
    info = check(files)
    if info.problems:
        raise UsageError("[export]: " + "; ".join(info.problems))
    for warning in info.warnings:
        log.warning("[export]: %s", warning)
    return server_context(files.ca, files.cert, files.key)


def preferred_port(identity: str, first: int, last: int) -> int:
    """The port a device identity asks for first: the same on every start."""
    digest = int.from_bytes(hashlib.sha256(identity.encode("utf-8", "surrogatepass")).digest()[:8])
    return first + digest % (last - first + 1)


class _InventoryLocator:
    """Where the device with ``identity`` is now, from the daemon's inventory
    (a replug into another socket is found too: the identity follows it)."""

    def __init__(self, identity: str, devices: Callable[[], Iterable[UsbDevice]]) -> None:
        self.identity = identity
        self.devices = devices

    def __call__(self) -> Location | None:
        for dev in self.devices():
            if dev.identity == self.identity and dev.busnum is not None and dev.devnum:
                return Location(dev.busnum, dev.devnum)
        return None

    def __repr__(self) -> str:
        return f"<device {self.identity}>"


SourceFactory = Callable[[Callable[[], Location | None]], PlainSource]


class DeviceHostExport:
    """The export side of ``vmplug run`` (see the module doc)."""

    def __init__(
        self,
        export: ExportConfig,
        devices: Callable[[], Iterable[UsbDevice]],
        *,
        sysfs: Path = Path("/sys"),
        tls: ssl.SSLContext | None = None,
        source_factory: SourceFactory | None = None,
    ) -> None:
        self.export = export
        self.devices = devices
        self.sysfs = sysfs
        self.tls = export_tls(export) if tls is None and not export.insecure else tls
        self.source_factory: SourceFactory = source_factory or (UsbredirectSource)
        #: identity -> its endpoint (made by a rule), for as long as vmplug runs
        self.by_identity: dict[str, ExportEndpoint] = {}
        #: identity -> the device as last seen (its endpoint outlives an unplug)
        self.seen: dict[str, UsbDevice] = {}
        self.static: list[ExportEndpoint] = []
        self._changed = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._started = False

    # -- life cycle -------------------------------------------------------------

    def _endpoint(self, name: str, source: PlainSource, port: int) -> ExportEndpoint:
        return ExportEndpoint(
            name,
            source,
            host=self.export.listen,
            port=port,
            tls=self.tls,
            allow=frozenset(self.export.allow) or None,
            insecure=self.export.insecure,
        )

    async def start(self) -> None:
        for dev in self.export.devices:
            locate = SysfsLocator(
                dev.port_path, vendor=dev.vendor, product=dev.product, sysfs=self.sysfs
            )
            ep = self._endpoint(dev.name, self.source_factory(locate), dev.port)
            await ep.start()
            self.static.append(ep)
        self._started = True
        await self.sync()
        log.info(
            "device host %s: %d endpoints by rule, %d static (%s)",
            self.export.name,
            len(self.by_identity),
            len(self.static),
            "INSECURE plaintext" if self.tls is None else "mutual TLS",
        )

    async def stop(self) -> None:
        self._started = False
        for ep in [*self.by_identity.values(), *self.static]:
            await ep.stop()
        self.by_identity.clear()
        self.static.clear()
        self.touch()

    def touch(self) -> None:
        """Something in the list may have changed: wake the waiting requests."""
        self._changed.set()
        self._changed = asyncio.Event()

    def on_journal(self, item: dict[str, Any]) -> None:
        """A daemon journal listener: a device came, went or was re-read."""
        if item.get("type") == "event" and item.get("kind") in (
            "device-add",
            "device-bind",
            "device-remove",
            "rescan",
        ):
            task = asyncio.get_running_loop().create_task(self.sync())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def sync(self) -> None:
        """Make an endpoint for every present device a rule lets go that has none."""
        if not self._started:
            return
        async with self._sync_lock:
            for dev in list(self.devices()):
                if not self.export.allows(dev):
                    continue
                ident = dev.identity
                self.seen[ident] = dev
                if ident not in self.by_identity:
                    await self._make(dev)
        self.touch()

    def _taken(self) -> set[int]:
        return {ep.port for ep in self.by_identity.values()} | {ep.port for ep in self.static}

    async def _make(self, dev: UsbDevice) -> None:
        first, last = self.export.ports
        size = last - first + 1
        start = preferred_port(dev.identity, first, last)
        taken = self._taken()
        locate = _InventoryLocator(dev.identity, self.devices)
        try:
            source = self.source_factory(locate)
        except ExportError as exc:
            log.error("export %s: %s", dev.identity, exc)
            return
        for step in range(size):
            port = first + (start - first + step) % size
            if port in taken:
                continue
            ep = self._endpoint(dev.identity, source, port)
            try:
                await ep.start()
            except ExportError as exc:
                log.info("export %s: port %d: %s; trying the next", dev.identity, port, exc)
                continue
            self.by_identity[dev.identity] = ep
            log.info("export %s (%s) on port %d", dev.identity, dev.display_name, port)
            return
        log.error("export %s: no free port in %d-%d", dev.identity, first, last)

    # -- the export list ----------------------------------------------------------

    def _present(self) -> dict[str, UsbDevice]:
        return {d.identity: d for d in self.devices()}

    def listing(self) -> dict[str, Any]:
        """What ``GET /v1/export`` answers: this host, and each exportable device
        with its endpoint port, whether it is plugged in, and who holds it."""
        present = self._present()
        rows: list[dict[str, Any]] = []
        for ident, ep in sorted(self.by_identity.items()):
            dev = present.get(ident) or self.seen.get(ident)
            rows.append(self._row(ep, dev, present=ident in present, identity=ident, static=False))
        for ep in self.static:
            rows.append(self._row(ep, None, present=None, identity=None, static=True))
        return {
            "host": self.export.name,
            "tls": self.tls is not None,
            "ports": list(self.export.ports),
            "devices": rows,
        }

    def _row(
        self,
        ep: ExportEndpoint,
        dev: UsbDevice | None,
        *,
        present: bool | None,
        identity: str | None,
        static: bool,
    ) -> dict[str, Any]:
        refusals = list(ep.state.refusals)[-REFUSALS_LISTED:]
        return {
            "name": ep.name,
            "identity": identity,
            "endpoint_port": ep.address[1],
            "static": static,
            "present": present,
            "holder": ep.state.holder,
            "streaming": ep.state.streaming,
            "sessions": ep.state.sessions,
            # links ended because their VM host went silent (a network cut):
            # the holder learns from it that its guest lost the device
            "dead_links": ep.state.dead_links,
            "last_dead_at": ep.state.last_dead_at,
            "refusals": [{"at": r.at, "peer": r.peer, "reason": r.reason} for r in refusals],
            "device": None if dev is None else dev.to_json(),
        }

    @staticmethod
    def etag(listing: dict[str, Any]) -> str:
        body = json.dumps(listing, sort_keys=True).encode()
        return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'

    async def wait_change(self, etag: str | None, timeout: float) -> tuple[dict[str, Any], str]:
        """The list and its ETag, once it differs from ``etag`` or after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            listing = self.listing()
            tag = self.etag(listing)
            left = deadline - loop.time()
            if etag is None or tag != etag or left <= 0:
                return listing, tag
            waits = [asyncio.ensure_future(self._changed.wait())]
            waits += [
                asyncio.ensure_future(ep.changed.wait())
                for ep in [*self.by_identity.values(), *self.static]
            ]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()


_BACKGROUND: set[asyncio.Task[None]] = set()


__all__ = ["DeviceHostExport", "export_tls", "preferred_port"]
