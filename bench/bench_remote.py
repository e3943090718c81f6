"""Remote devices (issue 13): what the usbredir-over-mutual-TLS path costs.

Two parts, in one run (``--part relay``, ``--part lab`` or both):

**relay** (this host, loopback): the device host's TLS end, vmplug's own
relay (:class:`vmplug.remote.export.ExportEndpoint` in a process of its own)
against ``stunnel`` (verify = 2, the same certificates) doing the same job.
A TLS client (Python's ssl, in this process) streams ``--mb`` MB through the
TLS end to a plaintext sink on loopback that echoes nothing back (bulk IN
would be the same work in the other direction).  Measured: throughput, and
the TLS end's CPU seconds per MB relayed (its /proc/PID/stat utime+stime
before and after).  The client's own encryption is not counted.

**lab** (two real Linux guests under TCG, tests/remote/labrig.py): the device
host guest with an emulated keyboard and stick exports them; the VM guest's
QEMU takes them over ``usb-redir``.  Measured: replug on the device host ->
bound in the VM's kernel (median/p99 over ``--replugs``), the stick's bulk
read inside the VM (remote), CPU of the export side per MB relayed, and the
recovery time after a network cut; next to the local baseline (see
:func:`bench_local`): the same QEMU devices ``device_add``-ed straight into
the VM guest's QEMU, replugged as often and read the same way, and the
ratios remote/local.

**Live audio over usbredir.** QEMU's usb-redir buffers isochronous
transfers, about 60 ms per iso endpoint (hw/usb/redirect.c fills a buffer of
packets before it starts an iso stream).  Monitoring *through the VM*
(input -> DAW in the VM -> output) crosses two iso endpoints, so it adds at
least 2 x 60 ms = 120 ms on top of the DAW's own buffers and the network's
round trip: unusable for live monitoring.  Playback and recording are fine
(the delay is constant and the DAW compensates it); monitor with the audio
interface's own direct monitoring, or keep the interface on the VM's host.

**Network cut**: the lab part cuts the device host guest's link for
``--cut`` seconds and times, from the network's return, the keyboard bound
again in the VM's kernel and the stick readable again.  The same recovery
with ``vmplug run`` on both sides, beside the bare endpoint, over several
cuts in network namespaces: ``bench/bench_remote_faults.py``.

Prints one JSON object (``--json``) or a readable summary.  Run from the
repository root: ``.venv/bin/python -m bench.bench_remote [--part relay]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from vmplug.remote import certs

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


RELAY_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from vmplug.remote.export import ExportEndpoint, TcpSource
    from vmplug.wire.tls import server_context
    d, port, sink = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    async def main():
        tls = server_context(d / "ca-cert.pem", d / "devhost-cert.pem", d / "devhost-key.pem")
        ep = ExportEndpoint("bench", TcpSource("127.0.0.1", sink), host="127.0.0.1",
                            port=port, tls=tls, allow=frozenset({"vmhost"}))
        await ep.start()
        await asyncio.Event().wait()
    asyncio.run(main())
    """
)


async def _sink(counter: list[int], done: asyncio.Event, expect: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # cancelled at the run's end while the TLS end still holds the stream: that is the end
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while data := await reader.read(1 << 20):
                counter[0] += len(data)
                if counter[0] >= expect:
                    done.set()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _push(port: int, ctx: ssl.SSLContext, total: int, sink_done: asyncio.Event) -> float:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    block = os.urandom(64 * 1024)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    await asyncio.wait_for(sink_done.wait(), 120)
    took = time.perf_counter() - t0
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return took


def _measure(
    name: str, argv: list[str], port: int, pki: Path, total: int, sink_port_box: list[int]
) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        counter = [0]
        done = asyncio.Event()
        sink = await _sink(counter, done, total)
        sink_port_box[0] = int(sink.sockets[0].getsockname()[1])
        proc = subprocess.Popen(
            [a.replace("{SINK}", str(sink_port_box[0])) for a in argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.to_thread(wait_listening, port)
            ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
            ctx.load_cert_chain(str(pki / "vmhost-cert.pem"), str(pki / "vmhost-key.pem"))
            cpu0 = cpu_seconds(proc.pid)
            took = await _push(port, ctx, total, done)
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.kill()
            proc.wait()
            sink.close()
        mb = total / 1e6
        return {
            "tls_end": name,
            "mb": round(mb, 1),
            "seconds": round(took, 3),
            "mb_per_s": round(mb / took, 1),
            "cpu_s_per_mb": round(cpu / mb, 5),
            "cpu_share": round(cpu / took, 2),
        }

    return asyncio.run(run())


def bench_relay(mb: int, rounds: int) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="vmplug-bench-remote-"))
    try:
        pki = tmp / "pki"
        certs.make_ca(pki)
        certs.issue(pki, "devhost", addresses=["127.0.0.1"])
        certs.issue(pki, "vmhost")
        total = mb * 1_000_000
        results: list[dict[str, Any]] = []
        box = [0]
        for _ in range(rounds):
            port = free_port()
            argv = [sys.executable, "-c", RELAY_SERVER, str(pki), str(port), "{SINK}"]
            results.append(_measure("vmplug", argv, port, pki, total, box))
            stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
            if stunnel is None:
                continue
            port = free_port()
            conf = tmp / f"stunnel-{port}.conf"
            # the sink's port is known only inside _measure: stunnel gets it via a wrapper
            wrapper = tmp / f"stunnel-{port}.sh"
            wrapper.write_text(
                "#!/bin/sh\n"
                f"cat > {conf} <<EOF\n"
                "foreground = yes\npid =\nsyslog = no\ndebug = 0\n"
                f"[usbredir]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:$1\n"
                f"cert = {pki}/devhost-cert.pem\nkey = {pki}/devhost-key.pem\n"
                f"CAfile = {pki}/ca-cert.pem\nverifyChain = yes\nrequireCert = yes\n"
                "EOF\n"
                f"exec {stunnel} {conf}\n"
            )
            wrapper.chmod(0o755)
            results.append(_measure("stunnel", [str(wrapper), "{SINK}"], port, pki, total, box))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_lab(
    replugs: int, read_mb: int, cut_seconds: float, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The lab part; ``out`` receives each result as soon as it is measured."""
    from tests.remote.labrig import KBD, STICK, RemoteLab  # noqa: PLC0415 - the lab part only
    from vmplug.vms.qmp import QmpVm  # noqa: PLC0415
    from vmplug.wire.qmp import SyncQmp  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="vmplug-bench-lab-"))
    lab = RemoteLab(root, (KBD, STICK))
    out = {} if out is None else out
    try:
        t0 = time.monotonic()
        lab.boot()
        out["boot_s"] = round(time.monotonic() - t0, 1)
        serve = lab.start_export()

        async def attach() -> None:
            vm = QmpVm("vm", str(lab.vm_qmp))
            await vm.start()
            assert await vm.wait_connected(30)
            for remote in (KBD, STICK):
                await vm.attach(remote.dev_id, lab.spec(remote))
            await vm.stop()

        asyncio.run(attach())
        for remote in (KBD, STICK):
            lab.wait_in_guest(remote)

        # replug on the device host -> attached in the VM's QEMU (QOM, host clock)
        # -> bound in the VM's kernel (the guest agent's answer, host clock)
        qom_path = f"/machine/peripheral/{KBD.dev_id}"
        to_qom: list[float] = []
        to_kernel: list[float] = []
        with SyncQmp(lab.vm_qmp, timeout=30) as qmp:

            def attached() -> bool:
                return qmp.execute("qom-get", {"path": qom_path, "property": "attached"}) is True

            for _ in range(replugs):
                lab.dev.unplug(KBD.lab.id)
                lab.wait_in_guest(KBD, present=False)
                t = time.monotonic()
                lab.dev.hotplug(KBD.lab)
                while not attached():
                    if time.monotonic() - t > 120:
                        raise RuntimeError("the replugged keyboard never reached the VM's QEMU")
                    time.sleep(0.02)
                to_qom.append(time.monotonic() - t)
                lab.wait_in_guest(KBD)
                to_kernel.append(time.monotonic() - t)

        def summary(values: list[float]) -> dict[str, float]:
            return {
                "n": len(values),
                "median": round(statistics.median(values), 2),
                "p99": round(_pct(values, 0.99), 2),
                "min": round(min(values), 2),
                "max": round(max(values), 2),
            }

        out["replug_to_attached_in_vm_qemu_s"] = summary(to_qom)
        out["replug_to_bound_in_vm_kernel_s"] = summary(to_kernel)

        # bulk read of the stick: in the VM (remote) and in the device host (local)
        def disk(guest: Any) -> str:
            res = guest.run(
                "for i in $(seq 1 300); do for b in /sys/block/sd*; do [ -e $b ] && "
                "echo /dev/${b##*/} && exit 0; done; sleep 0.2; done; exit 1",
                timeout=300,
                check=True,
            )
            return str(res.stdout.split()[0])

        def read(guest: Any, dev: str) -> float:
            res = guest.run(
                f"s=$(date +%s.%N); dd if={dev} of=/dev/null bs=1M count={read_mb} "
                "iflag=direct 2>/dev/null; e=$(date +%s.%N); echo $s $e",
                timeout=900,
                check=True,
            )
            start, end = (float(x) for x in res.stdout.split())
            return read_mb * 1.048576 / (end - start)

        def cpu_ticks() -> float:
            res = lab.dev.run(f"awk '{{print $14+$15}}' /proc/{serve.pid}/stat", check=True)
            return float(res.stdout.strip())

        # (not in the device host: its kernel has no disk while usbredirect holds the stick)
        vm_disk = disk(lab.vm)
        cpu0 = cpu_ticks()
        remote_mbs = read(lab.vm, vm_disk)
        cpu1 = cpu_ticks()
        out["stick_read_mb_per_s"] = {
            "remote_usbredir_in_vm": round(remote_mbs, 2),
            "mb": read_mb,
        }
        # the export process alone (its usbredirects are children, not counted)
        out["export_cpu_s_per_mb_tcg"] = round((cpu1 - cpu0) / 100 / (read_mb * 1.048576), 4)

        # network cut -> devices back and the stick readable again
        lab.set_link(False)
        time.sleep(cut_seconds)
        lab.set_link(True)
        t = time.monotonic()
        lab.wait_in_guest(KBD, timeout=180)
        kbd_back = round(time.monotonic() - t, 2)
        res = lab.vm.run(
            f"timeout 90 dd if={vm_disk} of=/dev/null bs=64k count=16 iflag=direct", timeout=120
        )
        out["recovery_after_cut_s"] = {
            "cut_s": cut_seconds,
            "keyboard_bound_s": kbd_back,
            "stick_read_ok": res.rc == 0,
            "stick_read_s": round(time.monotonic() - t, 2),
        }
        if res.rc != 0:
            out["after_cut_vm_dmesg"] = lab.vm.run("dmesg | tail -30", timeout=60).stdout
            out["after_cut_export_log"] = lab.serve_log.read_text()[-3000:]
        bench_local(lab, replugs, out, summary, read)
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def bench_local(lab: Any, replugs: int, out: dict[str, Any], summary: Any, read: Any) -> None:
    """The baseline: the same emulated devices hot-plugged straight into the
    VM guest's own QEMU (``device_add``, no redirection).  The issue asks for
    local ``usb-host``, but the VM guest's host has no USB devices of its own
    to pass through; device_add of the same QEMU device is the local path
    with no usbredir, no network and no device host in it (usb-host would add
    its own libusb hop, so this is the faster, stricter baseline)."""
    from tests.remote.labrig import KBD, Remote  # noqa: PLC0415 - the lab part only
    from vmplug.wire.qmp import SyncQmp  # noqa: PLC0415
    from vmplug_lab.guest import LabDevice  # noqa: PLC0415

    local_kbd = Remote(LabDevice("usb-kbd", "xhci.0", "3", "localkbd"), "", KBD.ids, "usbhid", 0)
    with SyncQmp(lab.vm_qmp, timeout=30) as qmp:
        # the remote keyboard has the same ids: take it out of the VM first
        qmp.execute("device_del", {"id": KBD.dev_id})
        qmp.wait_event("DEVICE_DELETED", 60, device=KBD.dev_id)
        lab.wait_in_guest(KBD, present=False)
        took: list[float] = []
        for _ in range(replugs):
            t = time.monotonic()
            qmp.execute(
                "device_add", {"driver": "usb-kbd", "id": "localkbd", "bus": "xhci.0", "port": "3"}
            )
            lab.wait_in_guest(local_kbd)
            took.append(time.monotonic() - t)
            qmp.execute("device_del", {"id": "localkbd"})
            qmp.wait_event("DEVICE_DELETED", 60, device="localkbd")
            lab.wait_in_guest(local_kbd, present=False)
        out["local_device_add_to_bound_in_vm_kernel_s"] = summary(took)
        before = set(lab.vm.run("ls /sys/block", check=True).stdout.split())
        img = lab.root / "vm" / "local-stick.img"
        with img.open("wb") as f:
            f.truncate(16 * 1024 * 1024)
        qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "localdisk",
                "file": {"driver": "file", "filename": str(img)},
            },
        )
        qmp.execute(
            "device_add",
            {"driver": "usb-storage", "id": "localstick", "bus": "xhci.0", "drive": "localdisk"},
        )
        res = lab.vm.run(
            'for i in $(seq 1 300); do for b in $(ls /sys/block); do case " '
            + " ".join(sorted(before))
            + ' " in '
            '*" $b "*) ;; *) echo /dev/$b; exit 0;; esac; done; sleep 0.2; done; exit 1',
            timeout=120,
            check=True,
        )
    local_disk = res.stdout.split()[0]
    out["stick_read_mb_per_s"]["local_device_add_in_vm"] = round(read(lab.vm, local_disk), 2)
    remote, local = (
        out["replug_to_bound_in_vm_kernel_s"],
        out["local_device_add_to_bound_in_vm_kernel_s"],
    )
    reads = out["stick_read_mb_per_s"]
    out["ratios_remote_over_local"] = {
        "replug_median": round(remote["median"] / local["median"], 2),
        "replug_p99": round(remote["p99"] / local["p99"], 2),
        "read_throughput": round(
            reads["remote_usbredir_in_vm"] / reads["local_device_add_in_vm"], 4
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("relay", "lab", "all"), default="all")
    ap.add_argument("--mb", type=int, default=200, help="MB per relay run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replugs", type=int, default=20)
    ap.add_argument("--read-mb", type=int, default=16)
    ap.add_argument("--cut", type=float, default=10.0, help="seconds the network stays cut")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.part in ("relay", "all"):
        result["relay"] = bench_relay(args.mb, args.rounds)
    if args.part in ("lab", "all"):
        lab: dict[str, Any] = {}
        result["lab"] = lab
        try:
            lab.update(bench_lab(args.replugs, args.read_mb, args.cut, lab))
        except Exception as exc:  # a later stage failed: keep what was measured
            lab["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result.get("relay", []):
            print(
                f"relay {row['tls_end']:8} {row['mb_per_s']:7.1f} MB/s  "
                f"{row['cpu_s_per_mb'] * 1000:6.2f} ms CPU/MB  ({row['mb']} MB)"
            )
        if "lab" in result:
            print(json.dumps(result["lab"], indent=2))
        load = f"{result['load_before']:.2f} -> {result['load_after']:.2f}"
        print(f"load {load} on {result['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
