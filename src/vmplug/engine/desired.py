"""Pure core of the reconciler: what should be attached, and what to do about it.

``desired(devices, config)`` is a pure function of the devices present and
the rules; ``plan(desired, observed)`` is a pure diff against what each QEMU
holds.  The daemon only feeds them and carries out the plan, so every path —
plug, unplug, replug, VM restart, daemon restart, rule change — is the same
code.

vmplug names a device to QEMU by ``hostbus`` + ``hostport``: the one
physical socket it sits in, so identical devices (same vid:pid, no serial)
stay distinct, and a restarted daemon recognises what it attached.  How QEMU
*finds* the device is a separate matter (QEMU 7.2, hw/usb/host-libusb.c):

* the port form alone is accepted while the device is absent and opened by
  QEMU's scan of libusb's device list: at device_add, then every 2 s.  libusb
  learns of a new device from udevd's broadcast, which comes after udevd has
  run its rules (in the lab guest 0.15-1.3 s after the kernel's uevent, and
  once 11 s on a loaded host), so a device added on the kernel's uevent is
  often not in the list yet and waits for the next 2 s tick;
* ``hostbus`` + ``hostaddr`` alone is opened at realize or refused at once
  ("failed to find host usb device"), but it, too, looks in libusb's list;
* ``hostdevice=/dev/bus/usb/BBB/DDD`` comes first of all: QEMU opens the
  node itself (libusb_wrap_sys_device), which devtmpfs creates before the
  kernel even announces the device.  No udevd, no list, no poll.

So vmplug attaches a present device with ``hostdevice`` *plus* ``hostbus``,
``hostport`` and ``hostaddr`` (QEMU only stores those; QOM shows them, so the
observed port still identifies the attachment).  Such an attachment is
pinned to one device number and never re-grabbed by QEMU: vmplug detaches on
``remove`` and attaches the new number on ``add``, and :func:`plan` replaces
an observed attachment whose number is not the device's any more (a replug
vmplug did not see) or that QEMU no longer holds.  When the node cannot be
used (no live /sys, a QEMU that refuses it), the port form stays: QEMU's own
2 s re-grab of the same socket is then the safety net.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmplug.config import Config
from vmplug.model import UsbDevice
from vmplug.rules import Rule


@dataclass(frozen=True, slots=True, order=True)
class Attachment:
    """One device that should be (or is) in one VM."""

    vm: str
    qemu_id: str
    hostbus: int
    hostport: str
    #: wanted: the device's number now; observed: the number QEMU is pinned to
    #: (``hostdevice`` form), or None when QEMU follows the port by itself
    hostaddr: int | None = field(default=None, compare=False)
    identity: str = field(default="", compare=False)
    port: str = field(default="", compare=False)
    #: observed: QOM ``attached`` (QEMU holds the host device open)
    live: bool = field(default=True, compare=False)

    @property
    def binding(self) -> tuple[int, str]:
        return (self.hostbus, self.hostport)


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One step towards the desired state."""

    kind: str  # "attach" | "detach"
    vm: str
    qemu_id: str
    attachment: Attachment | None = None  # for attach: what to attach
    reason: str = ""


def stale_pin(have: Attachment, want: Attachment) -> bool:
    """True when ``have`` is pinned to a device number (``hostdevice``/``hostaddr``
    form) that is not the wanted device's now, or that QEMU has let go of.
    QEMU never re-grabs a pinned device: only a new device_add brings it back."""
    if have.hostaddr is None:
        return False  # the port form: QEMU follows the socket itself
    return have.hostaddr != want.hostaddr or not have.live


def host_port(port: str) -> str:
    """QEMU's ``hostport`` for a sysfs port path: "3-1.2" -> "1.2"."""
    return port.partition("-")[2]


def target(
    dev: UsbDevice, config: Config, overrides: Mapping[str, str | None] | None = None
) -> str | None:
    """The VM a device belongs in, or ``None`` (stays on the host).

    ``overrides`` (stable identity -> VM, or ``None`` for "keep on the host")
    are one-shot ``vmplug attach``/``detach`` decisions made while the daemon
    runs; they come before the rules.  Hubs never go anywhere.
    """
    if dev.is_hub or dev.is_root_hub:
        return None
    if overrides and dev.identity in overrides:
        return overrides[dev.identity]
    rc = config.decide(dev)
    if rc is None or rc.block:
        return None
    return rc.attach


def desired(
    devices: Iterable[UsbDevice],
    config: Config,
    overrides: Mapping[str, str | None] | None = None,
) -> frozenset[Attachment]:
    """Every attachment the rules ask for, for the devices present now.

    A device whose rule names a VM is wanted there; blocked, unmatched,
    hub and incomplete devices (no bus/device number) are wanted nowhere.
    """
    out: set[Attachment] = set()
    for dev in devices:
        if dev.busnum is None or dev.is_root_hub:
            continue
        vm = target(dev, config, overrides)
        if vm is None:
            continue
        if dev.host is not None:
            # a remote device: a usb-redir to its device host's endpoint, no
            # host socket (what QOM shows of a usb-redir: bus 0, port "")
            out.add(
                Attachment(
                    vm=vm,
                    qemu_id=dev.qemu_id,
                    hostbus=0,
                    hostport="",
                    identity=dev.identity,
                    port=f"{dev.host}:{dev.port}",
                )
            )
            continue
        out.add(
            Attachment(
                vm=vm,
                qemu_id=dev.qemu_id,
                hostbus=dev.busnum,
                hostport=host_port(dev.port),
                hostaddr=dev.devnum,
                identity=dev.identity,
                port=dev.port,
            )
        )
    return frozenset(out)


def plan(
    wanted: Iterable[Attachment],
    observed: Mapping[str, Mapping[str, Attachment]],
    reachable: Iterable[str],
) -> list[Action]:
    """The actions that turn ``observed`` into ``wanted``.

    ``observed`` maps each VM name to the ``vmplug-`` devices it holds, by id;
    ``reachable`` names the VMs vmplug can act on now (connected).  Nothing is
    planned for an unreachable VM: its attachments wait until it comes back.
    Detaches come before attaches, so a device that moves between VMs (or is
    replugged under the same id) is freed before it is taken again.
    """
    reachable_set = set(reachable)
    wanted_by_key = {(a.vm, a.qemu_id): a for a in wanted}
    actions: list[Action] = []
    held: set[tuple[str, str]] = set()
    for vm in sorted(observed):
        if vm not in reachable_set:
            continue
        for have in observed[vm].values():
            key = (vm, have.qemu_id)
            want = wanted_by_key.get(key)
            if want is None:
                actions.append(Action("detach", vm, have.qemu_id, reason="not wanted here"))
            elif want.binding != have.binding:
                actions.append(
                    Action(
                        "detach",
                        vm,
                        have.qemu_id,
                        reason=f"stale: holds {have.hostbus}-{have.hostport}, "
                        f"device is now at {want.hostbus}-{want.hostport}",
                    )
                )
            elif stale_pin(have, want):
                actions.append(
                    Action(
                        "detach",
                        vm,
                        have.qemu_id,
                        reason=f"stale: holds device {have.hostbus}:{have.hostaddr}"
                        f"{'' if have.live else ' (gone)'}, device is now "
                        f"{want.hostbus}:{want.hostaddr}",
                    )
                )
            else:
                held.add(key)
    for key in sorted(wanted_by_key):
        vm, _ = key
        if vm in reachable_set and key not in held:
            want = wanted_by_key[key]
            actions.append(Action("attach", vm, want.qemu_id, want, reason=f"wanted ({want.port})"))
    return actions


#: Rule attributes a device's ``add`` uevent answers by itself: ``id`` (PRODUCT)
#: and ``via-port`` (DEVPATH); ``label`` is never tested.  Every other one
#: (serial, name, hash, parent-hash, with-interface, with-connect-type) needs
#: sysfs, whose strings wait for the kernel's probe of the device.
EARLY_ATTRIBUTES = frozenset({"id", "via-port", "label"})


class Undecided:
    """What :meth:`EarlyRules.target` says when the uevent alone cannot decide."""

    def __repr__(self) -> str:
        return "UNDECIDED"


UNDECIDED = Undecided()


class EarlyRules:
    """The rules as far as a uevent can answer them, compiled once per config.

    :meth:`target` walks the rules in order, as :meth:`Config.decide` does,
    with only vid:pid and the port known.  A rule whose ``id``/``via-port``
    part fails cannot match whatever the rest says: it is passed over.  A
    rule whose known part holds decides the device when it asks nothing
    more; when it asks for more (a serial, interfaces, strings), nothing is
    decided and the caller reads the device.  Hubs and overrides are the
    caller's to exclude (the uevent's PRODUCT does not say "hub").
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rules: list[tuple[Rule | None, bool, str | None]] = []
        for rc in config.rules:
            known = tuple(a for a in rc.rule.attributes if a.name in EARLY_ATTRIBUTES)
            rest = len(known) < len(rc.rule.attributes)
            tested = tuple(a for a in known if a.name != "label")
            rule = Rule(rc.rule.source, tested) if tested else None
            self.rules.append((rule, rest, None if rc.block else rc.attach))
        #: answers so far: a replug asks again what it asked when it last came
        self._known: dict[tuple[int, int, str], str | Undecided | None] = {}

    def target(self, vendor: int, product: int, port: str) -> str | Undecided | None:
        """The VM the rules send this device to, None (stays on the host), or
        :data:`UNDECIDED`."""
        key = (vendor, product, port)
        if key in self._known:
            return self._known[key]
        answer = self._target(UsbDevice(port=port, vendor_id=vendor, product_id=product))
        if len(self._known) < _KNOWN_MAX:
            self._known[key] = answer
        return answer

    def _target(self, stand_in: UsbDevice) -> str | Undecided | None:
        for rule, rest, vm in self.rules:
            if rule is not None and not rule.matches(stand_in):
                continue  # cannot match, whatever its other attributes say
            if rest:
                return UNDECIDED
            return vm
        return None


#: the bound of EarlyRules.target's memo (ports x kinds of device seen)
_KNOWN_MAX = 4096
