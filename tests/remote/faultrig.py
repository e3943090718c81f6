"""Network faults with the integrated daemons: ``vmplug run`` on a device host
and on one or two VM hosts, each in a network namespace the rig makes, each
VM host joined to the device host by a veth pair of its own (a /24 each:
:func:`vm_address`, :func:`dev_address`).

* The device host (namespace ``vmfd…``) is ``vmplug run`` with ``[export]``
  rules, its API and endpoints on mutual TLS on all its addresses (its
  certificate names each), a captured sysfs tree
  (:class:`~tests.support.fakekernel.FakeKernel`) whose device
  :data:`PORT` a rule lets go.  This machine's kernel has no USB, so the
  ``usbredirect`` the daemon starts for it is :func:`standin_main` (on the
  daemon's ``PATH``): it takes usbredirect's arguments, connects ``--to`` the
  endpoint's loopback port and speaks the device side of usbredir as
  :mod:`tests.support.usbredir_device` does (a HID keyboard), so QEMU's QOM
  ``attached`` is what the VM's bus really holds.  Every stream it served
  and every ``device_connect`` it sent is a line in a log the test reads.
* A VM host (namespace ``vmA``/``vmB``) is ``vmplug run`` with one
  ``[host.devhost]`` and ``via-host "devhost"``, and a real QEMU in the same
  namespace; QMP is a unix socket, so the test reads QEMU through a second
  one and each daemon through its API socket from the root namespace.

:class:`FaultRig` is shared by tests/remote/test_remote_faults_daemon.py and
bench/bench_remote_faults.py.  Everything it starts is stopped by PID in
:meth:`FaultRig.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.qemu_proc import QemuProcess
from tests.support.remoterig import vmhost_config
from tests.support.usbredir_device import CAPS, HELLO, announce
from tests.support.vmplugproc import VMPLUG, Proc, wait
from vmplug.remote import certs
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp

REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
#: the captured ``mixed`` tree's 0627:0001 that the device host's rule lets go
PORT = "2-2.4.2"
API_PORT = 7290
EXPORT_PORTS = (7300, 7330)
#: ``ExportEndpoint``'s default ``link_timeout`` (``vmplug run`` has no key for it)
LINK_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1
ORPHAN_RETRIES = "net.ipv4.tcp_orphan_retries=1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def netns_possible() -> str | None:
    """None when this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"vmpr{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"ip netns add failed: {exc}"
    ip("netns", "del", probe)
    return None


@dataclass
class Pair:
    """Two namespaces, ``vm`` and ``dev``, joined by a veth pair."""

    vm: str
    dev: str
    vm_if: str
    dev_if: str

    def exec(self, ns: str, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, timeout=20)

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """This thread in namespace ``ns`` (sockets made now stay in it)."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                yield
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")

    # the cuts the tests and the bench make
    def link_down(self) -> None:
        self.exec(self.vm, "ip", "link", "set", self.vm_if, "down")

    def link_up(self) -> None:
        self.exec(self.vm, "ip", "link", "set", self.vm_if, "up")


@contextlib.contextmanager
def veth_pair(
    vm: str, dev: str, vm_ip: str, dev_ip: str, *, dev_exists: bool = False, tag: str = ""
) -> Iterator[Pair]:
    """Namespace ``vm`` (made) and ``dev`` (made unless ``dev_exists``), joined by
    a veth pair with ``vm_ip``/``dev_ip`` in one /24 (the kernel's own prefix
    route, which comes back by itself after ``ip link set down``/``up``); the
    namespaces made are deleted afterwards."""
    made: list[str] = []
    vm_if, dev_if = f"{vm}v{tag}"[:15], f"{vm}d{tag}"[:15]
    try:
        for ns in (vm,) if dev_exists else (vm, dev):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", vm_if, "netns", vm, "type", "veth", "peer", dev_if, "netns", dev)
        for ns, ifname, addr in ((vm, vm_if, vm_ip), (dev, dev_if, dev_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            ip("-n", ns, "link", "set", ifname, "up")
        yield Pair(vm, dev, vm_if, dev_if)
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)


def vm_address(index: int) -> str:
    """VM host ``index``'s address on its link to the device host."""
    return f"10.213.{index}.1"


def dev_address(index: int) -> str:
    """The device host's address on its link to VM host ``index`` (it listens on all)."""
    return f"10.213.{index}.2"


class NetnsQemu(QemuProcess):
    """A QEMU started in a network namespace (``ip netns exec`` execs it: same PID)."""

    def __init__(self, tmp_path: Path, netns: str, **kw: Any) -> None:
        super().__init__(tmp_path, qmp_sockets=2, **kw)
        self.netns = netns

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().argv()]


class NetnsProc(Proc):
    """A ``vmplug run`` in a network namespace, with extra environment."""

    def __init__(
        self, tmp: Path, name: str, capture: str, config: str, netns: str, **env: str
    ) -> None:
        super().__init__(tmp, name, capture, config)
        self.netns = netns
        self.extra_env = env

    def env(self) -> dict[str, str]:
        return super().env() | self.extra_env

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *VMPLUG, "run", "--events", self.events],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        wait(self.sock.exists, f"{self.dir.name}'s API socket", self)

    @property
    def events(self) -> str:
        return f"replay:{self.kernel.fifo}"

    def kill9(self) -> None:
        """SIGKILL by PID, as a crash: its socket file stays behind, as in life."""
        self.stop(signal.SIGKILL)
        self.sock.unlink(missing_ok=True)

    def get(self, path: str) -> Any:
        """``GET path`` of the daemon's API on its unix socket (no network needed)."""
        conn = http.client.HTTPConnection("localhost", timeout=20)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(str(self.sock))
        conn.sock = sock
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, (resp.status, body[:300])
        return json.loads(body)

    def export_row(self) -> dict[str, Any]:
        """The device host's one export-list row (``GET /v1/export``)."""
        [row] = self.get("/v1/export")["devices"]
        return dict(row)

    def history(self) -> list[dict[str, Any]]:
        """``vmplug history --json`` (oldest first), from the daemon's SQLite."""
        rows: list[dict[str, Any]] = self.json("history", "-n", "2000")
        return rows


# -- the usbredirect stand-in ---------------------------------------------------


def standin_script(directory: Path, log: Path) -> Path:
    """A directory with an executable ``usbredirect`` that runs :func:`standin_main`."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "usbredirect"
    exe.write_text(
        "#!/bin/sh\n"
        f"VMPLUG_STANDIN_LOG='{log}' PYTHONPATH='{REPO}' "
        f'exec {sys.executable} -m tests.remote.faultrig "$@"\n'
    )
    exe.chmod(0o755)
    return directory


def _note(log: str, **item: Any) -> None:
    with open(log, "a") as f:  # one short line: appended whole (O_APPEND)
        f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **item}) + "\n")


def standin_main(argv: list[str]) -> int:
    """usbredirect's ``--device BUS-DEV --to HOST:PORT [--keepalive]``, serving
    a HID keyboard over usbredir until the stream ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the daemon that started it
    log = os.environ["VMPLUG_STANDIN_LOG"]
    args = dict(zip(argv[::2], argv[1::2], strict=False))
    device, to = args.get("--device"), args.get("--to")
    if device is None or to is None:
        print("usage: usbredirect --device BUS-DEV --to HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = to.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(None)
    _note(log, event="start", device=device)
    version = b"vmplug usbredirect stand-in".ljust(64, b"\0")
    sock.sendall(struct.pack("<III", HELLO, 68, 0) + version + struct.pack("<I", CAPS))
    head = _read(sock, 12)
    if head is None:
        _note(log, event="end", device=device, why="no hello")
        return 1
    kind, length, _id = struct.unpack("<III", head)
    if kind != HELLO or _read(sock, length) is None:
        _note(log, event="end", device=device, why="not a hello")
        return 1
    sock.sendall(announce())
    _note(log, event="connect-sent", device=device)
    while sock.recv(65536):
        pass
    _note(log, event="end", device=device, why="stream ended")
    return 0


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def standin_log(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- the rig --------------------------------------------------------------------


@dataclass
class VmHost:
    name: str
    pair: Pair
    qemu: NetnsQemu
    proc: NetnsProc


class FaultRig:
    """The PKI, the device host's namespace and daemon, and VM hosts (see the module doc)."""

    def __init__(self, tmp: Path, tag: str) -> None:
        self.tmp = tmp
        self.tag = tag
        self.dev_ns = f"vmfd{tag}"
        self._stack = contextlib.ExitStack()
        self.vmhosts: dict[str, VmHost] = {}
        ca = tmp / "pki" / "ca"
        addresses = [dev_address(i) for i in (1, 2)]
        certs.make_ca(ca)
        self.certs = {
            name: certs.issue(ca, name, tmp / "pki" / name, addresses=addresses).cert.parent
            for name in ("devhost", "vmhost-a", "vmhost-b")
        }
        self.standin_log = tmp / "usbredirect.log"
        bindir = standin_script(tmp / "standin-bin", self.standin_log)
        ip("netns", "add", self.dev_ns)
        self._stack.callback(
            subprocess.run,
            ["ip", "netns", "del", self.dev_ns],
            check=False,
            capture_output=True,
            timeout=20,
        )
        ip("-n", self.dev_ns, "link", "set", "lo", "up")
        # an orphaned socket's FIN is retransmitted once (see test_netns_faults)
        subprocess.run(
            ["ip", "netns", "exec", self.dev_ns, "sysctl", "-q", "-w", ORPHAN_RETRIES],
            check=True,
            timeout=20,
        )
        self.devhost = NetnsProc(
            tmp,
            "devhost",
            "mixed",
            f'[api]\nlisten = "0.0.0.0:{API_PORT}"\n\n'
            f'[export]\nname = "devhost"\ncerts = "{self.certs["devhost"]}"\n'
            f'listen = "0.0.0.0"\nallow = ["vmhost-a", "vmhost-b"]\n'
            f'ports = "{EXPORT_PORTS[0]}-{EXPORT_PORTS[1]}"\n\n'
            f"[[export.rule]]\nmatch = 'via-port \"{PORT}\"'\n",
            self.dev_ns,
            PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        )
        self._stack.callback(self.devhost.close)

    def add_vmhost(self, me: str, index: int) -> VmHost:
        """VM host ``me`` in its own namespace, its QEMU running, its vmplug not started."""
        ns = f"vmf{index}{self.tag}"
        vm_ip, dev_ip = vm_address(index), dev_address(index)
        pair = self._stack.enter_context(
            veth_pair(ns, self.dev_ns, vm_ip, dev_ip, dev_exists=True, tag=str(index))
        )
        qemu = NetnsQemu(self.tmp, ns, name=me.replace("-", ""))
        self._stack.callback(qemu.cleanup)
        qemu.start()
        with SyncQmp(str(qemu.qmp_paths[1])) as q:
            q.execute("cont")  # usb-redir speaks (its hello) only while the VM runs
        proc = NetnsProc(
            self.tmp,
            me,
            "minimal",
            vmhost_config(qemu.qmp_paths[0], dev_ip, API_PORT, self.certs[me], me),
            ns,
        )
        self._stack.callback(proc.close)
        host = VmHost(me, pair, qemu, proc)
        self.vmhosts[me] = host
        return host

    def close(self) -> None:
        self._stack.close()

    # -- what is really there ---------------------------------------------------

    def qemu_redirs(self, me: str) -> dict[str, bool | None]:
        """vmplug's usb-redir devices in VM host ``me``'s QEMU: id -> QOM ``attached``
        (the guest's bus holds the device), read through QEMU's second QMP socket."""

        async def read() -> dict[str, bool | None]:
            obs = QmpVm("obs", str(self.vmhosts[me].qemu.qmp_paths[1]), shared=True)
            await obs.start()
            try:
                seen = await obs.observe()
            finally:
                await obs.stop()
            return {k: v.attached for k, v in seen.items() if k.startswith("vmplug-")}

        return asyncio.run(read())

    def attached_in(self, me: str) -> str | None:
        """The one usb-redir device QEMU ``me``'s guest bus holds, or None."""
        seen = self.qemu_redirs(me)
        assert len(seen) <= 1, seen  # never a second device
        return next((k for k, v in seen.items() if v), None)

    def streams(self) -> list[dict[str, Any]]:
        return standin_log(self.standin_log)

    def connects_sent(self) -> int:
        return sum(1 for e in self.streams() if e["event"] == "connect-sent")


def kinds(rows: list[dict[str, Any]], since: int = 0) -> list[str]:
    """``kind`` of each journal row after id ``since`` (actions marked ``!`` when failed)."""
    return [
        r["kind"] + ("" if r.get("result") in (None, "ok") else "!")
        for r in rows
        if int(r["id"]) > since
    ]


def last_id(rows: list[dict[str, Any]]) -> int:
    return max((int(r["id"]) for r in rows), default=0)


def until(
    check: Callable[[], Any], what: str, timeout: float = 60, proc: Proc | None = None
) -> float:
    """Seconds until ``check()`` is truthy (fails after ``timeout``)."""
    t0 = time.monotonic()
    wait(check, what, proc, timeout=timeout)
    return time.monotonic() - t0


if __name__ == "__main__":
    sys.exit(standin_main(sys.argv[1:]))
