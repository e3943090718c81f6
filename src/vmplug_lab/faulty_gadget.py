"""A USB stick that stops answering, made by the lab kernel, so the kernel logs
its own enumeration errors (the healer's ``kernel-error`` trigger).

The lab kernel (Debian 6.1) has no ``raw_gadget`` (``modinfo raw_gadget``: not
found), so the fault is made with what it has: ``dummy_hcd`` and
libcomposite's mass storage function (:mod:`vmplug_lab.gadgets`).  That
function completes a SET_CONFIGURATION from its worker, a kernel thread named
``file-storage`` that takes SIGTERM: the control request's status stage waits
for it (a "delayed status").  :func:`break_script` ends that thread.  The
device stays plugged in and still answers its descriptors (the composite core
does), but every configuration the host asks for times out, and the kernel
says so itself (seen in the lab guest, Linux 6.1)::

    usb 4-1: can't set config #1, error -110

after which the device is there, unconfigured.  :func:`ask_config_script`
makes the host ask again (``authorized`` 0 then 1, as the kernel does on any
re-enumeration); each time the same line.  A reconnection (the UDC's
``soft_connect``) finds endpoint 0 stuck for good::

    usb 4-1: device descriptor read/64, error -71
    usb 4-1: device not accepting address 6, error -71
    usb usb4-port1: unable to enumerate USB device

Only the lab uses this; nothing here is part of vmplug.
"""

from __future__ import annotations

import shlex

from vmplug_lab.gadgets import Gadget
from vmplug_lab.gadgets import setup_script as gadget_setup_script

#: where the scripts keep each gadget's worker thread id and backing file
STATE = "/tmp/faulty-gadget"


def _stick(name: str, serial: str) -> Gadget:
    # Linux's own gadget ids (1d6b:0104, "Multifunction Composite Gadget")
    return Gadget(
        name, 0x1D6B, 0x0104, 0x0100, "vmplug lab", "Faulty stick", serial,
        (("mass_storage.0", {"lun.0/file": f"{STATE}/{name}.img"}),),
    )  # fmt: skip


#: two of them: one a rule sends to a VM, one no rule routes
FAULTY: tuple[Gadget, ...] = (_stick("faulty1", "FAULTY0001"), _stick("faulty2", "FAULTY0002"))


def _record_thread(g: Gadget) -> list[str]:
    """After binding ``g``: the one new ``file-storage`` thread is its worker."""
    return [
        f"new=$(pgrep -x file-storage | grep -vxF -f {STATE}/known || true)",
        f'[ "$(echo "$new" | wc -w)" = 1 ] || {{ echo "{g.name}: worker not found" >&2; exit 1; }}',
        f"echo $new > {STATE}/{g.name}.pid",
        f"echo $new >> {STATE}/known",
    ]


def setup_script(gadgets: tuple[Gadget, ...] = FAULTY) -> str:
    """Shell: backing files, the gadgets on dummy_hcd (one UDC each), each
    gadget's worker thread id in ``STATE/NAME.pid``."""
    prep = [f"mkdir -p {STATE}", f"pgrep -x file-storage > {STATE}/known || true"]
    prep += [f"truncate -s 4M {STATE}/{g.name}.img" for g in gadgets]
    return "\n".join(prep) + "\n" + gadget_setup_script(gadgets, after_bind=_record_thread)


def port_script(g: Gadget) -> str:
    """Shell printing the host-side port (``4-1``) the gadget is on, by serial."""
    serial = shlex.quote(g.serial or "")
    return (
        "for d in /sys/bus/usb/devices/*; do "
        f'[ "$(cat $d/serial 2>/dev/null)" = {serial} ] && basename $d; done; true'
    )


def break_script(g: Gadget) -> str:
    """Shell: end the gadget's worker (SIGTERM) and wait until it is gone."""
    pidfile = f"{STATE}/{g.name}.pid"
    return (  # a subshell: its exit ends only itself
        f"(pid=$(cat {pidfile}) && kill -TERM $pid && "
        "for i in $(seq 100); do [ -d /proc/$pid ] || exit 0; sleep 0.1; done; "
        'echo "file-storage $pid did not exit" >&2; exit 1)'
    )


def ask_config_script(port: str) -> str:
    """Shell: the host configures the device at ``port`` again (``authorized``
    0, then 1: the kernel's SET_CONFIGURATION; the write of 1 fails with
    ETIMEDOUT when the device does not answer, hence ``|| true``)."""
    a = f"/sys/bus/usb/devices/{shlex.quote(port)}/authorized"
    return f"echo 0 > {a}; echo 1 > {a} 2>/dev/null || true"
