"""A device host and VM hosts as real ``vmplug run`` processes, all on loopback.

The device host (capture ``mixed``, uevents replayed) has ``[export]`` rules
for one port and its API on mutual TLS; each VM host (capture ``minimal``)
has a real QEMU, a rule that sends every device of ``devhost`` to it, and a
``[host.devhost]`` table naming only the address, the API port and its
certificates.  QEMU's second QMP socket is the test's own view of what QEMU
really holds.  Used by tests/remote/test_remote_inventory.py and
tests/web/test_page_remote.py; everything is stopped by PID in :meth:`close`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.qemu_proc import QemuProcess
from tests.support.vmplugproc import Proc, free_port
from vmplug.remote import certs
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp

#: the captured tree's device (capture "mixed") the device host's rule lets go
PORT = "2-2.4.2"
VM_HOSTS = ("vmhost-a", "vmhost-b")


def vmhost_config(qmp: str | Path, address: str, api_port: int, certs_dir: Path, me: str) -> str:
    """A VM host's config: one VM, a rule that sends every device of
    ``devhost`` to it, and ``[host.devhost]`` with the address, the API port
    and VM host ``me``'s certificates."""
    return (
        f'[vm.guest]\nqmp = "{qmp}"\n\n'
        f'[[rule]]\nattach = "guest"\nmatch = \'via-host "devhost"\'\n\n'
        f'[host.devhost]\naddress = "{address}"\napi_port = {api_port}\n'
        f'certs = "{certs_dir}"\nme = "{me}"\n'
    )


class RemoteRig:
    """The PKI, the device host and up to two VM hosts with their QEMUs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        ca = tmp / "pki" / "ca"
        certs.make_ca(ca)
        self.certs = {
            name: certs.issue(ca, name, tmp / "pki" / name, addresses=["127.0.0.1"]).cert.parent
            for name in ("devhost", *VM_HOSTS)
        }
        self.api_port = free_port()
        first = min(free_port(), 65000)
        self.ports = (first, first + 30)
        self.devhost = Proc(
            tmp,
            "devhost",
            "mixed",
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\n\n'
            f'[export]\nname = "devhost"\ncerts = "{self.certs["devhost"]}"\n'
            f'listen = "127.0.0.1"\nallow = {json.dumps(list(VM_HOSTS))}\n'
            f'ports = "{self.ports[0]}-{self.ports[1]}"\n\n'
            f"[[export.rule]]\nmatch = 'via-port \"{PORT}\"'\n",
        )
        self.qemus: dict[str, QemuProcess] = {}
        self.vmhosts: dict[str, Proc] = {}
        self.procs: list[Proc] = [self.devhost]

    def vmhost(self, me: str, extra: str = "") -> Proc:
        """VM host ``me`` (not started) with its QEMU running; ``extra`` is
        put at the top of its config (an ``[api]`` table, say)."""
        qemu = QemuProcess(self.tmp, qmp_sockets=2, name=me.replace("-", ""))
        qemu.start()
        self.qemus[me] = qemu
        with SyncQmp(str(qemu.qmp_paths[1])) as q:
            q.execute("cont")  # usb-redir speaks (its hello) only while the VM runs
        proc = Proc(
            self.tmp,
            me,
            "minimal",
            extra
            + vmhost_config(qemu.qmp_paths[0], "127.0.0.1", self.api_port, self.certs[me], me),
        )
        self.vmhosts[me] = proc
        self.procs.append(proc)
        return proc

    def redirs(self, me: str) -> dict[str, bool]:
        """vmplug's usb-redir devices QEMU ``me`` really holds: id -> chardev connected.

        Callable from a test whose own event loop runs (the browser's): the
        read gets a loop of its own, in a thread."""

        async def read() -> dict[str, bool]:
            obs = QmpVm("obs", str(self.qemus[me].qmp_paths[1]), shared=True)
            await obs.start()
            try:
                return await obs.redir_links()
            finally:
                await obs.stop()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, read()).result()

    def client_context(self, me: str) -> ssl.SSLContext:
        """A TLS client context with VM host ``me``'s certificate and the CA."""
        d = self.certs[me]
        ctx = ssl.create_default_context(cafile=str(d / "ca-cert.pem"))
        ctx.load_cert_chain(d / f"{me}-cert.pem", d / f"{me}-key.pem")
        return ctx

    def export_list(self, me: str, **kw: Any) -> Any:
        """The device host's ``GET /v1/export``, with VM host ``me``'s certificate."""
        url = f"https://127.0.0.1:{self.api_port}/v1/export"
        with urllib.request.urlopen(url, context=self.client_context(me), timeout=10, **kw) as r:
            return json.loads(r.read())

    def close(self) -> None:
        for p in self.procs:
            p.close()
        for q in self.qemus.values():
            q.cleanup()
