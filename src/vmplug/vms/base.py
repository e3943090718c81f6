"""The VM contract: what vmplug asks a VM for, what it holds, what it hears.

:class:`VmBackend` is what the daemon (and every one-shot command) needs of a
VM, whatever drives it: QEMU over QMP (:mod:`vmplug.vms.qmp`, Proxmox's
:mod:`vmplug.vms.proxmox`), a QEMU in a container (:mod:`vmplug.vms.container`)
or a libvirt domain (:mod:`vmplug.vms.libvirt`).  Its types:

* attach arguments: an :data:`AttachSpec`: a :class:`UsbHostSpec` (a host
  device QEMU opens itself) or a :class:`UsbRedirSpec` (a remote device,
  streamed over a TLS chardev);
* what a VM holds: :class:`Binding` is what the reconciler compares
  (:meth:`VmBackend.observe_bindings`, cheap); :class:`ObservedDevice` is
  everything a VM says of a device (:meth:`VmBackend.observe`, for people and
  diagnostics), and :attr:`ObservedDevice.binding` is its reconciler view;
* what happens to a VM: a :class:`VmEvent`, handed to the backend's
  ``on_change`` by :meth:`Notifier._notify`.  Events say what to look at
  again, never what is true.

Pure data and small validation helpers; no I/O.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from vmplug.errors import VmplugError
from vmplug.model import ID_PREFIX  # the one definition, re-exported (__all__)

log = logging.getLogger("vmplug.vms")

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
# A usb-host hostport: root port then hub ports, "1" .. "1.2.3.4.5" (USB allows 7 tiers).
_HOSTPORT = re.compile(r"[1-9][0-9]{0,2}(\.[1-9][0-9]{0,2}){0,6}\Z")
# A usb-host hostdevice: the usbfs node of one device (nothing a user could point elsewhere).
_HOSTDEVICE = re.compile(r"/dev/bus/usb/[0-9]{3}/[0-9]{3}\Z")


class VmState(enum.Enum):
    """What vmplug knows of a VM's QEMU process."""

    DISCONNECTED = "disconnected"  # no QMP session (QEMU not there, or not reachable)
    CONNECTING = "connecting"  # a session is being set up
    PRELAUNCH = "prelaunch"  # QEMU started with -S, the guest never ran
    RUNNING = "running"
    PAUSED = "paused"  # stopped, suspended, migrating, ...
    SHUTDOWN = "shutdown"  # the guest powered off; QEMU still there (-no-shutdown)
    CRASHED = "crashed"  # guest-panicked, internal-error, io-error, watchdog

    @classmethod
    def from_run_state(cls, status: str) -> VmState:
        """Map QMP ``query-status`` ``status`` (QAPI ``RunState``) to a VmState."""
        return _RUN_STATES.get(status, cls.PAUSED)


_RUN_STATES: dict[str, VmState] = {
    "running": VmState.RUNNING,
    "prelaunch": VmState.PRELAUNCH,
    "shutdown": VmState.SHUTDOWN,
    "internal-error": VmState.CRASHED,
    "io-error": VmState.CRASHED,
    "guest-panicked": VmState.CRASHED,
    "watchdog": VmState.CRASHED,
}


class VmError(VmplugError):
    """A VM refused or failed an operation.

    ``qmp_class`` is QEMU's error class (``GenericError``, ``DeviceNotFound``,
    ...) when QEMU answered with an error; ``None`` when the failure is on
    vmplug's side of the socket (not connected, timeout, bad configuration).
    Callers decide on ``qmp_class`` or on the subclass, never on the message.
    """

    def __init__(self, vm: str, message: str, *, qmp_class: str | None = None) -> None:
        super().__init__(f"vm {vm}: {message}")
        self.vm = vm
        self.qmp_class = qmp_class


class VmDisconnected(VmError):
    """No QMP session: QEMU is not running, went away, or the socket is unreachable."""


class VmTimeout(VmError):
    """QEMU did not answer (or did not finish) in time; its state is unknown."""


class VmConfigError(VmError):
    """The VM cannot take USB devices as configured (no/several USB buses, bad spec)."""


def check_device_id(vm: str, dev_id: str) -> None:
    """Refuse an id QEMU would reject, before sending anything."""
    if not _QEMU_ID.match(dev_id):
        raise VmConfigError(
            vm,
            f"invalid QEMU device id {dev_id!r} (a letter, then letters, digits, '-', '.', '_')",
        )


@dataclass(frozen=True, slots=True)
class UsbHostSpec:
    """Arguments of a ``usb-host`` device: which host device QEMU should grab.

    QEMU matches on every field that is set.  A spec must name a device:
    vendor+product, bus+port, or bus+address.  (A ``usb-host`` with no match
    fields grabs *any* host device, so :meth:`qmp_args` refuses it.)
    The forms behave differently in QEMU: vendor/product and bus+port are
    re-grabbed after a replug (QEMU polls every 2 s); bus+address is not, and
    fails at once when the device is not there.

    ``hostdevice`` (a ``/dev/bus/usb/BBB/DDD`` node, QEMU 5.1+ with libusb
    1.0.23+) comes before every match field: QEMU opens that node at once and
    never looks for the device again.  The match fields given with it are only
    stored (QOM shows them), which lets an observer still see the port.
    """

    hostbus: int | None = None
    hostaddr: int | None = None
    hostport: str | None = None
    vendorid: int | None = None
    productid: int | None = None
    isobufs: int | None = None
    isobsize: int | None = None
    hostdevice: str | None = None

    @classmethod
    def by_id(cls, vendorid: int, productid: int) -> UsbHostSpec:
        return cls(vendorid=vendorid, productid=productid)

    @classmethod
    def by_port(cls, hostbus: int, hostport: str) -> UsbHostSpec:
        return cls(hostbus=hostbus, hostport=hostport)

    @classmethod
    def by_address(cls, hostbus: int, hostaddr: int) -> UsbHostSpec:
        return cls(hostbus=hostbus, hostaddr=hostaddr)

    def problem(self) -> str | None:
        """Why QEMU should not be sent this spec, or None when it is fine."""
        ranges = (
            ("hostbus", self.hostbus, 1, 255),
            ("hostaddr", self.hostaddr, 1, 127),
            ("vendorid", self.vendorid, 0, 0xFFFF),
            ("productid", self.productid, 0, 0xFFFF),
            ("isobufs", self.isobufs, 1, 64),
            ("isobsize", self.isobsize, 1, 1024),
        )
        for name, value, low, high in ranges:
            if value is not None and not low <= value <= high:
                return f"{name}={value} is out of range {low}..{high}"
        if self.hostport is not None and not _HOSTPORT.match(self.hostport):
            return f"hostport={self.hostport!r} is not a port path like 1.2.3"
        if self.hostdevice is not None and not _HOSTDEVICE.match(self.hostdevice):
            return f"hostdevice={self.hostdevice!r} is not a node like /dev/bus/usb/001/002"
        named = (
            self.hostdevice is not None
            or (self.vendorid is not None and self.productid is not None)
            or (self.hostbus is not None and self.hostport is not None)
            or (self.hostbus is not None and self.hostaddr is not None)
        )
        if not named:
            return (
                "a usb-host spec needs vendorid+productid, hostbus+hostport or "
                "hostbus+hostaddr (QEMU would grab any device otherwise)"
            )
        return None

    def qmp_args(self) -> dict[str, int | str]:
        """The ``device_add`` arguments for this spec (driver, id and bus excluded)."""
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)
        args: dict[str, int | str] = {}
        for key in ("hostdevice", "hostbus", "hostaddr", "hostport", "vendorid", "productid"):
            value = getattr(self, key)
            if value is not None:
                args[key] = value
        if self.isobufs is not None:
            args["isobufs"] = self.isobufs
        if self.isobsize is not None:
            args["isobsize"] = self.isobsize
        return args


@dataclass(frozen=True, slots=True)
class ObservedDevice:
    """A ``usb-host`` device as QEMU holds it, read from QOM properties.

    Match fields QEMU leaves unset (0 or "") are None.  ``attached`` is QOM's
    ``attached``: True while QEMU has the host device open and plugged into
    the guest's bus; False while the device waits for its host device.
    """

    id: str
    hostbus: int | None
    hostaddr: int | None
    hostport: str | None
    vendorid: int | None
    productid: int | None
    attached: bool
    bus: str | None  # the guest USB bus's name, e.g. "xhci.0"
    #: QOM path, e.g. "/machine/peripheral/vmplug-0123456789ab".
    path: str = ""
    #: QEMU's driver: "usb-host", or "usb-redir" for a remote device
    driver: str = "usb-host"
    #: usb-redir only: the chardev it reads from
    chardev: str | None = None

    @property
    def managed(self) -> bool:
        """True for a device vmplug created (its id has vmplug's prefix)."""
        return self.id.startswith(ID_PREFIX)

    @property
    def binding(self) -> Binding:
        """What the reconciler compares of this device (:class:`Binding`)."""
        return Binding(self.id, self.hostbus, self.hostport, self.hostaddr, self.attached)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "managed": self.managed,
            "attached": self.attached,
            "bus": self.bus,
            "hostbus": self.hostbus,
            "hostaddr": self.hostaddr,
            "hostport": self.hostport,
            "vendorid": None if self.vendorid is None else f"{self.vendorid:04x}",
            "productid": None if self.productid is None else f"{self.productid:04x}",
            "path": self.path,
            "driver": self.driver,
            "chardev": self.chardev,
        }


@dataclass(frozen=True, slots=True)
class Binding:
    """What a reconciler compares of a vmplug device: the host socket it is
    bound to, the device number it is pinned to (``hostaddr``; None: QEMU
    follows the socket itself), and QOM's ``attached`` (None when not read:
    it decides nothing for the port form, where QEMU re-grabs the device by
    itself).  :meth:`VmBackend.observe_bindings` gives these; a backend with
    no cheaper read projects its :class:`ObservedDevice` (:attr:`ObservedDevice.binding`)."""

    id: str
    hostbus: int | None
    hostport: str | None
    hostaddr: int | None
    attached: bool | None = None


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.:_-]{0,252})\Z")


@dataclass(frozen=True, slots=True)
class UsbRedirSpec:
    """A remote device: a ``usb-redir`` device on a ``socket`` chardev that
    connects (and reconnects every ``reconnect`` seconds) to the device
    host's export endpoint ``host:port``.

    ``tls_dir`` holds ``ca-cert.pem``, ``client-cert.pem`` and
    ``client-key.pem`` (what QEMU's ``tls-creds-x509`` reads); QEMU checks
    the endpoint's certificate against the CA and against ``host``.  Without
    it (``tls_dir=None``) the stream is plaintext: only with ``insecure``.
    ``remote`` is the device host's name in the config (it names the TLS
    credentials object, one per device host).
    """

    host: str
    port: int
    remote: str
    tls_dir: str | None = None
    insecure: bool = False
    reconnect: int = 1

    def problem(self) -> str | None:
        if not _HOSTNAME.match(self.host):
            return f"host={self.host!r} is not a host name or address"
        if not 1 <= self.port <= 65535:
            return f"port={self.port} is out of range 1..65535"
        if not _QEMU_ID.match(f"x{self.remote}"):
            return f"remote={self.remote!r} is not a name (letters, digits, '-', '.', '_')"
        if not 1 <= self.reconnect <= 3600:
            return f"reconnect={self.reconnect} is out of range 1..3600 s"
        if self.tls_dir is None and not self.insecure:
            return "a remote device needs TLS credentials (tls_dir), or insecure = true"
        if self.tls_dir is not None and not self.tls_dir.startswith("/"):
            return f"tls_dir={self.tls_dir!r} must be an absolute path (QEMU opens it)"
        return None

    @property
    def tls_id(self) -> str:
        """The QOM id of the TLS credentials object for this device host."""
        return f"{ID_PREFIX}tls-{self.remote}"


def redir_chardev_id(dev_id: str) -> str:
    """The id of the chardev a usb-redir device ``dev_id`` reads from."""
    return f"{dev_id}-chr"


#: What :meth:`VmBackend.attach` takes: a host device QEMU opens itself
#: (:class:`UsbHostSpec`), or a remote device over a chardev
#: (:class:`UsbRedirSpec`).  A backend that cannot take a remote device
#: raises :class:`VmConfigError` for it.
AttachSpec: TypeAlias = UsbHostSpec | UsbRedirSpec


class VmEventKind(enum.Enum):
    """What happened to a VM.  A kind says what to look at again, never what is true."""

    #: a session opened, the domain started, or a shared socket answers again
    CONNECTED = "connected"
    #: the session closed, the domain stopped, or QEMU is not reachable any more
    DISCONNECTED = "disconnected"
    #: QEMU removed a device (:attr:`VmEvent.device_id` says which)
    DEVICE_DELETED = "device_deleted"
    #: the guest powered off or crashed; QEMU may still be there (-no-shutdown)
    SHUTDOWN = "shutdown"
    #: the guest rebooted (QEMU keeps its usb-host devices)
    RESET = "reset"
    #: the VM was paused
    STOP = "stop"
    #: the VM runs again
    RESUME = "resume"
    #: the guest panicked
    GUEST_PANICKED = "guest_panicked"

    @classmethod
    def from_qmp(cls, event: str) -> VmEventKind | None:
        """The kind of a QMP event name (``DEVICE_DELETED``, ``SHUTDOWN``...);
        None for events vmplug does not watch."""
        return _QMP_EVENTS.get(event)


_QMP_EVENTS: dict[str, VmEventKind] = {
    "DEVICE_DELETED": VmEventKind.DEVICE_DELETED,
    "SHUTDOWN": VmEventKind.SHUTDOWN,
    "RESET": VmEventKind.RESET,
    "STOP": VmEventKind.STOP,
    "RESUME": VmEventKind.RESUME,
    "GUEST_PANICKED": VmEventKind.GUEST_PANICKED,
}


@dataclass(frozen=True, slots=True)
class VmEvent:
    """Something happened to VM ``vm`` (its configured name).

    ``device_id`` is the device's QEMU id for :attr:`VmEventKind.DEVICE_DELETED`
    and None for every other kind.
    """

    vm: str
    kind: VmEventKind
    device_id: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is VmEventKind.DEVICE_DELETED) != bool(self.device_id):
            raise ValueError(
                f"VmEvent {self.kind.value}: a device id comes with device_deleted only, "
                f"and always ({self.device_id!r})"
            )

    def __str__(self) -> str:
        return self.kind.value if self.device_id is None else f"{self.kind.value} {self.device_id}"


#: Who hears a backend's events (the daemon's ``on_vm_change``); called from the event loop.
OnVmEvent: TypeAlias = Callable[[VmEvent], None]


class Notifier:
    """The one ``_notify`` of every backend: hand a :class:`VmEvent` to
    ``on_change``.  A listener that raises is logged and kept: a bug behind
    the daemon's callback must not stop a backend's session loop."""

    name: str
    on_change: OnVmEvent | None

    def _notify(self, kind: VmEventKind, device_id: str | None = None) -> None:
        listener = self.on_change
        if listener is None:
            return
        event = VmEvent(self.name, kind, device_id)
        try:
            listener(event)
        except Exception:
            log.exception("vm %s: on_change(%s) failed", self.name, event)


class VmBackend(Protocol):
    """What the daemon, the one-shot commands and ``vmplug doctor`` need of a VM.

    Every backend (:class:`~vmplug.vms.qmp.QmpVm`,
    :class:`~vmplug.vms.proxmox.ProxmoxVm`,
    :class:`~vmplug.vms.container.ContainerVm`,
    :class:`~vmplug.vms.libvirt.LibvirtVm`) satisfies it, and
    :func:`vmplug.vms.factory.make_backend` is where that is type-checked.
    A backend is built with ``on_change``: an :data:`OnVmEvent` or None.
    Failures are :class:`VmError` subclasses; ``qmp_class`` says what QEMU
    (or libvirt) answered.
    """

    #: the VM's name in the config (every VmEvent carries it)
    name: str

    @property
    def connected(self) -> bool:
        """True while an operation can be tried now."""
        ...

    @property
    def state(self) -> VmState: ...

    async def start(self) -> None:
        """Begin connecting (and reconnecting) in the background; returns at once."""
        ...

    async def stop(self) -> None:
        """Stop reconnecting, close what is open; bounded."""
        ...

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Until :attr:`connected` (True) or ``timeout`` seconds went by (False)."""
        ...

    async def observe(self) -> Mapping[str, ObservedDevice]:
        """vmplug's devices (ids with :data:`ID_PREFIX`) the VM holds, by id, in full."""
        ...

    async def observe_bindings(self) -> Mapping[str, Binding]:
        """vmplug's devices with only what the reconciler compares, by id."""
        ...

    async def attach(self, dev_id: str, spec: AttachSpec) -> None:
        """Add device ``dev_id`` as ``spec`` says; returns once the VM holds it."""
        ...

    async def detach(self, dev_id: str, timeout: float = 5.0) -> None:
        """Remove device ``dev_id`` and wait until it is gone; a missing one is no error."""
        ...


class UsbControllerKind(enum.Enum):
    XHCI = "xhci"
    EHCI = "ehci"
    UHCI = "uhci"
    OHCI = "ohci"
    OTHER = "other"

    @classmethod
    def from_type(cls, qom_type: str) -> UsbControllerKind:
        for kind in (cls.XHCI, cls.EHCI, cls.UHCI, cls.OHCI):
            if kind.value in qom_type:
                return kind
        return cls.OTHER


@dataclass(frozen=True, slots=True)
class UsbBus:
    """A guest USB bus and the controller that provides it."""

    name: str  # what device_add's bus= takes, e.g. "xhci.0"
    controller: str  # the controller's QOM path
    controller_type: str  # e.g. "qemu-xhci", "ich9-usb-ehci1"

    @property
    def kind(self) -> UsbControllerKind:
        return UsbControllerKind.from_type(self.controller_type)

    def describe(self) -> str:
        return f"{self.name} ({self.controller_type})"


def pick_usb_bus(vm: str, buses: list[UsbBus]) -> UsbBus:
    """Choose the bus to plug host devices into, or explain why not.

    xHCI serves every speed, so a single xHCI bus wins even beside other
    controllers; without xHCI a single EHCI bus is taken.  Anything else is
    ambiguous (or USB 1.1 only) and needs ``usb_bus`` in the config.
    """
    if not buses:
        raise VmConfigError(
            vm,
            "the VM has no USB controller; add -device qemu-xhci or set add_controller = true",
        )
    names = ", ".join(b.describe() for b in buses)
    for kind in (UsbControllerKind.XHCI, UsbControllerKind.EHCI):
        of_kind = [b for b in buses if b.kind is kind]
        if len(of_kind) == 1:
            return of_kind[0]
        if len(of_kind) > 1:
            raise VmConfigError(
                vm,
                f"the VM has several USB buses: {names}; "
                f'set usb_bus = "<name>" for this VM in the config',
            )
    raise VmConfigError(
        vm,
        f"the VM has only USB 1.1 buses ({names}), too slow for most devices; "
        f'add -device qemu-xhci, set add_controller = true, or set usb_bus = "<name>"',
    )


__all__ = [
    "ID_PREFIX",
    "AttachSpec",
    "Binding",
    "Notifier",
    "ObservedDevice",
    "OnVmEvent",
    "UsbBus",
    "UsbControllerKind",
    "UsbHostSpec",
    "UsbRedirSpec",
    "VmBackend",
    "VmConfigError",
    "VmDisconnected",
    "VmError",
    "VmEvent",
    "VmEventKind",
    "VmState",
    "VmTimeout",
    "check_device_id",
    "pick_usb_bus",
    "redir_chardev_id",
]
