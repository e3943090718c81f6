"""libvirt domains: USB ``<hostdev>`` elements, observed from the live XML.

Needs ``libvirt-python`` (``pip install vmplug[libvirt]``).  One connection
per VM (URI default ``qemu:///system``); libvirt serves many clients, so
nothing here keeps ``virsh`` or virt-manager waiting.

* attach: ``attachDeviceFlags`` of a ``<hostdev mode='subsystem' type='usb'>``
  naming the vendor/product and the bus/device address of the device at the
  wanted port *now*, with the user alias ``ua-<vmplug id>`` (libvirt passes
  the alias to QEMU as the device id).  ``persist``: also into the domain's
  persistent config, with ``startupPolicy='optional'`` so a later start
  without the device still starts.
* detach: ``detachDeviceFlags`` of the same element, read back from the live
  (and persistent) XML by its alias.
* observe: the live XML's ``<hostdev>`` elements whose alias is
  ``ua-vmplug-…``; the address is mapped back to the port through sysfs, so
  the daemon compares them with what it wants exactly as for a QMP VM.
* remote devices (:class:`~vmplug.vms.base.UsbRedirSpec`): a
  ``<redirdev bus='usb' type='tcp'>`` with ``<source mode='connect'
  host=… service=… tls='yes'>`` and ``<reconnect enabled='yes'>``, aliased
  like a hostdev.  libvirt takes the TLS credentials from ``qemu.conf``
  (``chardev_tls = 1``, ``chardev_tls_x509_cert_dir``: ``ca-cert.pem``,
  ``client-cert.pem``, ``client-key.pem``, what
  :func:`vmplug.remote.certs.qemu_client_dir` writes;
  ``chardev_tls_x509_verify = 1``), not per device:
  :func:`~vmplug.generate.libvirt.qemu_conf_tls_lines`.  Measured with
  Debian 12's libvirt 9.0: a redirdev in the domain's XML at start is TLS;
  a *hot-plugged* one is not (libvirt makes the ``tls-creds-x509`` object
  but its ``chardev-add`` does not name it; the endpoint refused the
  plaintext).  So a TLS remote device is never hot-plugged here: attach
  refuses it with that reason and the element to put in the domain XML;
  one there is observed, adopted and detached by its alias.  Plaintext
  (``insecure``, lab networks) hot-plugs.
* events: libvirt's lifecycle, reboot and device-removed events, never
  polling.  libvirt accepts one event loop implementation per process, for
  good: vmplug runs libvirt's default one in a thread of its own and hands
  every event to the VM's asyncio loop, so it works whatever loop (or how
  many loops, one after the other) the process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmplug.aio import cancel_and_wait
from vmplug.generate.libvirt import qemu_conf_tls_lines, redirdev_element
from vmplug.host.inventory import sysfs_root_from_env
from vmplug.vms.base import (
    ID_PREFIX,
    AttachSpec,
    Binding,
    Notifier,
    ObservedDevice,
    OnVmEvent,
    UsbHostSpec,
    UsbRedirSpec,
    VmConfigError,
    VmDisconnected,
    VmError,
    VmEventKind,
    VmState,
    VmTimeout,
    check_device_id,
)

log = logging.getLogger("vmplug.vms.libvirt")

DEFAULT_URI = "qemu:///system"
#: libvirt requires user aliases to start with this.
ALIAS_PREFIX = "ua-"


class LibvirtMissing(VmConfigError):
    """libvirt-python is not installed."""


def _libvirt() -> Any:
    try:
        import libvirt  # noqa: PLC0415
    except ImportError as exc:
        raise LibvirtMissing(
            "libvirt",
            "libvirt-python is not installed: pip install 'vmplug[libvirt]' "
            "(Debian: apt install python3-libvirt)",
        ) from exc
    return libvirt


# ---------------------------------------------------------------------------
# libvirt's event loop, once per process, in a thread

_events_lock = threading.Lock()
_events_started = False


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; vmplug reports its own."""


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread.

    Must happen before the first connection that wants events or keepalive.
    """
    global _events_started  # noqa: PLW0603 - one per process, as libvirt wants
    lv = _libvirt()
    with _events_lock:
        if _events_started:
            return
        lv.registerErrorHandler(_quiet, None)
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    lv.virEventRunDefaultImpl()
                except Exception:  # never let the loop die: every VM depends on it
                    log.exception("libvirt event loop")

        threading.Thread(target=run, name="vmplug-libvirt-events", daemon=True).start()
        _events_started = True


def error_class(exc: BaseException) -> str:
    """``libvirt.VIR_ERR_OPERATION_INVALID`` style name of a libvirtError's code."""
    lv = _libvirt()
    code = exc.get_error_code() if isinstance(exc, lv.libvirtError) else None
    if code is None:
        return type(exc).__name__
    for key, value in vars(lv).items():
        if key.startswith("VIR_ERR_") and value == code and key not in ("VIR_ERR_OK",):
            return f"libvirt.{key}"
    return f"libvirt.{code}"


# ---------------------------------------------------------------------------
# sysfs: port <-> current address


@dataclass(frozen=True, slots=True)
class HostUsb:
    """A host USB device as libvirt names it."""

    bus: int
    device: int
    vendor: int
    product: int
    port: str  # QEMU's hostport, "1.2"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _device_dir(root: Path, name: str) -> HostUsb | None:
    base = os.path.join(root, "bus", "usb", "devices", name)  # noqa: PTH118
    busnum, devnum = _read(f"{base}/busnum"), _read(f"{base}/devnum")
    vid, pid = _read(f"{base}/idVendor"), _read(f"{base}/idProduct")
    if not (busnum and devnum and vid and pid):
        return None
    try:
        return HostUsb(int(busnum), int(devnum), int(vid, 16), int(pid, 16), name.partition("-")[2])
    except ValueError:
        return None


def device_at(root: Path, bus: int, port: str) -> HostUsb | None:
    """The device in socket ``bus``-``port`` now (None: nothing there)."""
    return _device_dir(root, f"{bus}-{port}")


def device_by_address(root: Path, bus: int, device: int) -> HostUsb | None:
    """The device with address ``bus``/``device`` now (None: gone)."""
    try:
        names = os.listdir(os.path.join(root, "bus", "usb", "devices"))  # noqa: PTH118, PTH208
    except OSError:
        return None
    for name in names:
        if name.startswith(f"{bus}-") and ":" not in name:
            found = _device_dir(root, name)
            if found is not None and found.device == device:
                return found
    return None


# ---------------------------------------------------------------------------
# XML (pure)


def hostdev_xml(dev_id: str, usb: HostUsb, *, optional: bool = False) -> str:
    """The ``<hostdev>`` element for ``usb``, aliased ``ua-<dev_id>``."""
    hostdev = ET.Element("hostdev", mode="subsystem", type="usb", managed="no")
    source = ET.SubElement(hostdev, "source")
    if optional:
        source.set("startupPolicy", "optional")
    ET.SubElement(source, "vendor", id=f"0x{usb.vendor:04x}")
    ET.SubElement(source, "product", id=f"0x{usb.product:04x}")
    ET.SubElement(source, "address", bus=str(usb.bus), device=str(usb.device))
    ET.SubElement(hostdev, "alias", name=ALIAS_PREFIX + dev_id)
    return ET.tostring(hostdev, encoding="unicode")


@dataclass(frozen=True, slots=True)
class XmlHostdev:
    """A USB ``<hostdev>`` as the domain XML has it."""

    alias: str
    vendor: int | None
    product: int | None
    bus: int | None
    device: int | None
    xml: str

    @property
    def dev_id(self) -> str:
        """The QEMU id (libvirt's alias without ``ua-``)."""
        return self.alias.removeprefix(ALIAS_PREFIX)


def _int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def usb_hostdevs(domain_xml: str) -> list[XmlHostdev]:
    """Every USB ``<hostdev>`` of a domain XML that has an alias."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    found = []
    for hd in root.iterfind("./devices/hostdev[@type='usb']"):
        alias = hd.find("alias")
        name = alias.get("name") if alias is not None else None
        if not name:
            continue
        src = hd.find("source")
        vendor = src.find("vendor") if src is not None else None
        product = src.find("product") if src is not None else None
        addr = src.find("address") if src is not None else None
        found.append(
            XmlHostdev(
                alias=name,
                vendor=_int(vendor.get("id")) if vendor is not None else None,
                product=_int(product.get("id")) if product is not None else None,
                bus=_int(addr.get("bus")) if addr is not None else None,
                device=_int(addr.get("device")) if addr is not None else None,
                xml=ET.tostring(hd, encoding="unicode"),
            )
        )
    return found


def redirdev_xml(dev_id: str, spec: UsbRedirSpec) -> str:
    """The ``<redirdev>`` element of a remote device, aliased ``ua-<dev_id>``."""
    return redirdev_element(
        dev_id, spec.host, spec.port, tls=spec.tls_dir is not None, reconnect=spec.reconnect
    )


@dataclass(frozen=True, slots=True)
class XmlRedirdev:
    """A TCP ``<redirdev>`` as the domain XML has it."""

    alias: str
    host: str | None
    port: int | None
    tls: bool
    xml: str

    @property
    def dev_id(self) -> str:
        return self.alias.removeprefix(ALIAS_PREFIX)


def usb_redirdevs(domain_xml: str) -> list[XmlRedirdev]:
    """Every aliased USB ``<redirdev type='tcp'>`` of a domain XML."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    out: list[XmlRedirdev] = []
    for red in root.iterfind("./devices/redirdev[@bus='usb']"):
        alias = red.find("alias")
        if alias is None or not alias.get("name", "").startswith(ALIAS_PREFIX):
            continue
        src = red.find("source")
        out.append(
            XmlRedirdev(
                alias=alias.get("name", ""),
                host=None if src is None else src.get("host"),
                port=None if src is None else _int(src.get("service")),
                tls=src is not None and src.get("tls") == "yes",
                xml=ET.tostring(red, encoding="unicode"),
            )
        )
    return out


def usb_controllers(domain_xml: str) -> list[str]:
    """Models of the domain's USB controllers (``qemu-xhci``, ``ich9-ehci1``...)."""
    root = ET.fromstring(domain_xml)  # noqa: S314
    return [
        c.get("model") or "default"
        for c in root.iterfind("./devices/controller[@type='usb']")
        if c.get("model") != "none"
    ]


# ---------------------------------------------------------------------------


class LibvirtVm(Notifier):
    """One libvirt domain, by name (a :class:`~vmplug.vms.base.VmBackend`).

    ``connected`` is True while vmplug has a libvirt connection and the
    domain runs (or is paused).  ``on_change(event)`` hears a
    :class:`~vmplug.vms.base.VmEvent`: ``CONNECTED`` (the domain started, or
    vmplug connected to a running one), ``DISCONNECTED`` (stopped, or libvirt
    went away), ``SHUTDOWN`` (crashed), ``RESET`` (rebooted),
    ``STOP``/``RESUME`` and ``DEVICE_DELETED`` with the device's id.
    """

    def __init__(
        self,
        name: str,
        domain: str,
        *,
        uri: str | None = None,
        persist: bool = False,
        on_change: OnVmEvent | None = None,
        sysfs_root: Path | None = None,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.name = name
        self.domain = domain
        self.uri = uri or DEFAULT_URI
        self.persist = persist
        self.on_change = on_change
        self.sysfs_root = sysfs_root if sysfs_root is not None else sysfs_root_from_env()
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._conn: Any = None
        self._dom: Any = None
        self._active = False
        self._state = VmState.DISCONNECTED
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._up = asyncio.Event()
        self._callbacks: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None

    # -- state --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._active

    @property
    def state(self) -> VmState:
        return self._state

    def __repr__(self) -> str:
        return f"<LibvirtVm {self.name} {self.domain}@{self.uri} {self._state.value}>"

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        _libvirt()  # fail now, and clearly, without libvirt-python
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"vmplug-libvirt-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])
        await self._disconnect()
        self._state = VmState.DISCONNECTED

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        attempt = 0
        reported: str | None = None
        while True:
            try:
                await self._connect()
            except VmError as exc:
                self.error = str(exc)
                if self.error != reported:
                    log.warning("%s", exc)
                    reported = self.error
                await asyncio.sleep(min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 20)))
                attempt += 1
                continue
            attempt = 0
            reported = None
            self.error = None
            log.info("vm %s: connected to %s (domain %s)", self.name, self.uri, self.domain)
            await self._look_at_domain()
            await self._closed.wait()
            was_active = self._active
            await self._disconnect()
            log.info("vm %s: the connection to %s closed", self.name, self.uri)
            if was_active:
                self._notify(VmEventKind.DISCONNECTED)
            await asyncio.sleep(self.backoff_min)

    async def _connect(self) -> None:
        lv = _libvirt()
        ensure_event_loop()
        self._closed.clear()
        try:
            conn = await asyncio.to_thread(lv.open, self.uri)
        except lv.libvirtError as exc:
            raise VmDisconnected(
                self.name, f"cannot connect to libvirt at {self.uri}: {exc}"
            ) from exc
        try:
            with contextlib.suppress(lv.libvirtError):
                conn.setKeepAlive(5, 3)  # a dead libvirtd is noticed in ~20 s
            conn.registerCloseCallback(self._cb_close, None)
            self._callbacks = [
                conn.domainEventRegisterAny(
                    None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._cb_lifecycle, None
                ),
                conn.domainEventRegisterAny(
                    None, lv.VIR_DOMAIN_EVENT_ID_REBOOT, self._cb_reboot, None
                ),
                conn.domainEventRegisterAny(
                    None, lv.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._cb_removed, None
                ),
            ]
        except lv.libvirtError as exc:
            with contextlib.suppress(lv.libvirtError):
                conn.close()
            raise VmDisconnected(self.name, f"libvirt at {self.uri}: {exc}") from exc
        self._conn = conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._dom = None
        self._active = False
        self._up.clear()
        self._state = VmState.DISCONNECTED
        if conn is None:
            return
        lv = _libvirt()

        def close() -> None:
            for cb in self._callbacks:
                with contextlib.suppress(lv.libvirtError):
                    conn.domainEventDeregisterAny(cb)
            with contextlib.suppress(lv.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(lv.libvirtError):
                conn.close()

        self._callbacks = []
        await asyncio.to_thread(close)

    async def _look_at_domain(self) -> None:
        """Read the domain's state now (at connect, after a lifecycle event)."""
        lv = _libvirt()
        conn = self._conn
        if conn is None:
            return

        def look() -> tuple[Any, int | None]:
            try:
                dom = conn.lookupByName(self.domain)
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    return None, None
                raise
            return dom, dom.state()[0]

        try:
            dom, state = await asyncio.to_thread(look)
        except lv.libvirtError as exc:
            log.warning("vm %s: domain %s: %s", self.name, self.domain, exc)
            return
        if dom is None:
            self.error = f"libvirt at {self.uri} has no domain {self.domain!r}"
            log.warning("vm %s: %s (waiting for it)", self.name, self.error)
        self._dom = dom
        self._set_state(_state_of(lv, state))

    def _set_state(self, state: VmState) -> None:
        was = self._active
        self._state = state
        self._active = state not in (VmState.DISCONNECTED, VmState.SHUTDOWN)
        if self._active and not was:
            self._up.set()
            self._notify(VmEventKind.CONNECTED)
        elif was and not self._active:
            self._up.clear()
            self._notify(VmEventKind.DISCONNECTED)

    # -- events (libvirt's thread -> our loop) --------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _cb_close(self, _conn: Any, reason: int, _opaque: object) -> None:
        self._post(self._closed.set)

    def _cb_lifecycle(self, _c: Any, dom: Any, event: int, detail: int, _o: object) -> None:
        if dom.name() == self.domain:
            self._post(self._on_lifecycle, dom, event, detail)

    def _cb_reboot(self, _c: Any, dom: Any, _o: object) -> None:
        if dom.name() == self.domain:
            self._post(self._notify, VmEventKind.RESET)

    def _cb_removed(self, _c: Any, dom: Any, alias: str, _o: object) -> None:
        if dom.name() == self.domain and alias.startswith(ALIAS_PREFIX + ID_PREFIX):
            self._post(self._notify, VmEventKind.DEVICE_DELETED, alias.removeprefix(ALIAS_PREFIX))

    def _on_lifecycle(self, dom: Any, event: int, detail: int) -> None:
        lv = _libvirt()
        log.debug("vm %s: lifecycle event %d/%d", self.name, event, detail)
        if event == lv.VIR_DOMAIN_EVENT_STARTED:
            self._dom = dom
            self._set_state(VmState.RUNNING)
        elif event == lv.VIR_DOMAIN_EVENT_STOPPED:
            self._set_state(VmState.DISCONNECTED)
        elif event == lv.VIR_DOMAIN_EVENT_CRASHED:
            self._state = VmState.CRASHED
            self._notify(VmEventKind.SHUTDOWN)
        elif event == lv.VIR_DOMAIN_EVENT_SUSPENDED:
            self._state = VmState.PAUSED
            self._notify(VmEventKind.STOP)
        elif event == lv.VIR_DOMAIN_EVENT_RESUMED:
            self._state = VmState.RUNNING
            self._notify(VmEventKind.RESUME)
        elif event in (lv.VIR_DOMAIN_EVENT_DEFINED, lv.VIR_DOMAIN_EVENT_UNDEFINED):
            self._dom = dom if event == lv.VIR_DOMAIN_EVENT_DEFINED else None

    # -- operations ---------------------------------------------------------

    def _domain(self) -> Any:
        if self._conn is None:
            raise VmDisconnected(self.name, self.error or f"not connected to libvirt at {self.uri}")
        if self._dom is None or not self._active:
            raise VmDisconnected(self.name, f"domain {self.domain} is not running")
        return self._dom

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        lv = _libvirt()
        try:
            return await asyncio.to_thread(fn)
        except lv.libvirtError as exc:
            code = exc.get_error_code()
            cls = VmDisconnected if code in _gone_codes(lv) else VmError
            raise cls(self.name, f"{what}: {exc}", qmp_class=error_class(exc)) from exc

    async def domain_xml(self, *, inactive: bool = False) -> str:
        lv = _libvirt()
        dom = self._domain() if not inactive else (self._dom or self._domain())
        flags = lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(await self._call("read the domain XML", lambda: dom.XMLDesc(flags)))

    async def observe(self) -> dict[str, ObservedDevice]:
        """vmplug's hostdevs (alias ``ua-vmplug-*``) in the live XML, keyed by QEMU id."""
        xml = await self.domain_xml()
        out = {}
        for hd in usb_hostdevs(xml):
            if not hd.dev_id.startswith(ID_PREFIX):
                continue
            out[hd.dev_id] = self._observed(hd)
        for red in usb_redirdevs(xml):
            if red.dev_id.startswith(ID_PREFIX):
                out[red.dev_id] = _observed_redir(red)
        return out

    async def observe_bindings(self) -> dict[str, Binding]:
        """:meth:`observe` as the reconciler compares it (the live XML is read
        either way: libvirt has no cheaper question)."""
        return {dev_id: dev.binding for dev_id, dev in (await self.observe()).items()}

    async def observe_all(self) -> dict[str, ObservedDevice]:
        """Every aliased USB hostdev and redirdev, vmplug's and others'."""
        xml = await self.domain_xml()
        out = {hd.dev_id: self._observed(hd) for hd in usb_hostdevs(xml)}
        out.update({red.dev_id: _observed_redir(red) for red in usb_redirdevs(xml)})
        return out

    def _observed(self, hd: XmlHostdev) -> ObservedDevice:
        now = (
            device_by_address(self.sysfs_root, hd.bus, hd.device)
            if hd.bus is not None and hd.device is not None
            else None
        )
        same = now is not None and (now.vendor, now.product) == (hd.vendor, hd.product)
        return ObservedDevice(
            id=hd.dev_id,
            hostbus=hd.bus,
            hostaddr=hd.device,
            hostport=now.port if same and now is not None else None,
            vendorid=hd.vendor,
            productid=hd.product,
            attached=same,
            bus=None,
            path=hd.alias,
        )

    def resolve(self, dev_id: str, spec: UsbHostSpec) -> HostUsb:
        """The device the spec names, as it is on the host now."""
        problem = spec.problem()
        if problem is not None:
            raise VmConfigError(self.name, f"{dev_id}: {problem}")
        found: HostUsb | None = None
        if spec.hostbus is not None and spec.hostport is not None:
            found = device_at(self.sysfs_root, spec.hostbus, spec.hostport)
            where = f"port {spec.hostbus}-{spec.hostport}"
        elif spec.hostbus is not None and spec.hostaddr is not None:
            found = device_by_address(self.sysfs_root, spec.hostbus, spec.hostaddr)
            where = f"address {spec.hostbus}/{spec.hostaddr}"
        else:
            where = f"{spec.vendorid:04x}:{spec.productid:04x}"
            raise VmConfigError(
                self.name,
                f"{dev_id}: libvirt needs the device's place ({where} alone names no "
                "bus/device address)",
            )
        if found is None:
            raise VmError(
                self.name,
                f"{dev_id}: no USB device at {where} on the host ({self.sysfs_root})",
                qmp_class="DeviceNotFound",
            )
        return found

    async def attach(self, dev_id: str, spec: AttachSpec) -> None:
        """``attachDeviceFlags`` a hostdev for the device the spec names, live
        (and into the persistent config when ``persist``)."""
        check_device_id(self.name, dev_id)
        if isinstance(spec, UsbRedirSpec):
            await self._attach_redir(dev_id, spec)
            return
        usb = self.resolve(dev_id, spec)
        dom = self._domain()
        lv = _libvirt()
        live = hostdev_xml(dev_id, usb)
        await self._call(
            f"attach {dev_id} ({usb.vendor:04x}:{usb.product:04x} at {usb.bus}/{usb.device})",
            lambda: dom.attachDeviceFlags(live, lv.VIR_DOMAIN_AFFECT_LIVE),
        )
        if self.persist:
            await self._persist_attach(dom, dev_id, usb)

    async def _attach_redir(self, dev_id: str, spec: UsbRedirSpec) -> None:
        """A plaintext ``<redirdev>``, live (see the module doc for TLS)."""
        problem = spec.problem()
        if problem is not None:
            raise VmConfigError(self.name, f"{dev_id}: {problem}")
        if spec.tls_dir is not None:
            raise VmConfigError(
                self.name,
                f"{dev_id}: libvirt (9.0) hot-plugs a redirdev without its TLS credentials, "
                "so the stream would leave in plaintext; put this element in the domain's "
                f"XML (virsh edit {self.domain}) and restart it: "
                f"{redirdev_xml(dev_id, spec)}, with qemu.conf: "
                + qemu_conf_tls_lines(spec.tls_dir).replace("\n", "; "),
            )
        dom = self._domain()
        lv = _libvirt()
        live = redirdev_xml(dev_id, spec)
        await self._call(
            f"attach {dev_id} (usb-redir from {spec.host}:{spec.port})",
            lambda: dom.attachDeviceFlags(live, lv.VIR_DOMAIN_AFFECT_LIVE),
        )

    async def _persist_attach(self, dom: Any, dev_id: str, usb: HostUsb) -> None:
        lv = _libvirt()
        inactive = await self._call(
            "read the config", lambda: dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        )
        for hd in usb_hostdevs(str(inactive)):
            if hd.dev_id == dev_id:
                await self._call(
                    f"drop the old {dev_id} from the config",
                    functools.partial(dom.detachDeviceFlags, hd.xml, lv.VIR_DOMAIN_AFFECT_CONFIG),
                )
        saved = hostdev_xml(dev_id, usb, optional=True)
        await self._call(
            f"write {dev_id} into the config",
            lambda: dom.attachDeviceFlags(saved, lv.VIR_DOMAIN_AFFECT_CONFIG),
        )

    async def detach(self, dev_id: str, timeout: float = 5.0) -> None:
        """``detachDeviceFlags`` of the hostdev aliased ``ua-<dev_id>``; a device
        that is not there is no error.  Returns once the live XML no longer has it."""
        check_device_id(self.name, dev_id)
        dom = self._domain()
        lv = _libvirt()
        if self.persist:
            inactive = await self._call(
                "read the config", lambda: dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
            )
            for hd in usb_hostdevs(str(inactive)):
                if hd.dev_id == dev_id:
                    await self._call(
                        f"drop {dev_id} from the config",
                        functools.partial(
                            dom.detachDeviceFlags, hd.xml, lv.VIR_DOMAIN_AFFECT_CONFIG
                        ),
                    )
        xml = await self.domain_xml()
        mine = [hd.xml for hd in usb_hostdevs(xml) if hd.dev_id == dev_id]
        mine += [red.xml for red in usb_redirdevs(xml) if red.dev_id == dev_id]
        if not mine:
            return
        await self._call(
            f"detach {dev_id}",
            lambda: dom.detachDeviceFlags(mine[0], lv.VIR_DOMAIN_AFFECT_LIVE),
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while dev_id in await self.observe_all():
            if loop.time() > deadline:
                raise VmTimeout(self.name, f"{dev_id}: still in the domain after {timeout:g} s")
            await asyncio.sleep(0.05)

    async def status(self) -> VmState:
        await self._look_at_domain()
        return self._state


def _observed_redir(red: XmlRedirdev) -> ObservedDevice:
    """A redirdev as the reconciler compares it.  ``attached``: libvirt's XML
    does not say whether the stream is up (QEMU's ``query-chardev`` does,
    the doctor reads it), so an element present counts as held."""
    return ObservedDevice(
        id=red.dev_id,
        hostbus=None,
        hostaddr=None,
        hostport=None,
        vendorid=None,
        productid=None,
        attached=True,
        bus=None,
        path=red.alias,
        driver="usb-redir",
        chardev=f"char{red.alias}",
    )


def _state_of(lv: Any, state: int | None) -> VmState:
    if state is None:
        return VmState.DISCONNECTED
    return {
        lv.VIR_DOMAIN_RUNNING: VmState.RUNNING,
        lv.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
        lv.VIR_DOMAIN_PAUSED: VmState.PAUSED,
        lv.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
        lv.VIR_DOMAIN_SHUTDOWN: VmState.RUNNING,  # shutting down: still there
        lv.VIR_DOMAIN_CRASHED: VmState.CRASHED,
    }.get(state, VmState.DISCONNECTED)


def _gone_codes(lv: Any) -> tuple[int, ...]:
    """Errors meaning the domain or the connection is not there (retry later)."""
    return (
        lv.VIR_ERR_NO_DOMAIN,
        lv.VIR_ERR_OPERATION_INVALID,  # "domain is not running"
        lv.VIR_ERR_NO_CONNECT,
        lv.VIR_ERR_INVALID_CONN,
        lv.VIR_ERR_RPC,
    )


__all__ = [
    "ALIAS_PREFIX",
    "DEFAULT_URI",
    "HostUsb",
    "LibvirtMissing",
    "LibvirtVm",
    "XmlRedirdev",
    "device_at",
    "device_by_address",
    "ensure_event_loop",
    "hostdev_xml",
    "redirdev_xml",
    "usb_controllers",
    "usb_hostdevs",
    "usb_redirdevs",
]
