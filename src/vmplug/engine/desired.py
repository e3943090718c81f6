"""Pure core of the reconciler: what should be attached, and what to do about it.

``desired(devices, config)`` is a pure function of the devices present and
the rules; ``plan(desired, observed)`` is a pure diff against what each QEMU
holds.  The daemon only feeds them and carries out the plan, so every path —
plug, unplug, replug, VM restart, daemon restart, rule change — is the same
code.

vmplug binds a device to a VM by ``hostbus`` + ``hostaddr``: QEMU grabs exactly
the device vmplug saw and never re-grabs on its own (its 2 s poll only
applies to ``vendorid``/``productid`` or ``hostport`` matches).  vmplug is the
only actor, so a different device plugged into the same port can never be
taken by surprise, and a replug (new device number) is seen as "the wanted
attachment differs from the observed one": detach the stale device, attach
the new one, under the same stable id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmplug.config import Config
from vmplug.model import UsbDevice

ID_PREFIX = "vmplug-"


@dataclass(frozen=True, slots=True, order=True)
class Attachment:
    """One device that should be (or is) in one VM."""

    vm: str
    qemu_id: str
    hostbus: int
    hostaddr: int
    identity: str = ""
    port: str = ""


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One step towards the desired state."""

    kind: str  # "attach" | "detach"
    vm: str
    qemu_id: str
    attachment: Attachment | None = None  # for attach: what to attach
    reason: str = ""


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
        if dev.busnum is None or dev.devnum is None:
            continue
        vm = target(dev, config, overrides)
        if vm is None:
            continue
        out.add(
            Attachment(
                vm=vm,
                qemu_id=dev.qemu_id,
                hostbus=dev.busnum,
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
            elif (want.hostbus, want.hostaddr) != (have.hostbus, have.hostaddr):
                actions.append(
                    Action(
                        "detach",
                        vm,
                        have.qemu_id,
                        reason=f"stale: holds {have.hostbus}:{have.hostaddr}, "
                        f"device is now {want.hostbus}:{want.hostaddr}",
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
