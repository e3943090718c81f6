"""QmpVm against real qemu-system-x86_64 processes (TCG, no OS, paused).

This machine's kernel has no USB: ``usb-host`` by vendor/product is accepted
and waits (``attached`` false), by bus/address it fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest
from qemu.qmp import QMPClient

from tests.support.qemu_proc import XHCI, QemuFactory
from tests.support.vmhelp import ChangeLog, eventually
from vmplug.vms.base import (
    UsbHostSpec,
    VmConfigError,
    VmDisconnected,
    VmError,
    VmEvent,
    VmState,
    VmTimeout,
)
from vmplug.vms.base import VmEventKind as K
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import parse_address

pytestmark = pytest.mark.qemu

MakeVm = Callable[..., QmpVm]
SCARLETT = UsbHostSpec.by_id(0x1235, 0x821A)
KEYLAB = UsbHostSpec.by_id(0x1C75, 0x02CB)
DEV = "vmplug-0123456789ab"
DEV2 = "vmplug-ba9876543210"


async def connected_vm(make_vm: MakeVm, sock: str, **kw: object) -> tuple[QmpVm, ChangeLog]:
    changes = ChangeLog()
    vm = make_vm("win", sock, on_change=changes, **kw)
    await vm.start()
    assert await vm.wait_connected(5), "QmpVm did not connect"
    return vm, changes


async def other_client_can_talk(sock: str, timeout: float = 1.0) -> bool:
    """True when a second QMP client gets a session (nobody holds the socket)."""
    client = QMPClient("other")
    try:
        await asyncio.wait_for(client.connect(sock), timeout)
        await asyncio.wait_for(client.execute("query-status"), timeout)
    except (TimeoutError, OSError, Exception):
        return False
    finally:
        if client.runstate.name != "IDLE":
            await client.disconnect()
    return True


def state(vm: QmpVm) -> VmState:
    """vm.state, read afresh (keeps mypy from narrowing a property across awaits)."""
    return vm.state


def test_parse_address() -> None:
    assert parse_address("/run/q.sock") == "/run/q.sock"
    assert parse_address("unix:/run/q.sock") == "/run/q.sock"
    assert parse_address("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert parse_address("tcp:[::1]:4444") == ("::1", 4444)
    with pytest.raises(ValueError, match="tcp:HOST:PORT"):
        parse_address("tcp:localhost")


async def test_attach_by_vendor_product_is_observed(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    assert vm.state is VmState.PRELAUNCH
    await vm.attach(DEV, SCARLETT)
    await vm.attach(DEV2, UsbHostSpec(hostbus=3, hostport="1.2"))
    seen = await vm.observe()
    assert set(seen) == {DEV, DEV2}
    dev = seen[DEV]
    assert (dev.vendorid, dev.productid) == (0x1235, 0x821A)
    assert (dev.hostbus, dev.hostaddr, dev.hostport) == (None, None, None)
    assert dev.attached is False  # no such device on this host: QEMU waits for it
    assert dev.bus == "xhci.0"
    assert dev.managed
    by_port = seen[DEV2]
    assert (by_port.hostbus, by_port.hostport, by_port.vendorid) == (3, "1.2", None)
    # The second look is served partly from the per-session cache: same answer.
    assert await vm.observe() == seen


async def test_attach_by_bus_address_fails_with_generic_error(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    with pytest.raises(VmError) as err:
        await vm.attach(DEV, UsbHostSpec.by_address(1, 2))
    assert err.value.qmp_class == "GenericError"
    assert type(err.value) is VmError
    assert await vm.observe() == {}


async def test_attach_refuses_specs_that_match_anything(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    with pytest.raises(VmConfigError, match="needs vendorid"):
        await vm.attach(DEV, UsbHostSpec(vendorid=0x1235))
    with pytest.raises(VmConfigError, match="invalid QEMU device id"):
        await vm.attach("9 bad id", SCARLETT)
    assert await vm.observe() == {}


async def test_duplicate_id_is_a_qmp_error(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    await vm.attach(DEV, SCARLETT)
    with pytest.raises(VmError) as err:
        await vm.attach(DEV, KEYLAB)
    assert err.value.qmp_class == "GenericError"
    assert (await vm.observe())[DEV].productid == 0x821A


async def test_detach_waits_for_device_deleted(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, changes = await connected_vm(make_vm, sock)
    await vm.attach(DEV, SCARLETT)
    await vm.attach(DEV2, KEYLAB)
    await vm.detach(DEV)
    # The event had arrived by the time detach returned.
    assert VmEvent("win", K.DEVICE_DELETED, DEV) in changes.calls
    assert set(await vm.observe()) == {DEV2}
    # The id can be used again at once (the cache forgot the old device).
    await vm.attach(DEV, KEYLAB)
    assert (await vm.observe())[DEV].productid == 0x02CB


async def test_detach_of_unknown_id_is_a_no_op(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, changes = await connected_vm(make_vm, sock)
    await vm.detach("vmplug-000000000000")
    assert K.DEVICE_DELETED not in changes.kinds


async def test_vm_started_after_daemon_connects(qemu: QemuFactory, make_vm: MakeVm) -> None:
    proc = qemu()
    changes = ChangeLog()
    vm = make_vm("win", proc.qmp_path, on_change=changes)
    await vm.start()
    await asyncio.sleep(0.5)  # the socket does not exist yet
    assert not vm.connected
    assert vm.state is VmState.DISCONNECTED
    with pytest.raises(VmDisconnected):
        await vm.observe()
    proc.start()
    t0 = time.monotonic()
    await changes.wait_for(K.CONNECTED, timeout=5)
    print(f"\nconnected {time.monotonic() - t0:.3f} s after QEMU's socket appeared")
    assert vm.connected
    assert await vm.observe() == {}


async def test_sigkill_disconnects_and_restart_reconnects(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    proc = qemu()
    sock = proc.start()
    vm, changes = await connected_vm(make_vm, sock)
    await vm.attach(DEV, SCARLETT)
    assert DEV in await vm.observe()

    proc.kill(signal.SIGKILL)
    t0 = time.monotonic()
    await changes.wait_for(K.DISCONNECTED, timeout=5)
    print(f"\nnoticed SIGKILL after {time.monotonic() - t0:.3f} s")
    assert vm.state is VmState.DISCONNECTED
    assert not vm.connected
    with pytest.raises(VmDisconnected):
        await vm.attach(DEV2, KEYLAB)

    proc.start()  # same socket path; the old file was left behind by SIGKILL
    t0 = time.monotonic()
    await changes.wait_for(K.CONNECTED, count=2, timeout=5)
    print(f"reconnected {time.monotonic() - t0:.3f} s after the restart")
    assert await vm.observe() == {}  # the devices died with the process
    await vm.attach(DEV, SCARLETT)
    assert DEV in await vm.observe()


async def test_qemu_killed_in_the_middle_of_an_attach(qemu: QemuFactory, make_vm: MakeVm) -> None:
    proc = qemu()
    sock = proc.start()
    vm, changes = await connected_vm(make_vm, sock, command_timeout=30)
    await vm.usb_bus()  # resolve the bus first, so the attach below is one device_add
    proc.kill(signal.SIGSTOP)  # QEMU reads nothing now: the device_add stays in flight
    attach = asyncio.create_task(vm.attach(DEV, SCARLETT))
    await asyncio.sleep(0.2)
    assert not attach.done()
    proc.kill(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(VmDisconnected) as err:
        await asyncio.wait_for(attach, 5)
    assert isinstance(err.value, VmError)
    assert time.monotonic() - t0 < 2
    await changes.wait_for(K.DISCONNECTED)


async def test_hung_qemu_times_out_and_recovers(qemu: QemuFactory, make_vm: MakeVm) -> None:
    proc = qemu()
    sock = proc.start()
    vm, _ = await connected_vm(make_vm, sock, command_timeout=0.5)
    proc.kill(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(VmTimeout):
            await vm.observe()
        assert time.monotonic() - t0 < 1.5
    finally:
        proc.kill(signal.SIGCONT)
    assert vm.connected
    assert await vm.observe() == {}


async def test_shared_socket_is_never_held_while_idle(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    changes = ChangeLog()
    vm = make_vm("pve", sock, shared=True, on_change=changes, shared_probe_interval=0.5)
    await vm.start()
    await changes.wait_for(K.CONNECTED)
    assert vm.connected
    assert await other_client_can_talk(sock)

    await vm.attach(DEV, SCARLETT)
    assert await other_client_can_talk(sock)
    assert set(await vm.observe()) == {DEV}
    assert await other_client_can_talk(sock)
    await vm.detach(DEV)
    assert VmEvent("pve", K.DEVICE_DELETED, DEV) in changes.calls
    assert await other_client_can_talk(sock)
    await asyncio.sleep(1.2)  # two periodic probes come and go
    assert await other_client_can_talk(sock)


async def test_owned_socket_is_held_and_a_second_socket_serves_others(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    """Why vmplug wants a socket of its own: QEMU serves one client per socket."""
    proc = qemu(qmp_sockets=2)
    sock = proc.start()
    vm, _ = await connected_vm(make_vm, sock)
    assert not await other_client_can_talk(sock, timeout=0.5)
    assert await other_client_can_talk(str(proc.qmp_paths[1]))
    await vm.attach(DEV, SCARLETT)
    assert vm.connected


async def test_shared_mode_notices_qemu_going_and_coming(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    proc = qemu()
    sock = proc.start()
    changes = ChangeLog()
    vm = make_vm("pve", sock, shared=True, on_change=changes, shared_probe_interval=0.3)
    await vm.start()
    await changes.wait_for(K.CONNECTED)
    proc.kill(signal.SIGKILL)
    await changes.wait_for(K.DISCONNECTED, timeout=5)
    assert not vm.connected
    proc.start()
    await changes.wait_for(K.CONNECTED, count=2, timeout=5)
    assert await vm.observe() == {}


async def test_events_stop_resume_reset(qemu: QemuFactory, make_vm: MakeVm) -> None:
    proc = qemu(qmp_sockets=2)
    sock = proc.start()
    vm, changes = await connected_vm(make_vm, sock)
    other = QMPClient("other")
    await other.connect(str(proc.qmp_paths[1]))
    try:
        await other.execute("cont")
        await changes.wait_for(K.RESUME)
        assert vm.state is VmState.RUNNING
        await other.execute("stop")
        await changes.wait_for(K.STOP)
        assert state(vm) is VmState.PAUSED
        await other.execute("system_reset")
        await changes.wait_for(K.RESET)
        await vm.attach(DEV, SCARLETT)
        await other.execute("device_del", {"id": DEV})  # removed behind vmplug's back
        await changes.wait_for(K.DEVICE_DELETED, DEV)
        assert await vm.observe() == {}
    finally:
        await other.disconnect()
    await eventually(lambda: vm.state is VmState.PRELAUNCH, what="reset while stopped: prelaunch")
    assert await vm.status() is VmState.PRELAUNCH


async def test_shutdown_event(qemu: QemuFactory, make_vm: MakeVm) -> None:
    proc = qemu(qmp_sockets=2)
    sock = proc.start()
    vm, changes = await connected_vm(make_vm, sock)
    other = QMPClient("other")
    await other.connect(str(proc.qmp_paths[1]))
    try:
        await other.execute("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):
            await other.disconnect()  # QEMU hung up: the bottom half saw EOF
    await changes.wait_for(K.SHUTDOWN)
    await changes.wait_for(K.DISCONNECTED)
    assert vm.state is VmState.DISCONNECTED


async def test_no_usb_controller_is_a_clear_error(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu(extra_args=[]).start()
    vm, _ = await connected_vm(make_vm, sock)
    assert await vm.usb_buses() == []
    with pytest.raises(VmConfigError) as err:
        await vm.attach(DEV, SCARLETT)
    assert "no USB controller; add -device qemu-xhci or set add_controller = true" in str(err.value)
    assert err.value.qmp_class is None


async def test_add_controller_on_pc(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu(extra_args=[], machine="pc").start()
    vm, _ = await connected_vm(make_vm, sock, add_controller=True)
    await vm.attach(DEV, SCARLETT)
    assert await vm.usb_buses() == ["vmplug-xhci.0"]
    assert (await vm.observe())[DEV].bus == "vmplug-xhci.0"


async def test_concurrent_attaches_add_one_controller(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu(extra_args=[], machine="pc").start()
    vm, _ = await connected_vm(make_vm, sock, add_controller=True)
    ids = [f"vmplug-00000000000{i}" for i in range(5)]
    await asyncio.gather(
        *(vm.attach(i, UsbHostSpec.by_port(1, f"{n + 1}")) for n, i in enumerate(ids))
    )
    assert await vm.usb_buses() == ["vmplug-xhci.0"]
    assert set(await vm.observe()) == set(ids)


async def test_replug_after_detach_needs_no_bus_lookup(
    qemu: QemuFactory, make_vm: MakeVm, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))
    sent: list[str] = []
    real_exec = vm._exec

    async def spy(client: object, cmd: str, args: object = None) -> object:
        sent.append(cmd)
        return await real_exec(client, cmd, args)  # type: ignore[arg-type]

    monkeypatch.setattr(vm, "_exec", spy)
    await vm.detach(DEV)  # DEVICE_DELETED of a usb-host: the controller is still there
    await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))
    assert sent == ["device_del", "device_add"]
    assert set(await vm.observe_bindings()) == {DEV}


async def test_observe_bindings_follow_devices_others_replace(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    proc = qemu(qmp_sockets=2)
    sock = proc.start()
    vm, changes = await connected_vm(make_vm, sock)
    await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))
    other = QMPClient("other")
    await other.connect(str(proc.qmp_paths[1]))
    try:
        add = {"driver": "usb-host", "bus": "xhci.0", "hostbus": 3}
        await other.execute("device_add", add | {"id": DEV2, "hostport": "1.2"})
        await other.execute("device_add", add | {"id": "user-dev", "hostport": "1.3"})
        seen = await vm.observe_bindings()
        assert {k: (b.hostbus, b.hostport) for k, b in seen.items()} == {
            DEV: (1, "4"),
            DEV2: (3, "1.2"),
        }
        assert (seen[DEV].hostaddr, seen[DEV].attached) == (None, None)  # the port form
        # another client replaces DEV2 under the same id: DEVICE_DELETED makes vmplug read again
        await other.execute("device_del", {"id": DEV2})
        await changes.wait_for(K.DEVICE_DELETED, DEV2)
        await other.execute("device_add", add | {"id": DEV2, "hostport": "2.1"})
        again = await vm.observe_bindings()
        assert (again[DEV2].hostbus, again[DEV2].hostport) == (3, "2.1")
        assert again[DEV] == seen[DEV]
    finally:
        await other.disconnect()


async def test_add_controller_on_q35_uses_a_free_root_port(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    args = ["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"]
    sock = qemu(extra_args=args).start()
    vm, _ = await connected_vm(make_vm, sock, add_controller=True)
    assert await vm.usb_bus() == "vmplug-xhci.0"
    await vm.attach(DEV, SCARLETT)
    assert (await vm.observe())[DEV].bus == "vmplug-xhci.0"


async def test_add_controller_on_q35_without_a_port_explains(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    sock = qemu(extra_args=[]).start()
    vm, _ = await connected_vm(make_vm, sock, add_controller=True)
    with pytest.raises(VmConfigError, match="pcie-root-port") as err:
        await vm.attach(DEV, SCARLETT)
    assert err.value.qmp_class == "GenericError"


async def test_two_usb_buses_need_usb_bus(qemu: QemuFactory, make_vm: MakeVm) -> None:
    args = [*XHCI, "-device", "qemu-xhci,id=xhci2"]
    sock = qemu(extra_args=args).start()
    vm, _ = await connected_vm(make_vm, sock)
    assert await vm.usb_buses() == ["xhci.0", "xhci2.0"]
    with pytest.raises(VmConfigError) as err:
        await vm.attach(DEV, SCARLETT)
    assert "xhci.0" in str(err.value)
    assert "xhci2.0" in str(err.value)
    assert "usb_bus" in str(err.value)

    vm2, _ = await connected_vm(make_vm, str(_second(qemu, args)), usb_bus="xhci2.0")
    await vm2.attach(DEV, SCARLETT)
    assert (await vm2.observe())[DEV].bus == "xhci2.0"


def _second(qemu: QemuFactory, args: list[str]) -> str:
    return qemu(extra_args=args).start()


async def test_xhci_wins_over_builtin_ehci_and_uhci(qemu: QemuFactory, make_vm: MakeVm) -> None:
    # q35 with usb=on brings ICH9 EHCI + UHCI companions; the user adds an xHCI.
    sock = qemu(machine="q35,usb=on").start()
    vm, _ = await connected_vm(make_vm, sock)
    info = await vm.usb_bus_info()
    kinds = {b.kind.value for b in info}
    assert {"xhci", "ehci"} <= kinds, info
    assert await vm.usb_bus() == "xhci.0"


async def test_unknown_configured_bus_is_a_qmp_error(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock, usb_bus="nope.0")
    with pytest.raises(VmError) as err:
        await vm.attach(DEV, SCARLETT)
    assert err.value.qmp_class == "GenericError"


async def test_observe_all_reports_foreign_usb_host_devices(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    args = [
        *XHCI,
        "-device",
        "usb-host,id=user-dev,vendorid=0x046d,productid=0xc52b",
        "-device",
        "usb-host,hostbus=1,hostport=4",
        "-device",
        "usb-tablet,id=tablet",
    ]
    sock = qemu(extra_args=args).start()
    vm, _ = await connected_vm(make_vm, sock)
    await vm.attach(DEV, SCARLETT)
    assert set(await vm.observe()) == {DEV}
    everything = await vm.observe_all()
    assert DEV in everything
    assert everything["user-dev"].vendorid == 0x046D
    assert not everything["user-dev"].managed
    anon = [d for k, d in everything.items() if k.startswith("/machine/peripheral-anon/")]
    assert len(anon) == 1
    assert (anon[0].hostbus, anon[0].hostport) == (1, "4")
    assert len(everything) == 3  # the usb-tablet is no usb-host


async def test_tcp_address(qemu: QemuFactory, make_vm: MakeVm, unused_tcp_port: int) -> None:
    port = unused_tcp_port
    proc = qemu(extra_args=[*XHCI, "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    proc.start()
    await asyncio.sleep(0.1)
    vm, _ = await connected_vm(make_vm, f"tcp:127.0.0.1:{port}")
    await vm.attach(DEV, SCARLETT)
    assert DEV in await vm.observe()


async def test_stop_closes_the_session(qemu: QemuFactory, make_vm: MakeVm) -> None:
    sock = qemu().start()
    vm, _ = await connected_vm(make_vm, sock)
    assert not await other_client_can_talk(sock, timeout=0.3)
    await vm.stop()
    assert not vm.connected
    assert await other_client_can_talk(sock)
