"""The VM contract (:class:`vmplug.vms.base.VmBackend`): every backend meets it,
for mypy and at run time, and what a real QEMU does reaches the daemon as typed
:class:`~vmplug.vms.base.VmEvent` values."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
from qemu.qmp import QMPClient

from tests.support.vmrig import DockerApiServer, QemuFactory
from tests.vms.test_vms_container import container_qemu, windows_doc
from vmplug.vms.base import (
    ID_PREFIX,
    Binding,
    Notifier,
    ObservedDevice,
    OnVmEvent,
    UsbHostSpec,
    VmBackend,
    VmEvent,
    VmEventKind,
)
from vmplug.vms.container import ContainerVm
from vmplug.vms.libvirt import LibvirtVm
from vmplug.vms.proxmox import ProxmoxVm
from vmplug.vms.qmp import QmpVm

K = VmEventKind
BACKENDS: tuple[type, ...] = (QmpVm, ProxmoxVm, ContainerVm, LibvirtVm)
REPO = Path(__file__).resolve().parents[2]
DEV = f"{ID_PREFIX}0123456789ab"
SCARLETT = UsbHostSpec.by_id(0x1235, 0x821A)


def every_backend_is_a_vm_backend(
    qmp: QmpVm, pve: ProxmoxVm, box: ContainerVm, domain: LibvirtVm
) -> list[VmBackend]:
    """The typed check: mypy (strict, over tests/) refuses this module when a
    backend stops meeting the contract.  test_mypy_... proves mypy would."""
    return [qmp, pve, box, domain]


# -- the typed check ---------------------------------------------------------


def test_mypy_accepts_every_backend_and_refuses_a_broken_one(tmp_path: Path) -> None:
    """The same assignment as above, plus two backends that break the contract
    (no observe_bindings; attach taking the old untyped string), run through
    mypy with the project's configuration: only the broken ones are refused."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """\
            from collections.abc import Mapping

            from vmplug.vms.base import ObservedDevice, VmBackend, VmState
            from vmplug.vms.container import ContainerVm
            from vmplug.vms.libvirt import LibvirtVm
            from vmplug.vms.proxmox import ProxmoxVm
            from vmplug.vms.qmp import QmpVm


            def good(a: QmpVm, b: ProxmoxVm, c: ContainerVm, d: LibvirtVm) -> list[VmBackend]:
                return [a, b, c, d]


            class NoBindings:
                name = "x"
                connected = False
                state = VmState.DISCONNECTED

                async def start(self) -> None: ...
                async def stop(self) -> None: ...
                async def wait_connected(self, timeout: float | None = None) -> bool:
                    return False

                async def observe(self) -> Mapping[str, ObservedDevice]:
                    return {}

                async def attach(self, dev_id: str, spec: object) -> None: ...
                async def detach(self, dev_id: str, timeout: float = 5.0) -> None: ...


            class StringSpec(QmpVm):
                # the old contract's attach: anything, here a string
                async def attach(  # type: ignore[override]
                    self, dev_id: str, spec: str
                ) -> None: ...


            def bad_bindings(x: NoBindings) -> VmBackend:
                return x  # refused


            def bad_spec(x: StringSpec) -> VmBackend:
                return x  # refused
            """
        )
    )
    refused = [
        n for n, line in enumerate(probe.read_text().splitlines(), 1) if line.endswith("# refused")
    ]
    from mypy import api  # noqa: PLC0415 - only this test needs mypy

    out, err, _status = api.run(
        [
            str(probe),
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--no-error-summary",
        ]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    lines = sorted(int(line.split(":")[1]) for line in errors)
    assert len(refused) == 2 and lines == refused, out + err


# -- the run-time check ------------------------------------------------------


def _contract() -> dict[str, Any]:
    """VmBackend's members: name -> the function, property or annotation."""
    members: dict[str, Any] = {k: v for k, v in vars(VmBackend).items() if not k.startswith("_")}
    members.update((k, v) for k, v in VmBackend.__annotations__.items() if not k.startswith("_"))
    return members


def _covariant(have: Any, want: Any) -> bool:
    """``have`` (a backend's return type) may stand where ``want`` is expected:
    equal, or the same arguments on a subclass of the generic (dict for Mapping)."""
    if have == want:
        return True
    h, w = get_origin(have), get_origin(want)
    return (
        isinstance(h, type)
        and isinstance(w, type)
        and issubclass(h, w)
        and get_args(have) == get_args(want)
    )


def test_the_contract_is_what_the_daemon_uses() -> None:
    assert set(_contract()) == {
        "name", "connected", "state", "start", "stop", "wait_connected",
        "observe", "observe_bindings", "attach", "detach",
    }  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda c: c.__name__)
def test_backend_methods_have_the_contracts_signatures(backend: type) -> None:
    for name, want in _contract().items():
        have = getattr(backend, name, None)
        if isinstance(want, property):
            assert isinstance(have, property), f"{backend.__name__}.{name} is not a property"
            assert want.fget is not None and have.fget is not None
            assert _covariant(
                get_type_hints(have.fget)["return"], get_type_hints(want.fget)["return"]
            ), name
        elif callable(want) and not isinstance(want, type):
            assert callable(have), f"{backend.__name__} has no {name}()"
            assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
            got, wanted = inspect.signature(have), inspect.signature(want)
            shape = [(p.name, p.kind, p.default) for p in got.parameters.values()]
            expected = [(p.name, p.kind, p.default) for p in wanted.parameters.values()]
            assert shape == expected, f"{backend.__name__}.{name}{got} != {wanted}"
            hints, contract = get_type_hints(have), get_type_hints(want)
            params = [p for p in wanted.parameters if p != "self"]
            assert [hints.get(p) for p in params] == [contract[p] for p in params], name
            assert _covariant(hints["return"], contract["return"]), (
                f"{backend.__name__}.{name} returns {hints['return']}, not {contract['return']}"
            )


def _unstarted(backend: type, on_change: OnVmEvent) -> Any:
    if backend is ProxmoxVm:
        return ProxmoxVm("pve", 101, on_change=on_change)
    if backend is ContainerVm:
        return ContainerVm("box", "windows", on_change=on_change)
    if backend is LibvirtVm:
        return LibvirtVm("dom", "win11", on_change=on_change)
    return QmpVm("plain", "/nonexistent/qmp.sock", on_change=on_change)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda c: c.__name__)
def test_backends_notify_through_the_one_notifier(
    backend: type, caplog: pytest.LogCaptureFixture
) -> None:
    """One _notify for every backend (Notifier's): a VmEvent with the VM's
    name; a listener that raises is logged and does not reach the backend."""
    heard: list[VmEvent] = []
    vm = _unstarted(backend, heard.append)
    assert isinstance(vm, Notifier) and isinstance(vm.name, str)
    assert type(vm)._notify is Notifier._notify
    vm._notify(K.DEVICE_DELETED, DEV)
    assert heard == [VmEvent(vm.name, K.DEVICE_DELETED, DEV)]

    def broken(_event: VmEvent) -> None:
        raise RuntimeError("listener bug")

    vm.on_change = broken
    with caplog.at_level(logging.ERROR, logger="vmplug.vms"):
        vm._notify(K.RESET)
    assert "on_change(reset) failed" in caplog.text and "listener bug" in caplog.text


# -- the values --------------------------------------------------------------


def test_vm_events_are_small_frozen_values() -> None:
    event = VmEvent("win", K.DEVICE_DELETED, DEV)
    assert event == VmEvent("win", K.DEVICE_DELETED, DEV) and hash(event)
    assert str(event) == f"device_deleted {DEV}" and str(VmEvent("win", K.RESET)) == "reset"
    field = "kind"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, field, K.RESET)
    with pytest.raises(ValueError, match="device id"):
        VmEvent("win", K.DEVICE_DELETED)
    with pytest.raises(ValueError, match="device id"):
        VmEvent("win", K.RESET, DEV)
    assert K.from_qmp("DEVICE_DELETED") is K.DEVICE_DELETED
    assert K.from_qmp("SHUTDOWN") is K.SHUTDOWN and K.from_qmp("RTC_CHANGE") is None


def test_observed_device_projects_to_the_reconcilers_binding() -> None:
    seen = ObservedDevice(DEV, 3, 7, "1.4", 0x1235, 0x821A, False, "xhci.0", "/machine/x")
    assert seen.binding == Binding(DEV, 3, "1.4", 7, False)


def test_the_factory_no_longer_imports_the_daemon() -> None:
    """vms/factory.py <-> the daemon (engine/daemon.py, now daemon/reconciler.py)
    was an import circle; the factory (and the contract) now stand without it."""
    code = (
        "import sys, vmplug.vms.factory, vmplug.vms.base;"
        "print('vmplug.daemon.reconciler' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"


# -- real QEMU ---------------------------------------------------------------


async def _until(check: Callable[[], bool], timeout: float = 10.0, what: object = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in time: {what}")
        await asyncio.sleep(0.01)


async def _qmp(sock: str, *commands: str | tuple[str, dict[str, object]]) -> None:
    """Run commands on a second QMP socket (as another client would)."""
    other = QMPClient("other")
    await other.connect(sock)
    try:
        for cmd in commands:
            name, args = (cmd, None) if isinstance(cmd, str) else cmd
            await other.execute(name, args)
    finally:
        with contextlib.suppress(EOFError, OSError):  # "quit": QEMU hung up first
            await other.disconnect()


@pytest.mark.qemu
async def test_a_real_qemus_device_del_reset_shutdown_and_death_are_typed_events(
    qemu: QemuFactory,
) -> None:
    proc = qemu(qmp_sockets=2)
    sock = proc.start()
    other = str(proc.qmp_paths[1])
    events: list[VmEvent] = []
    vm = QmpVm("win", sock, on_change=events.append)
    await vm.start()
    try:
        assert await vm.wait_connected(5)
        await vm.attach(DEV, SCARLETT)
        await vm.detach(DEV)  # vmplug's own device_del: DEVICE_DELETED before it returns
        assert events == [VmEvent("win", K.CONNECTED), VmEvent("win", K.DEVICE_DELETED, DEV)]
        await _qmp(other, "system_reset")
        await _until(lambda: len(events) == 3, what=events)
        await vm.attach(DEV, SCARLETT)
        await _qmp(other, ("device_del", {"id": DEV}))  # behind vmplug's back
        await _until(lambda: len(events) == 4, what=events)
        await _qmp(other, "quit")
        await _until(lambda: len(events) == 6, what=events)
        proc.wait()
        proc.start()  # a new QEMU on the same socket, killed: no SHUTDOWN, only the loss
        await _until(lambda: len(events) == 7, what=events)
        proc.kill(signal.SIGKILL)
        await _until(lambda: len(events) == 8, what=events)
    finally:
        await vm.stop()
    assert events == [
        VmEvent("win", K.CONNECTED),
        VmEvent("win", K.DEVICE_DELETED, DEV),
        VmEvent("win", K.RESET),
        VmEvent("win", K.DEVICE_DELETED, DEV),
        VmEvent("win", K.SHUTDOWN),
        VmEvent("win", K.DISCONNECTED),
        VmEvent("win", K.CONNECTED),
        VmEvent("win", K.DISCONNECTED),
    ], [str(e) for e in events]
    assert all(type(e) is VmEvent and type(e.kind) is VmEventKind for e in events)


@pytest.mark.qemu
async def test_a_container_vm_passes_its_qemus_events_on_under_its_own_name(
    docker_api: DockerApiServer, qemu: QemuFactory
) -> None:
    # the bind mount that holds the image's QMP socket (short: sun_path is 108 bytes)
    qmp_dir = Path(tempfile.mkdtemp(prefix="vmplug-ct", dir="/tmp"))
    docker_api.add(windows_doc(qmp_dir))
    proc = container_qemu(qemu, qmp_dir)
    proc.start()
    events: list[VmEvent] = []
    vm = ContainerVm("box", "windows", uri=f"unix://{docker_api.socket}", on_change=events.append)
    await vm.start()
    try:
        assert await vm.wait_connected(15)
        await vm.attach(DEV, SCARLETT)
        await _qmp(proc.qmp_path, "system_reset", ("device_del", {"id": DEV}))
        # QEMU sends DEVICE_DELETED after device_del's reply, from its main loop:
        # a "quit" right behind the device_del would end QEMU before it
        await _until(lambda: len(events) == 3, what=events)
        await _qmp(proc.qmp_path, "quit")
        await _until(lambda: len(events) == 5, what=events)
    finally:
        await vm.stop()
        shutil.rmtree(qmp_dir, ignore_errors=True)
    assert events == [
        VmEvent("box", K.CONNECTED),
        VmEvent("box", K.RESET),
        VmEvent("box", K.DEVICE_DELETED, DEV),
        VmEvent("box", K.SHUTDOWN),
        VmEvent("box", K.DISCONNECTED),
    ], [str(e) for e in events]
