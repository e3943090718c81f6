"""Doctor checks against Proxmox VE's own VM configs (/etc/pve/qemu-server/VMID.conf).

A device that a ``usbN:`` line gives a Proxmox VM *and* a vmplug rule attaches
is held by two owners: qemu-server puts a ``usb-host`` for it on the VM's
command line at every start, vmplug ``device_add``s it again (or into another
VM), and whichever comes second finds it claimed.  One of them must let go.
Nothing is reported on a host without the qemu-server directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmplug.doctor.findings import CheckSpec, Finding, Severity
from vmplug.vms.proxmox_conf import claims, etc_dir, mapping_file, read_mappings, read_vm_confs

if TYPE_CHECKING:
    from vmplug.doctor.context import DoctorContext

LAYER = "qemu"
CHECK = "qemu.proxmox-claims"


def check_double_claims(ctx: DoctorContext) -> Iterator[Finding]:
    """Devices claimed both by a Proxmox usbN line and by a vmplug rule."""
    etc = etc_dir()
    if not etc.is_dir():
        return
    confs = read_vm_confs(etc)
    mappings = read_mappings(mapping_file(etc))
    devices = (
        ctx.selected
        if ctx.device
        else [d for d in ctx.devices if not d.is_root_hub and not d.is_hub]
    )
    config = ctx.config
    found = 0
    for dev in devices:
        rule = config.decide(dev) if config is not None else None
        if rule is None or rule.block:
            continue
        for vm in confs:
            for entry in claims(vm, dev, mappings):
                found += 1
                name = f"{vm.vmid} ({vm.name})" if vm.name else str(vm.vmid)
                line = vm.lines.get(entry.key)
                where = f"{vm.path}:{line}" if line else vm.path
                via = f" through mapping {entry.mapping}" if entry.mapping else ""
                rule_where = f"{config.path}:{rule.line}" if config and rule.line else "config"
                yield Finding(
                    LAYER,
                    CHECK,
                    Severity.ERROR,
                    f"{dev.port} ({dev.vidpid}) is claimed twice: Proxmox VM {name} "
                    f"{entry.key}{via} and vmplug rule #{rule.index + 1} ({rule.target})",
                    evidence=(
                        f"{where}: {entry.key}: {entry.raw}",
                        f"{rule_where}: [[rule]] match = {rule.rule.source!r}, {rule.target}",
                    ),
                    fix=(
                        f"let Proxmox hold it: leave it out of vmplug's rules (or block = true), "
                        f"or let vmplug hold it: qm set {vm.vmid} --delete {entry.key}"
                    ),
                    subject=dev.port,
                )
    if not found:
        yield Finding(
            LAYER,
            CHECK,
            Severity.OK,
            f"{len(confs)} Proxmox VM configs in {etc}: no device is claimed both by a "
            "usbN line and by a vmplug rule",
        )


CHECKS = (CheckSpec(LAYER, CHECK, check_double_claims),)
