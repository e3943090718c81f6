"""Pure core of the reconciler: what should be attached, and what to do about it.

``desired(devices, config)`` is a pure function of the devices present and
the rules; ``plan(desired, observed)`` is a pure diff against what each QEMU
holds.  The daemon only feeds them and carries out the plan, so every path —
plug, unplug, replug, VM restart, daemon restart, rule change — is the same
code.

vmplug binds a device to a VM by ``hostbus`` + ``hostport``: the one physical
socket the device sits in, so identical devices (same vid:pid, no serial)
stay distinct.  QEMU accepts that form while the device is absent and grabs
the device as soon as it is there; ``hostaddr`` (the device number) would
fail at once when the device is gone and change at every replug.  A
different device in the same socket is not taken by surprise: vmplug
detaches on ``remove`` (within milliseconds) and attaches again only what
the rules want; while vmplug is down, QEMU's own 2 s re-grab of the same
socket is a safety net for the common case, the same device replugged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmplug.config import Config
from vmplug.model import UsbDevice

ID_PREFIX = "vmplug-"


@dataclass(frozen=True, slots=True, order=True)
class Attachment:
    """One device that should be (or is) in one VM."""

    vm: str
    qemu_id: str
    hostbus: int
    hostport: str
    #: informational: what QEMU is told is the socket, not the device number
    hostaddr: int | None = field(default=None, compare=False)
    identity: str = field(default="", compare=False)
    port: str = field(default="", compare=False)

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
            else:
                held.add(key)
    for key in sorted(wanted_by_key):
        vm, _ = key
        if vm in reachable_set and key not in held:
            want = wanted_by_key[key]
            actions.append(Action("attach", vm, want.qemu_id, want, reason=f"wanted ({want.port})"))
    return actions
