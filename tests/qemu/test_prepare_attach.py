"""QmpVm.prepare_attach against real QEMU: the bus lookup done ahead of the
first attach (the daemon's start), and what it must not do: add a controller,
raise, or settle a choice the attach would refuse."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.qemu_proc import QemuFactory
from vmplug.vms.base import UsbHostSpec, VmConfigError
from vmplug.vms.qmp import QmpVm

pytestmark = pytest.mark.qemu

MakeVm = Callable[..., QmpVm]
DEV = "vmplug-0123456789ab"


async def connected(make_vm: MakeVm, sock: str, **kw: object) -> QmpVm:
    vm = make_vm("win", sock, **kw)
    await vm.start()
    assert await vm.wait_connected(5), "QmpVm did not connect"
    return vm


def spy_commands(vm: QmpVm, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    real_exec = vm._exec

    async def spy(client: object, cmd: str, args: object = None) -> object:
        path = args.get("path") if isinstance(args, dict) else None
        sent.append(f"{cmd} {path or ''}".strip())
        return await real_exec(client, cmd, args)  # type: ignore[arg-type]

    monkeypatch.setattr(vm, "_exec", spy)
    return sent


async def test_prepared_bus_leaves_the_attach_only_its_device_add(
    qemu: QemuFactory, make_vm: MakeVm, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = await connected(make_vm, qemu().start())
    sent = spy_commands(vm, monkeypatch)
    assert await vm.observe_bindings() == {}
    await vm.prepare_attach()
    await vm.prepare_attach()  # once per session
    assert sent == [
        "qom-list /machine/peripheral",  # observe_bindings; the lookup reuses it
        "qom-list /machine/peripheral-anon",
        "qom-list /machine/unattached",
        "qom-list /machine/peripheral/xhci",
    ]
    sent.clear()
    await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))
    assert sent == ["device_add"]
    assert (await vm.observe())[DEV].bus == "xhci.0"


async def test_prepare_without_a_fresh_listing_lists_the_peripherals_itself(
    qemu: QemuFactory, make_vm: MakeVm, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = await connected(make_vm, qemu().start())
    sent = spy_commands(vm, monkeypatch)
    await vm.prepare_attach()
    assert sent[0] == "qom-list /machine/peripheral" and len(sent) == 4, sent
    assert await vm.usb_bus() == "xhci.0"


async def test_prepare_leaves_an_ambiguous_vm_to_the_attach(
    qemu: QemuFactory, make_vm: MakeVm
) -> None:
    two = ["-device", "qemu-xhci,id=x1", "-device", "qemu-xhci,id=x2"]
    vm = await connected(make_vm, qemu(extra_args=two).start())
    await vm.observe_bindings()
    await vm.prepare_attach()  # raises nothing
    with pytest.raises(VmConfigError, match="several USB buses"):
        await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))


async def test_prepare_adds_no_controller(qemu: QemuFactory, make_vm: MakeVm) -> None:
    vm = await connected(make_vm, qemu(extra_args=[], machine="pc").start(), add_controller=True)
    await vm.observe_bindings()
    await vm.prepare_attach()
    assert await vm.usb_buses() == []  # only an attach adds one
    await vm.attach(DEV, UsbHostSpec.by_port(1, "4"))
    assert await vm.usb_buses() == ["vmplug-xhci.0"]
