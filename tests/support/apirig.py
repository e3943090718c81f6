"""A daemon with its API on a unix socket and loopback TCP, real QEMU VMs, replayed uevents.

The host side is a sysfs tree captured from a real kernel (tests/fixtures/sysfs)
that the rig changes the way the kernel would (a device directory leaves on
unplug and comes back on replug) while the matching uevents go through a FIFO
to the daemon's ``replay:`` source -- as in tests/qemu/test_daemon.py.  The VMs
are real qemu-system-x86_64 processes with a qemu-xhci; a second QMP socket per
VM lets a test read what QEMU really holds.

Used by tests/api, tests/web and bench/bench_api.py.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.fakekernel import FIXTURES, FakeKernel, until
from tests.support.qemurig import QemuRig
from vmplug.api.limits import Limits
from vmplug.api.server import Api
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import ReplayEventSource

TOKEN = "test-token-0123456789abcdef"
__all__ = ["FIXTURES", "TOKEN", "ApiRig", "FakeKernel", "until"]

RULES = """
[[rule]]
attach = "a"
match = 'via-port "2-2.4.2"'
"""


class ApiRig(QemuRig):
    """Kernel, VMs, daemon and API of one test; :meth:`close` stops everything."""

    def __init__(
        self, tmp: Path, *, sysfs_root: Path | None = None, limits: Limits | None = None
    ) -> None:
        super().__init__(tmp, "vmplug-api")
        self.limits = limits
        self.kernel = FakeKernel(tmp, root=sysfs_root)
        self.socket = self.sock_dir / "api.sock"
        self.daemon: Daemon | None = None
        self.store: Store | None = None
        self.api: Api | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(
        self, rules: str = RULES, vms: tuple[str, ...] = ("a", "b"), group: str | None = None
    ) -> Daemon:
        self.config_path.write_text(self.vm_tables(vms) + rules)
        for n in vms:
            self.qemu(n).start()
        config = parse_config(self.config_path.read_text(), self.config_path)
        self.store = Store(self.tmp / "vmplug.db")
        self.daemon = Daemon(
            config,
            sysfs_root=self.kernel.root,
            source=ReplayEventSource(self.kernel.fifo),
            store=self.store,
            config_path=self.config_path,
        )
        self.api = Api(self.daemon, limits=self.limits)
        await self.api.start_unix(self.socket, group=group)
        self.port = await self.api.start_tcp("127.0.0.1:0", TOKEN)
        await self.daemon.start()
        return self.daemon

    async def wait_ports(self, vm: str, want: set[str], timeout: float = 20.0) -> None:
        async def check() -> bool:
            return await self.ports(vm) == want

        await until(check, timeout, f"{vm} holds {want}")

    async def close(self) -> None:
        if self.api is not None:
            await self.api.stop()
        if self.daemon is not None:
            await self.daemon.stop()
        if self.store is not None:
            self.store.close()
        await self.close_vms()
        self.kernel.close()
