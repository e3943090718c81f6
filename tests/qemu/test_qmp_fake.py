"""QmpVm against a scripted QMP server standing in for a QEMU this host lacks.

QEMU 10.1 added ``qom-list-get`` (every property of many objects in one
command); the installed QEMU is older, so the one-command observe path and its
fallback are checked here against a small fake that speaks the wire protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmplug.vms.base import Binding, UsbHostSpec
from vmplug.vms.qmp import QmpVm

DEVICES: dict[str, dict[str, Any]] = {
    "vmplug-aaaaaaaaaaaa": {"vendorid": 0x1235, "productid": 0x821A, "attached": True},
    "vmplug-bbbbbbbbbbbb": {"hostbus": 3, "hostport": "1.2", "attached": False},
    "user-dev": {"vendorid": 0x046D, "productid": 0xC52B, "attached": False},
}
DEFAULTS: dict[str, Any] = {
    "hostbus": 0,
    "hostaddr": 0,
    "hostport": "",
    "vendorid": 0,
    "productid": 0,
    "parent_bus": "/machine/peripheral/xhci/xhci.0",
}


class FakeQemu:
    """Answers the handful of commands QmpVm sends, and counts them."""

    def __init__(
        self,
        version: tuple[int, int, int],
        *,
        list_get: bool,
        devices: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.version = version
        self.list_get = list_get
        self.devices = DEVICES if devices is None else devices
        self.commands: list[str] = []

    def props(self, dev: str) -> dict[str, Any]:
        return DEFAULTS | self.devices[dev]

    def answer(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd in ("qmp_capabilities", "device_add"):
            return {"return": {}}
        if cmd == "query-status":
            return {"return": {"status": "running", "running": True}}
        if cmd == "qom-list" and args["path"] == "/machine/peripheral":
            children = [{"name": d, "type": "child<usb-host>"} for d in self.devices]
            xhci = {"name": "xhci", "type": "child<qemu-xhci>"}
            return {"return": [{"name": "type", "type": "string"}, xhci, *children]}
        if cmd == "qom-list" and args["path"] == "/machine/peripheral/xhci":
            return {"return": [{"name": "xhci.0", "type": "child<usb-bus>"}]}
        if cmd == "qom-list":
            return {"return": []}
        if cmd == "qom-list-get" and self.list_get:
            out = []
            for path in args["paths"]:
                props = self.props(path.rsplit("/", 1)[1])
                out.append(
                    {"properties": [{"name": k, "type": "x", "value": v} for k, v in props.items()]}
                )
            return {"return": out}
        if cmd == "qom-get":
            return {"return": self.props(args["path"].rsplit("/", 1)[1])[args["property"]]}
        return {
            "error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        major, minor, micro = self.version
        greeting = {
            "QMP": {
                "version": {
                    "qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": "",
                },
                "capabilities": [],
            }
        }
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        decoder = json.JSONDecoder()
        buf = ""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                buf += chunk.decode()
                while buf.strip():  # a JSON stream: messages need no newline
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break
                    buf = buf.lstrip()[end:]
                    self.commands.append(msg["execute"])
                    reply = self.answer(msg["execute"], msg.get("arguments", {}))
                    if "id" in msg:
                        reply["id"] = msg["id"]
                    writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def fake_qemu(fake: FakeQemu) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="vmplug-f", dir="/tmp") as tmp:
        path = str(Path(tmp) / "qmp.sock")
        server = await asyncio.start_unix_server(fake.serve, path)
        try:
            yield path
        finally:
            server.close()


@pytest.mark.parametrize("shared", [False, True])
async def test_qom_list_get_reads_everything_in_one_command(shared: bool) -> None:
    fake = FakeQemu((10, 1, 0), list_get=True)
    async with fake_qemu(fake) as sock:
        vm = QmpVm("new", sock, shared=shared)
        await vm.start()
        try:
            assert await vm.wait_connected(5)
            assert vm.qemu_version == (10, 1, 0)
            fake.commands.clear()
            seen = await vm.observe_all()
        finally:
            await vm.stop()
    assert "qom-get" not in fake.commands
    assert fake.commands.count("qom-list-get") == 1
    assert set(seen) == set(DEVICES)
    scarlett = seen["vmplug-aaaaaaaaaaaa"]
    assert (scarlett.vendorid, scarlett.productid, scarlett.attached) == (0x1235, 0x821A, True)
    assert scarlett.bus == "xhci.0"
    by_port = seen["vmplug-bbbbbbbbbbbb"]
    assert (by_port.hostbus, by_port.hostport, by_port.vendorid) == (3, "1.2", None)
    assert not seen["user-dev"].managed


async def test_missing_qom_list_get_falls_back_to_qom_get() -> None:
    fake = FakeQemu((10, 1, 0), list_get=False)  # e.g. a build without it
    async with fake_qemu(fake) as sock:
        vm = QmpVm("odd", sock)
        await vm.start()
        try:
            assert await vm.wait_connected(5)
            first = await vm.observe()
            fake.commands.clear()
            second = await vm.observe()
        finally:
            await vm.stop()
    assert first == second
    assert set(first) == {"vmplug-aaaaaaaaaaaa", "vmplug-bbbbbbbbbbbb"}
    # Told once; then only the listing and `attached` (match properties are cached).
    assert "qom-list-get" not in fake.commands
    assert fake.commands.count("qom-get") == 2  # user-dev is not read by observe()


async def test_old_qemu_is_never_sent_qom_list_get() -> None:
    fake = FakeQemu((7, 2, 0), list_get=True)
    async with fake_qemu(fake) as sock:
        vm = QmpVm("old", sock)
        await vm.start()
        try:
            assert await vm.wait_connected(5)
            await vm.observe()
            await vm.attach("vmplug-cccccccccccc", UsbHostSpec.by_id(1, 2))
        finally:
            await vm.stop()
    assert "qom-list-get" not in fake.commands


PINNED = "vmplug-cccccccccccc"  # hostdevice form: pinned to device 3:7


@pytest.mark.parametrize(("version", "list_get"), [((7, 2, 0), False), ((10, 1, 0), True)])
async def test_observe_bindings_reads_each_device_once_per_session(
    version: tuple[int, int, int], list_get: bool
) -> None:
    pinned = {"hostbus": 3, "hostport": "1.4", "hostaddr": 7, "attached": False}
    fake = FakeQemu(version, list_get=list_get, devices=DEVICES | {PINNED: pinned})
    async with fake_qemu(fake) as sock:
        vm = QmpVm("reconciler", sock)
        await vm.start()
        try:
            assert await vm.wait_connected(5)
            fake.commands.clear()
            first = await vm.observe_bindings()
            cold = list(fake.commands)
            fake.commands.clear()
            second = await vm.observe_bindings()
            warm = list(fake.commands)
        finally:
            await vm.stop()
    assert first == second
    assert set(first) == {"vmplug-aaaaaaaaaaaa", "vmplug-bbbbbbbbbbbb", PINNED}  # not user-dev
    by_port = first["vmplug-bbbbbbbbbbbb"]
    assert (by_port.hostbus, by_port.hostport, by_port.hostaddr, by_port.attached) == (
        3,
        "1.2",
        None,
        None,  # the port form: `attached` decides nothing, so it is not read
    )
    assert first[PINNED] == Binding(PINNED, 3, "1.4", 7, False)
    if list_get:
        assert cold == ["qom-list", "qom-list-get"]
    else:  # the three binding properties of the three vmplug devices, `attached` of one
        assert sorted(cold) == ["qom-get"] * 10 + ["qom-list"]
    assert sorted(warm) == ["qom-get", "qom-list"]  # only the pinned device's `attached`
