"""Two real Linux guests for the remote-device proof (tests/remote, bench/bench_remote.py).

* ``dev``: the device host.  A lab guest (:class:`vmplug_lab.guest.LabGuest`)
  with emulated ``usb-kbd``, ``usb-storage`` and ``usb-audio``; its user
  network forwards host loopback port :attr:`RemoteLab.port` (and the next
  ones) to the export endpoints inside it, where ``python -m
  vmplug.remote.serve`` runs ``usbredirect`` per device and speaks mutual TLS.
* ``vm``: the VM.  A second lab guest with no devices of its own and an
  extra QMP socket for vmplug (:attr:`RemoteLab.vm_qmp`); vmplug's
  :class:`~vmplug.vms.qmp.QmpVm` attaches the remote devices there
  (``usb-redir`` on a TLS chardev to ``127.0.0.1:PORT``), and the proof is
  that guest's own kernel, read through its guest agent.

Everything is stopped by PID in :meth:`RemoteLab.close`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmplug.remote import certs
from vmplug.vms.base import UsbRedirSpec
from vmplug_lab.guest import GuestProcess, LabDevice, LabError, LabGuest

GUEST_IP = "10.0.2.15"


@dataclass(frozen=True)
class Remote:
    """One exported device: its lab device, its sysfs port path on the
    device host, its ids, the driver its interface binds in the VM's kernel."""

    lab: LabDevice
    port_path: str
    ids: str  # vendor:product as sysfs shows them
    driver: str
    index: int  # its endpoint is port + index

    @property
    def name(self) -> str:
        return self.lab.id

    @property
    def dev_id(self) -> str:
        return f"vmplug-r-{self.lab.id}"


KBD = Remote(LabDevice("usb-kbd", "xhci.0", "1", "kbd1"), "2-1", "0627:0001", "usbhid", 0)
STICK = Remote(
    LabDevice("usb-storage", "ehci.0", "1", "stick1", {"serial": "REMOTESTICK1"}),
    "1-1",
    "46f4:0001",
    "usb-storage",
    1,
)
AUDIO = Remote(
    LabDevice("usb-audio", "xhci.0", "2", "audio1"), "2-2", "46f4:0002", "snd-usb-audio", 2
)
REMOTES = (KBD, STICK, AUDIO)


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count >= 65535:
            continue
        free = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    free = False
                    break
        if free:
            return base
    raise LabError("no free loopback ports")


class RemoteLab:
    def __init__(
        self, root: Path, remotes: tuple[Remote, ...] = REMOTES, *, same_ports: bool = False
    ) -> None:
        """``same_ports``: the device host's ports are the host's (``vmplug run``
        with ``[export] ports`` = :attr:`port`.. and its API on :attr:`api_port`,
        both forwarded as they are), not 7100.. (``vmplug.remote.serve``)."""
        self.root = root
        self.remotes = remotes
        self.port = _free_ports(len(remotes) + 1)
        #: the device host's API port (forwarded with ``same_ports``)
        self.api_port = self.port + len(remotes)
        guest_base = self.port if same_ports else 7100
        pki = root / "dev" / "pki"
        certs.make_ca(pki)
        certs.issue(pki, "devhost", addresses=["127.0.0.1"])
        self.vmhost = certs.issue(pki, "vmhost", root / "vmpki")
        self.tls_dir = certs.qemu_client_dir(self.vmhost, root / "qemu-tls")
        forwards = [(self.port + r.index, guest_base + r.index) for r in remotes]
        if same_ports:
            forwards.append((self.api_port, self.api_port))
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-{GUEST_IP}:{g}" for h, g in forwards)
        self.dev = LabGuest(
            [r.lab for r in remotes],
            root / "dev",
            extra_qemu_opts=[
                "-netdev",
                f"user,id=labnet,restrict=on,{fwd}",
                "-device",
                "virtio-net-pci,netdev=labnet,id=labnic",
            ],
        )
        self.vm_qmp = root / "vm" / "vmplug.sock"
        self.vm = LabGuest(
            [], root / "vm", extra_qemu_opts=["-qmp", f"unix:{self.vm_qmp},server=on,wait=off"]
        )
        self.serve: GuestProcess | None = None
        self.status_path = root / "dev" / "export.json"
        self.serve_log = root / "dev" / "serve.log"

    # -- life cycle -------------------------------------------------------------

    def boot(self) -> None:
        """Boot both guests at once (two TCG guests: about a minute on a busy machine)."""
        errors: list[BaseException] = []

        def start(guest: LabGuest) -> None:
            try:
                guest.start()
            except BaseException as exc:  # reported below, after both boots
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(g,)) for g in (self.dev, self.vm)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        self.dev.run(
            "ip link set lo up; n=$(ls /sys/class/net | grep -v '^lo$' | head -1); "
            f"ip link set $n up && ip addr add {GUEST_IP}/24 dev $n",
            timeout=60,
            check=True,
        )

    def close(self) -> None:
        for guest in (self.dev, self.vm):
            with contextlib.suppress(Exception):
                guest.stop()

    # -- the device host ----------------------------------------------------------

    def start_export(self) -> GuestProcess:
        devices = " ".join(
            f"--device {r.name}={r.port_path}:{7100 + r.index}" for r in self.remotes
        )
        cmd = (
            f"python3 -m vmplug.remote.serve --certs {self.root}/dev/pki --name devhost "
            f"--allow vmhost --listen {GUEST_IP} {devices} --status {self.status_path}"
        )
        self.status_path.unlink(missing_ok=True)
        self.serve = self.dev.spawn(cmd, log=str(self.serve_log))
        deadline = time.monotonic() + 180  # python in a TCG guest at load 15 takes minutes
        while not self.status_path.exists():
            if self.dev.poll(self.serve) is not None:
                raise LabError(f"export side exited: {self.serve_log.read_text()}")
            if time.monotonic() > deadline:
                raise LabError(f"export side not up in 180 s: {self.serve_log.read_text()}")
            time.sleep(0.2)
        return self.serve

    def kill_export(self, sig: int = 9) -> None:
        """Kill the export side (``kill -9``: its usbredirects are left to die
        on their own when their sockets close)."""
        if self.serve is not None:
            with contextlib.suppress(LabError):
                self.dev.kill(self.serve, sig)
            self.serve = None

    def export_status(self) -> list[dict[str, object]]:
        try:
            data = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def set_link(self, up: bool) -> None:
        """Cut (or restore) the device host's network: its NIC's link goes down."""
        self.dev.qmp.execute("set_link", {"name": "labnic", "up": up})

    # -- the VM -------------------------------------------------------------------

    def spec(self, remote: Remote) -> UsbRedirSpec:
        return UsbRedirSpec("127.0.0.1", self.port + remote.index, "devhost", str(self.tls_dir))

    def guest_devices(self) -> dict[str, dict[str, str]]:
        """USB devices in the VM's kernel: sysfs name -> ids, product, and the
        drivers bound to its interfaces."""
        script = (
            "for d in /sys/bus/usb/devices/*; do "
            "[ -f $d/idVendor ] || continue; n=${d##*/}; case $n in usb*) continue;; esac; "
            'drv=""; for i in $d/$n:*; do [ -e $i/driver ] && '
            'drv="$drv $(basename $(readlink $i/driver))"; done; '
            'echo "$n|$(cat $d/idVendor):$(cat $d/idProduct)|$(cat $d/product 2>/dev/null)|$drv"; '
            "done"
        )
        out = self.vm.run(script, timeout=60, check=True).stdout
        found: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            name, ids, product, drivers = [*line.split("|"), "", "", ""][:4]
            found[name] = {"ids": ids, "product": product, "drivers": drivers.strip()}
        return found

    def wait_in_guest(self, remote: Remote, present: bool = True, timeout: float = 90.0) -> float:
        """Until the VM's kernel has (or has not) a device with ``remote``'s ids
        with its driver bound; returns the seconds it took (host clock)."""
        vendor, product = remote.ids.split(":")
        test = (
            f"for d in /sys/bus/usb/devices/*; do "
            f'[ "$(cat $d/idVendor 2>/dev/null):$(cat $d/idProduct 2>/dev/null)" = '
            f'"{vendor}:{product}" ] || continue; '
            f"for i in $d/${{d##*/}}:*; do [ -e $i/driver ] && exit 0; done; done; exit 1"
        )
        loop = (
            f"end=$(( $(date +%s) + {int(timeout)} )); while [ $(date +%s) -lt $end ]; do "
            f"if sh -c {shlex.quote(test)}; then r=0; else r=1; fi; "
            f"[ $r = {0 if present else 1} ] && exit 0; sleep 0.05; done; exit 1"
        )
        t0 = time.monotonic()
        res = self.vm.run(loop, timeout=timeout + 30)
        if res.rc != 0:
            raise LabError(
                f"{remote.name} {'not' if present else 'still'} in the VM's kernel after "
                f"{timeout:g} s; VM sees {self.guest_devices()}; export: {self.export_status()}"
            )
        return time.monotonic() - t0
