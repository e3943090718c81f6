"""dockurr/windows containers: found through the Docker Engine API, followed
through their bind mount to the QMP socket of a real QEMU."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.vmrig import (
    SYSFS_FIXTURES,
    XHCI,
    DockerApiServer,
    QemuFactory,
    QemuProcess,
    docker_doc,
)
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.host.events import ReplayEventSource
from vmplug.vms.base import UsbHostSpec
from vmplug.vms.base import VmEventKind as K
from vmplug.vms.container import (
    ContainerError,
    ContainerVm,
    DockerApiError,
    locate,
    qmp_paths_in_args,
    read_container,
)
from vmplug.vms.qmp import QmpVm


def test_inspect_documents_name_the_host_socket_or_the_problem() -> None:
    good = read_container(docker_doc("windows-qmp"))
    assert good.name == "windows" and good.running
    assert good.inside == ("/qmp/qmp.sock",)
    assert good.socket == "/srv/windows/qmp/qmp.sock" and good.problem is None

    plain = read_container(docker_doc("windows-no-qmp"))
    assert plain.socket is None and plain.problem is not None
    assert "no QMP socket" in plain.problem

    hidden = read_container(docker_doc("windows-qmp-unmounted"))
    assert hidden.inside == ("/run/qmp.sock",) and hidden.socket is None
    assert hidden.problem is not None and "not on a bind mount" in hidden.problem


def test_qmp_on_a_command_line() -> None:
    words = [
        "-qmp", "unix:/a.sock,server=on,wait=off",
        "-qmp=unix:/b.sock,server",
        "-chardev", "socket,id=mon1,path=/c.sock,server=on,wait=off",
        "-mon", "chardev=mon1,mode=control",
        "-chardev", "socket,id=hmp,path=/d.sock,server=on",
        "-mon", "chardev=hmp,mode=readline",
        "-qmp", "tcp:127.0.0.1:4444,server",
        "-monitor", "unix:/run/shm/monitor.sock,server,nowait",
    ]  # fmt: skip
    assert qmp_paths_in_args(words) == ["/a.sock", "/b.sock", "/c.sock"]


@pytest.fixture
def qmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmplug-ct", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def windows_doc(qmp_dir: Path) -> dict[str, Any]:
    """The dockurr/windows document, its /qmp bind mount from ``qmp_dir``."""
    doc = copy.deepcopy(docker_doc("windows-qmp"))
    for mount in doc["Mounts"]:
        if mount["Destination"] == "/qmp":
            mount["Source"] = str(qmp_dir)
    return doc


def container_qemu(qemu: QemuFactory, qmp_dir: Path) -> QemuProcess:
    """The QEMU of the container: the image's -qmp (from ARGUMENTS) on the mount,
    plus the test's own socket to look at QOM."""
    return qemu([*XHCI, "-qmp", f"unix:{qmp_dir}/qmp.sock,server=on,wait=off"], name="win")


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def held_ports(observer: QmpVm) -> set[str]:
    try:
        found = await observer.observe()
    except Exception:
        return set()
    return {f"{o.hostbus}-{o.hostport}" for o in found.values()}


@pytest.mark.qemu
async def test_container_vm_attaches_through_the_mount(
    docker_api: DockerApiServer, qemu: QemuFactory, qmp_dir: Path
) -> None:
    docker_api.add(windows_doc(qmp_dir))
    proc = container_qemu(qemu, qmp_dir)
    proc.start()
    reasons: list[K] = []
    vm = ContainerVm(
        "win",
        "windows",
        uri=f"unix://{docker_api.socket}",
        on_change=lambda e: reasons.append(e.kind),
    )
    await vm.start()
    try:
        assert await vm.wait_connected(15)
        assert vm.address == f"{qmp_dir}/qmp.sock"
        assert "/containers/windows/json" in docker_api.requests
        await vm.attach("vmplug-0123456789ab", UsbHostSpec.by_port(2, "1.2"))
        observer = QmpVm("obs", proc.qmp_path, shared=True)
        assert await held_ports(observer) == {"2-1.2"}
        assert set(await vm.observe()) == {"vmplug-0123456789ab"}
        assert await vm.usb_bus() == "xhci.0"  # what the daemon warms after a detach
        # the container restarts: its QEMU goes away and comes back on the same mount
        proc.stop()
        await until(lambda: _false(vm.connected))
        proc.start()
        assert await vm.wait_connected(15)
        assert reasons.count(K.CONNECTED) == 2 and K.DISCONNECTED in reasons
        assert await vm.observe() == {}, "a new QEMU holds nothing until vmplug attaches again"
    finally:
        await vm.stop()


async def _false(value: bool) -> bool:
    return not value


async def test_no_reachable_socket_says_how_to_fix_the_compose_file(
    docker_api: DockerApiServer,
) -> None:
    docker_api.add(docker_doc("windows-no-qmp"))
    docker_api.add(docker_doc("windows-qmp-unmounted"))
    uri = f"unix://{docker_api.socket}"
    with pytest.raises(ContainerError) as info:
        await locate("win-plain", uri)
    text = str(info.value)
    assert "no QMP socket" in text
    assert "-qmp unix:/qmp/qmp.sock,server=on,wait=off" in text and "./qmp:/qmp" in text
    assert "vmplug generate compose --merge" in text
    with pytest.raises(ContainerError, match=r"/run/qmp.sock is not on a bind mount"):
        await locate("win-hidden", uri)
    with pytest.raises(ContainerError, match="no container 'nosuch'"):
        await locate("nosuch", uri)
    with pytest.raises(DockerApiError, match="no Docker or Podman API socket"):
        await locate("windows", "unix:///nonexistent/docker.sock")
    # the backend keeps the reason while it waits, and is not connected
    vm = ContainerVm("w", "win-plain", uri=uri, lookup_interval=0.1)
    await vm.start()
    try:
        await until(lambda: _true(vm.error is not None))
        assert vm.error is not None and "ARGUMENTS" in vm.error and not vm.connected
    finally:
        await vm.stop()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.qemu
async def test_daemon_reattaches_after_a_container_restart(
    docker_api: DockerApiServer, qemu: QemuFactory, qmp_dir: Path, tmp_path: Path
) -> None:
    docker_api.add(windows_doc(qmp_dir))
    proc = container_qemu(qemu, qmp_dir)
    proc.start()
    sysfs = tmp_path / "sysfs"
    shutil.copytree(SYSFS_FIXTURES / "mixed", sysfs, symlinks=True)
    events = tmp_path / "uevents"
    os.mkfifo(events)  # no uevents in this test; the FIFO stays open for the reader
    keep = os.open(events, os.O_RDWR | os.O_NONBLOCK)
    config_path = tmp_path / "vmplug.toml"
    config_path.write_text(
        f'[vm.win]\ncontainer = "windows"\nuri = "unix://{docker_api.socket}"\n\n'
        '[[rule]]\nattach = "win"\nmatch = \'via-port "2-2.4.2"\'\n'
    )
    daemon = Daemon(
        parse_config(config_path.read_text(), config_path),
        sysfs_root=sysfs,
        source=ReplayEventSource(events),
        config_path=config_path,
    )
    observer = QmpVm("obs", proc.qmp_path, shared=True)
    await daemon.start()
    try:
        await until(lambda: _eq(held_ports(observer), {"2-2.4.2"}))
        first_pid = proc.pid
        proc.stop()
        proc.start()  # `docker restart windows`
        assert proc.pid != first_pid
        await until(lambda: _eq(held_ports(observer), {"2-2.4.2"}))
        assert daemon.stats.actions_ok == 2, "attached once per QEMU, no more"
        status = daemon.status()
        assert status["attachments"][0]["state"] == "attached"
        assert json.dumps(status)  # the status stays serialisable with a container VM
    finally:
        await daemon.stop()
        os.close(keep)


async def _eq(value: Awaitable[set[str]], want: set[str]) -> bool:
    return await value == want
