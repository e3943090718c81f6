"""Proxmox VE: /var/run/qemu-server/VMID.qmp, shared with Proxmox's own tools.

A real QEMU listens where qemu-server puts the socket (the run directory is
moved with VMPLUG_PROXMOX_RUN).  The proof that vmplug holds no connection
while idle is the kernel's own table of unix sockets: QEMU's side of an
accepted connection shows the socket's path in /proc/net/unix.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vmrig import XHCI, QemuFactory
from vmplug.config import parse_config
from vmplug.vms.base import UsbHostSpec
from vmplug.vms.base import VmEventKind as K
from vmplug.vms.factory import make_backend
from vmplug.vms.proxmox import ProxmoxVm, list_vmids

pytestmark = pytest.mark.qemu

SS_CONNECTED = "03"


def connections(path: Path) -> int:
    """Open connections to the unix socket ``path`` (QEMU's accepted ends)."""
    count = 0
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and fields[5] == SS_CONNECTED:
            count += 1
    return count


def other_client_served(path: Path, timeout: float = 2.0) -> bool:
    """Another QMP client (Proxmox's `qm`) gets its greeting and an answer now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        f = s.makefile("rwb")
        greeting = f.readline()
        if b'"QMP"' not in greeting:
            return False
        f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
        f.flush()
        return b"return" in f.readline() and b'"status"' in f.readline()


async def released(path: Path, timeout: float = 1.0) -> int:
    """Connections still open once QEMU had ``timeout`` s to see closed ones hang up
    (QEMU drops its end of a connection when its main loop reads the EOF)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (n := connections(path)) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return n


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmplug-pve", dir="/tmp"))
    monkeypatch.setenv("VMPLUG_PROXMOX_RUN", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_proxmox_vm_never_holds_the_socket(qemu: QemuFactory, run_dir: Path) -> None:
    sock = run_dir / "101.qmp"
    proc = qemu([*XHCI, "-qmp", f"unix:{sock},server=on,wait=off"], name="pve101")
    proc.start()
    # start() waits for QEMU's own QMP socket; this second one may come a moment later
    for _ in range(200):
        if sock.exists():
            break
        await asyncio.sleep(0.025)
    assert list_vmids(run_dir) == [101]
    reasons: list[K] = []
    cfg = parse_config("[vm.pve]\nproxmox = 101\n")
    vm = make_backend(cfg.vms["pve"], lambda e: reasons.append(e.kind))
    assert isinstance(vm, ProxmoxVm) and vm.address == str(sock)
    await vm.start()
    try:
        # QEMU makes its second -qmp socket a moment after the test's own
        for _ in range(100):
            if await vm.wait_connected(1):
                break
            await asyncio.sleep(0.05)
        assert vm.connected
        samples = []
        for _ in range(3):
            await vm.attach("vmplug-0123456789ab", UsbHostSpec.by_port(2, "1.3"))
            samples.append(await released(sock))
            assert other_client_served(sock), "qm must not wait for vmplug"
            found = await vm.observe()
            samples.append(await released(sock))
            assert set(found) == {"vmplug-0123456789ab"}
            assert found["vmplug-0123456789ab"].hostport == "1.3"
            await vm.detach("vmplug-0123456789ab")
            samples.append(await released(sock))
            assert await vm.observe() == {}
        assert samples == [0] * 9, f"connections left open after operations: {samples}"
        # idle: the daemon's loop only stats the socket (and probes now and then)
        assert await released(sock) == 0
        idle = []
        for _ in range(20):
            idle.append(connections(sock))
            await asyncio.sleep(0.05)
        assert sum(idle) == 0
        assert reasons[:1] == [K.CONNECTED] and vm.connected
        # QEMU restarted by Proxmox (`qm stop; qm start`): noticed by the socket's new inode
        proc.stop()
        proc.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while reasons.count(K.CONNECTED) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert K.DISCONNECTED in reasons and reasons.count(K.CONNECTED) == 2
        assert await vm.observe() == {}
    finally:
        await vm.stop()
    assert await released(sock) == 0
