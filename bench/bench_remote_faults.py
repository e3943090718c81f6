"""Recovery time after a network cut, remote devices (issue 13), in one run:

* **daemons**: ``vmplug run`` as the device host and as the VM host, each in a
  network namespace, a real QEMU beside the VM host (tests/remote/faultrig.py).
  Each cut takes the VM host's link down for ``--cut`` s (longer than the 10 s
  the endpoint and the VM host's poll wait), then up.  Measured: network back
  -> the device in the guest's bus again (QEMU's QOM ``attached``, read through
  QEMU's own second QMP socket), and cut -> the device host shown ``down`` in
  the VM host's ``vmplug status``.
* **bare endpoint**: the same cut with no daemon: a real QEMU holding a
  ``usb-redir`` to an :class:`~vmplug.remote.export.ExportEndpoint` in the
  other namespace (link_timeout 10 s), QEMU's own reconnect only (the rig of
  tests/remote/test_netns_faults.py).  The ratio daemons / bare is what the
  daemons' way back (poll retry, detach, attach) costs over QEMU's reconnect.

Prints a readable summary, or one JSON object with ``--json``.  Run from the
repository root as root: ``.venv/bin/python -m bench.bench_remote_faults [--cuts 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.remote.faultrig import (
    FaultRig,
    NetnsQemu,
    netns_possible,
    until,
    veth_pair,
)
from tests.support.usbredir_device import UsbredirDevice
from vmplug.remote import certs
from vmplug.remote.export import ExportEndpoint, TcpSource
from vmplug.vms.base import UsbRedirSpec
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp
from vmplug.wire.tls import server_context


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _summary(xs: list[float]) -> dict[str, float]:
    return {"p50_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3)}


def daemons(tmp: Path, cuts: int, cut_s: float) -> dict[str, Any]:
    rig = FaultRig(tmp / "daemons", f"b{os.getpid() % 10000}")
    back: list[float] = []
    shown: list[float] = []
    try:
        a = rig.add_vmhost("vmhost-a", 1)
        rig.devhost.start()
        a.proc.start()
        until(lambda: rig.attached_in(a.name), "attached", 60, a.proc)
        for _ in range(cuts):
            t0 = time.monotonic()
            a.pair.link_down()
            try:
                shown.append(
                    until(
                        lambda: a.proc.json("status")["remote_hosts"][0]["state"] == "down",
                        "down in status",
                        30,
                        a.proc,
                    )
                )
                time.sleep(max(0.0, cut_s - (time.monotonic() - t0)))
            finally:
                a.pair.link_up()
            back.append(until(lambda: rig.attached_in(a.name), "back", 60, a.proc))
        rows = [r["kind"] for r in a.proc.history()]
        return {
            "back_after_restore": _summary(back),
            "down_in_status_after_cut": _summary(shown),
            "samples_s": [round(x, 3) for x in back],
            "streams_served": rig.connects_sent(),
            "journal_attach": rows.count("attach"),
            "journal_remote_host_down": rows.count("remote-host-down"),
        }
    finally:
        rig.close()


async def _bare(tmp: Path, cuts: int, cut_s: float) -> dict[str, Any]:
    tag = f"{os.getpid() % 10000}"
    root = tmp / "bare"
    certs.make_ca(root / "ca")
    dev_files = certs.issue(root / "ca", "devhost", root / "devhost", addresses=["10.214.0.2"])
    vm_files = certs.issue(root / "ca", "vmhost", root / "vmhost")
    qemu_tls = certs.qemu_client_dir(vm_files, root / "qemu")
    device = UsbredirDevice()
    await device.start()
    back: list[float] = []
    with veth_pair(f"vmbv{tag}", f"vmbd{tag}", "10.214.0.1", "10.214.0.2") as pair:
        pair.exec(pair.dev, "sysctl", "-q", "-w", "net.ipv4.tcp_orphan_retries=1")
        ep = ExportEndpoint(
            "kbd",
            TcpSource("127.0.0.1", device.port),
            host="10.214.0.2",
            port=7101,
            tls=server_context(dev_files.ca, dev_files.cert, dev_files.key),
            allow=frozenset({"vmhost"}),
        )
        qemu = NetnsQemu(root, pair.vm)
        vm = QmpVm("vm", qemu.qmp_path)
        try:
            with pair.inside(pair.dev):
                await ep.start()
            qemu.start()
            with SyncQmp(str(qemu.qmp_paths[1])) as q:
                q.execute("cont")
            await vm.start()
            await vm.wait_connected(10)
            dev = "vmplug-bench0001"
            await vm.attach(dev, UsbRedirSpec("10.214.0.2", 7101, "devhost", str(qemu_tls)))

            async def attached() -> bool:
                seen = await vm.observe()
                return dev in seen and seen[dev].attached is True

            async def wait_for(check: bool) -> float:
                t0 = time.monotonic()
                while await attached() != check:
                    if time.monotonic() - t0 > 60:
                        raise AssertionError("bare endpoint: no recovery in 60 s")
                    await asyncio.sleep(0.05)
                return time.monotonic() - t0

            await wait_for(True)
            for _ in range(cuts):
                pair.link_down()
                await asyncio.sleep(cut_s)
                t0 = time.monotonic()
                pair.link_up()
                await wait_for(False)  # the FIN arrives: the guest sees the unplug
                await wait_for(True)
                back.append(time.monotonic() - t0)
        finally:
            await vm.stop()
            qemu.cleanup()
            await ep.stop()
            await device.stop()
    return {"back_after_restore": _summary(back), "samples_s": [round(x, 3) for x in back]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--cuts", type=int, default=3)
    ap.add_argument("--cut", type=float, default=14.0, help="seconds each cut lasts (> 10)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reason = netns_possible()
    if reason:
        print(f"bench_remote_faults: {reason}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"cuts": args.cuts, "cut_s": args.cut, "load_before": _load()}
    with tempfile.TemporaryDirectory(prefix="vmplug-bench-faults") as d:
        out["daemons"] = daemons(Path(d), args.cuts, args.cut)
        out["bare_endpoint"] = asyncio.run(_bare(Path(d), args.cuts, args.cut))
    out["load_after"] = _load()
    dp50 = out["daemons"]["back_after_restore"]["p50_s"]
    bp50 = out["bare_endpoint"]["back_after_restore"]["p50_s"]
    out["ratio_p50_daemons_over_bare"] = round(dp50 / bp50, 2) if bp50 else None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    dm, bm = out["daemons"], out["bare_endpoint"]
    print(
        f"network cut of {args.cut:g} s, {args.cuts} cuts (load {out['load_before']} -> "
        f"{out['load_after']})"
    )
    print(
        f"  daemons (vmplug run both sides): network back -> device in the guest's bus "
        f"p50 {dm['back_after_restore']['p50_s']:.2f} s, "
        f"max {dm['back_after_restore']['max_s']:.2f} s"
        f"; cut -> 'down' in vmplug status p50 {dm['down_in_status_after_cut']['p50_s']:.1f} s"
    )
    print(
        f"  bare endpoint (QEMU's reconnect only): p50 {bm['back_after_restore']['p50_s']:.2f} s, "
        f"max {bm['back_after_restore']['max_s']:.2f} s"
    )
    print(f"  ratio daemons / bare (p50): {out['ratio_p50_daemons_over_bare']}")
    print(
        f"  journal: {dm['journal_attach']} attach, {dm['journal_remote_host_down']} "
        f"remote-host-down; streams served {dm['streams_served']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
