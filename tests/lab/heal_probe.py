"""Run inside the lab guest (as root): vmplug's daemon on the guest's real
kernel (``/sys``, its netlink uevents, ``/dev/bus/usb``), no VM, a journal in
the guest's /tmp; print what happened as JSON.  Usage:

* ``heal_probe.py overflow RCVBUF BURST PORT`` -- the daemon's uevent socket
  with a receive buffer of RCVBUF bytes (``VMPLUG_UEVENT_RCVBUF``; 0: the
  default 16 MB).  While its loop is busy (blocked, as under load), BURST
  ``change`` uevents are written for PORT's device and PORT's hub port is
  disabled and enabled (the device leaves and comes back with a new address:
  uevents that carry a state change).  Then the loop runs again: it reads what
  the socket kept.  Printed: the ENOBUFS count, the journal's kinds after the
  burst, PORT's address before/after in sysfs and in the daemon's inventory,
  and whether the inventory equals a fresh read of /sys.
* ``rungs ALLOWED_PCI PORT_ALLOWED PORT_REFUSED`` -- the healer's own
  ``carry_out`` of the port-cycle rung for PORT_ALLOWED and of the controller
  rung for PORT_ALLOWED (its controller is in ``[heal] controllers``) and for
  PORT_REFUSED (its controller is not); what was journaled and each device's
  address before and after.  An ``[[alert]]`` (``heal_failed``) posts to a
  webhook server the probe runs on the guest's loopback: the refused rung's
  alert is what it received.  Last, the ladder is turned on and a record is
  written to the real ``/dev/kmsg`` (``<3>usb PORT: device descriptor
  read/64, error -110``, as the hub driver words it): the healer reads it back
  from the kernel's log and answers it with a rung.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from vmplug.config import parse_config
from vmplug.daemon.heal import Decision, Rung
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import NetlinkEventSource
from vmplug.host.inventory import read_devices
from vmplug.host.usbctl import port_of

SYS = Path("/sys")


def devnum(port: str) -> int | None:
    try:
        return int((SYS / "bus/usb/devices" / port / "devnum").read_text())
    except OSError:
        return None


def wait_present(port: str, timeout: float = 30.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = devnum(port)
        if n is not None:
            return n
        time.sleep(0.1)
    return None


async def daemon(tmp: Path, config: str) -> tuple[Daemon, Store, NetlinkEventSource]:
    path = tmp / "vmplug.toml"
    path.write_text(config)
    store = Store(tmp / "journal.db")
    source = NetlinkEventSource("kernel")
    d = Daemon(parse_config(config, path), sysfs_root=SYS, source=source, store=store,
               config_path=path)  # fmt: skip
    await d.start()
    return d, store, source


async def overflow(tmp: Path, rcvbuf: int, burst: int, port: str) -> dict[str, Any]:
    if rcvbuf:
        os.environ[NetlinkEventSource.RECEIVE_BUFFER_ENV] = str(rcvbuf)
    d, store, source = await daemon(tmp, "")
    await asyncio.sleep(1.0)
    before = devnum(port)
    mark = max((e.id for e in store.history(None, limit=None)), default=0)
    ref = port_of(port)
    disable = ref.disable_path(SYS)
    script = (
        f"for i in $(seq {burst}); do echo change > {SYS}/bus/usb/devices/{port}/uevent; done; "
        f"echo 1 > {disable}; sleep 0.5; echo 0 > {disable}"
    )
    # the loop is blocked meanwhile: nothing reads the socket, the kernel queues
    subprocess.run(["sh", "-c", script], check=True)
    after = wait_present(port)
    time.sleep(1.0)  # the new device's own uevents are sent
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:  # the loop reads what the socket kept
        await asyncio.sleep(0.5)
        dev = d.inventory.get(port)
        if dev is not None and dev.devnum == after and not d._host_queue:
            break
    await asyncio.sleep(1.0)
    kinds = [e.kind for e in store.history(None, limit=None) if e.id > mark]
    fresh = {x.port: x.devnum for x in read_devices(SYS) if not x.is_root_hub}
    mine = {p: x.devnum for p, x in d.inventory.items()}
    out = {
        "rcvbuf": rcvbuf, "burst": burst, "overflows": source.overflows,
        "overflow_journaled": kinds.count("overflow"), "rescans": kinds.count("rescan"),
        "removes": kinds.count("device-remove"), "before": before, "after": after,
        "inventory_devnum": d.inventory[port].devnum if port in d.inventory else None,
        "inventory_matches_sysfs": mine == fresh, "inventory": mine, "sysfs": fresh,
    }  # fmt: skip
    await d.stop()
    store.close()
    return out


async def rungs(tmp: Path, allowed_pci: str, ok_port: str, refused_port: str) -> dict[str, Any]:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = f"""
[vm.x]
qmp = "{tmp}/no-such-vm.sock"

[heal]
enabled = false
controllers = ["{allowed_pci}"]

[[alert]]
name = "rung-failed"
heal_failed = true
clear_after_s = 600
webhook = "http://127.0.0.1:{hook_port}/hook"

[[rule]]
attach = "x"
match = 'via-port "{ok_port}"'

[[rule]]
attach = "x"
match = 'via-port "{refused_port}"'
"""
    d, store, _ = await daemon(tmp, config)
    healer = d.remedies.healer if d.remedies else None
    assert healer is not None
    out: dict[str, Any] = {}

    async def step(name: str, port: str, rung: Rung) -> None:
        wait_present(port)
        for _ in range(120):  # the daemon has read it again (slow under TCG and load)
            await asyncio.sleep(0.25)
            if port in d.inventory:
                break
        dev = d.inventory[port]
        before = devnum(port)
        # the rung runs in a thread: the daemon journals the kernel's uevents meanwhile
        since = max(e.id for e in store.history(None, limit=None))
        ok = await healer.carry_out(Decision(dev.identity, rung, f"lab: {name}", 5))
        after = wait_present(port)
        await asyncio.sleep(2.0)  # the daemon follows the kernel's uevents again
        rows = store.history(None, limit=None)
        entry = [e for e in rows if e.identity == dev.identity and e.kind.startswith("heal")]
        removed = [e for e in rows if e.id > since and e.port == port and e.kind == "device-remove"]
        out[name] = {
            "port": port, "controller": dev.controller, "ok": ok, "before": before,
            "after": after, "journal": entry[-1].kind if entry else None,
            "detail": entry[-1].detail if entry else None, "removed": len(removed),
        }  # fmt: skip

    await step("controller", ok_port, Rung.CONTROLLER)
    await step("refused", refused_port, Rung.CONTROLLER)
    for _ in range(40):  # the alerter's tick is 1 s
        if got:
            break
        await asyncio.sleep(0.25)
    out["webhook"] = list(got)
    # a port error in the real kernel log, read back from /dev/kmsg by the healer
    policy = healer.policy
    healer.policy = replace(policy, enabled=True, interval_s=0.2)
    ident = d.inventory[ok_port].identity
    n = len([e for e in store.history(ident, limit=None) if e.kind.startswith("heal")])
    Path("/dev/kmsg").write_text(f"<3>usb {ok_port}: device descriptor read/64, error -110\n")
    heals: list[Any] = []
    for _ in range(120):
        await asyncio.sleep(0.25)
        heals = [e for e in store.history(ident, limit=None) if e.kind.startswith("heal")][n:]
        if heals:
            break
    healer.policy = policy
    errors = [e for e in store.history(None, limit=None) if e.kind == "kernel-error"]
    out["kmsg"] = {
        "kernel_errors": [(e.port, e.identity == ident, e.detail) for e in errors],
        "heal": (heals[0].kind, heals[0].detail) if heals else None,
    }
    # last: on a hub that cannot cut power the device may not come back
    await step("port_cycle", ok_port, Rung.PORT_CYCLE)
    await d.stop()
    store.close()
    await runner.cleanup()
    return out


def main() -> int:
    mode = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="heal-probe-") as tmp:
        if mode == "overflow":
            rcvbuf, burst, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
            out = asyncio.run(overflow(Path(tmp), rcvbuf, burst, port))
        elif mode == "rungs":
            out = asyncio.run(rungs(Path(tmp), sys.argv[2], sys.argv[3], sys.argv[4]))
        else:
            print(f"unknown mode {mode!r}", file=sys.stderr)
            return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
