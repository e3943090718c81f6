"""`vmplug generate qemu`: golden output, and a real QEMU that takes it."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.devices import AUDIO, DISK, HUB, KEYLAB, ROOT, SERIAL_A, SERIAL_B
from vmplug.cli.errors import exit_status
from vmplug.generate import qemu
from vmplug.generate.common import CannotExpress
from vmplug.model import UsbDevice

from .conftest import QemuRun, Qmp, qemu_fails


def _args(text: str) -> list[str]:
    """What a shell makes of the non-comment lines."""
    return [w for line in text.splitlines() if not line.startswith("#") for w in shlex.split(line)]


def test_golden_args(golden: Callable[[str, str], None]) -> None:
    plan = qemu.plan_qemu([AUDIO, KEYLAB, DISK])
    golden("qemu-args.txt", qemu.render_args(plan))


def test_golden_readconfig(golden: Callable[[str, str], None]) -> None:
    plan = qemu.plan_qemu([AUDIO, KEYLAB, DISK], qmp="/srv/vm/qmp.sock")
    golden("qemu-readconfig.cfg", qemu.render_readconfig(plan))


def test_golden_by_port(golden: Callable[[str, str], None]) -> None:
    plan = qemu.plan_qemu([SERIAL_A, SERIAL_B], by_port=True)
    golden("qemu-by-port.txt", qemu.render_args(plan))


def test_rendered_args_are_the_plan() -> None:
    plan = qemu.plan_qemu([AUDIO, KEYLAB, DISK], qmp="/tmp/a b,c.sock")
    assert _args(qemu.render_args(plan)) == plan.args()


def test_usb3_first_on_usb3_ports_and_audio_buffers() -> None:
    plan = qemu.plan_qemu([AUDIO, KEYLAB, DISK])
    ports = {d.id: d.port for d in plan.devices}
    assert ports[DISK.qemu_id] == 1  # the only USB 3 device: USB 3 port 1
    assert plan.p3 >= 1 and plan.p2 >= 3
    by_id = {d.id: d for d in plan.devices}
    audio = by_id[AUDIO.qemu_id]  # full speed: 1 ms frames
    assert (audio.isobufs, audio.isobsize) == qemu.AUDIO_FS
    assert "isochronous" in audio.notes[0]
    keylab = by_id[KEYLAB.qemu_id]  # audio class but MIDI over bulk: defaults
    assert (keylab.isobufs, keylab.isobsize) == (None, None)
    assert [d.id for d in plan.devices] == [AUDIO.qemu_id, KEYLAB.qemu_id, DISK.qemu_id]


def test_high_speed_audio_gets_microframe_sized_buffers() -> None:
    hs_audio = dataclasses.replace(AUDIO, speed_mbps=480.0)  # the same device on a HS port
    [dev] = qemu.plan_qemu([hs_audio]).devices
    assert (dev.isobufs, dev.isobsize) == qemu.AUDIO_HS
    assert "8 ms each" in dev.notes[0]
    assert "64 ms" in dev.notes[0]
    [fs] = qemu.plan_qemu([AUDIO]).devices
    assert "8 ms each" in fs.notes[0]
    assert "128 ms" in fs.notes[0]


def test_never_hostaddr() -> None:
    for by_port in (False, True):
        plan = qemu.plan_qemu([SERIAL_A], by_port=by_port)
        assert all("hostaddr" not in a and "hostdevice" not in a for a in plan.args())


def test_by_port_uses_bus_and_port_chain() -> None:
    plan = qemu.plan_qemu([AUDIO], by_port=True)
    assert dict(plan.devices[0].match) == {"hostbus": "2", "hostport": "2.1"}


def test_many_usb3_devices_grow_p3() -> None:
    disks = [
        dataclasses.replace(DISK, port=f"4-{i}", product_id=0x2300 + i, serial=f"S{i}")
        for i in range(1, 7)
    ]
    plan = qemu.plan_qemu(disks)
    assert plan.p3 == 6 and plan.p2 == 6
    assert sorted(d.port for d in plan.devices) == list(range(1, 7))


@pytest.mark.parametrize(
    ("devices", "by_port", "message"),
    [
        ([HUB], False, "hub"),
        ([ROOT], False, "root hub"),
        ([SERIAL_A, SERIAL_B], False, "--by-port"),
        ([dataclasses.replace(SERIAL_A, vendor_id=None)], False, "no vendor/product"),
        (
            [dataclasses.replace(SERIAL_A, port=f"1-{i}", product_id=i) for i in range(1, 17)],
            False,
            "at most 15",
        ),
        ([], False, "at least one device"),
    ],
)
def test_errors(devices: list[UsbDevice], by_port: bool, message: str) -> None:
    with pytest.raises(Exception, match=message) as info:
        qemu.plan_qemu(devices, by_port=by_port)
    assert exit_status(info.value) == 2


def test_readconfig_refuses_a_quote() -> None:
    plan = qemu.plan_qemu([AUDIO], qmp='/tmp/a"b.sock')
    with pytest.raises(CannotExpress, match="double quote"):
        qemu.render_readconfig(plan)
    assert '"' in _args(qemu.render_args(plan))[-1]  # the argument form can


# ---------------------------------------------------------------------------
# Real QEMU


def _check_in_qemu(run: QemuRun, plan: qemu.QemuPlan) -> None:
    q = run.qmp
    peripherals = {p["name"] for p in q.cmd("qom-list", path="/machine/peripheral")}
    assert plan.controller_id in peripherals
    ctrl = f"/machine/peripheral/{plan.controller_id}"
    assert q.qom_get(ctrl, "type") == "qemu-xhci"
    assert q.qom_get(ctrl, "p2") == plan.p2
    assert q.qom_get(ctrl, "p3") == plan.p3
    for dev in plan.devices:
        assert dev.id in peripherals
        path = f"/machine/peripheral/{dev.id}"
        assert q.qom_get(path, "type") == "usb-host"
        assert q.qom_get(path, "port") == str(dev.port)
        match = dict(dev.match)
        if "vendorid" in match:
            assert q.qom_get(path, "vendorid") == int(match["vendorid"], 16)
            assert q.qom_get(path, "productid") == int(match["productid"], 16)
        else:
            assert q.qom_get(path, "hostbus") == int(match["hostbus"])
            assert q.qom_get(path, "hostport") == match["hostport"]
        assert q.qom_get(path, "hostaddr") == 0  # never by device number
        assert q.qom_get(path, "isobufs") == (dev.isobufs or qemu.QEMU_ISOBUFS)
        assert q.qom_get(path, "isobsize") == (dev.isobsize or qemu.QEMU_ISOBSIZE)
        # On the controller's bus, at the port we chose.
        bus = q.qom_get(path, "parent_bus")
        assert bus.endswith((f"/{plan.bus}", f"{plan.controller_id}/{plan.bus}"))
    usb = q.cmd("human-monitor-command", **{"command-line": "info usb"})
    for dev in plan.devices:
        assert f"Port {dev.port}," in usb and f"ID: {dev.id}" in usb


def test_qemu_takes_the_args(start_qemu: Callable[[list[str]], QemuRun], tmp_path: Path) -> None:
    sock = tmp_path / "vm,qmp.sock"
    plan = qemu.plan_qemu([AUDIO, KEYLAB, DISK], qmp=str(sock))
    run = start_qemu(_args(qemu.render_args(plan)))
    _check_in_qemu(run, plan)
    # vmplug's own QMP socket works too (the comma in its name was escaped).
    own = Qmp(sock)
    assert own.cmd("query-status")["status"] == "prelaunch"
    own.close()


def test_qemu_takes_by_port(start_qemu: Callable[[list[str]], QemuRun]) -> None:
    plan = qemu.plan_qemu([SERIAL_A, SERIAL_B, AUDIO], by_port=True)
    _check_in_qemu(start_qemu(_args(qemu.render_args(plan))), plan)


def test_qemu_takes_the_readconfig(
    start_qemu: Callable[[list[str]], QemuRun], tmp_path: Path
) -> None:
    sock = tmp_path / "own qmp.sock"
    disks = [
        dataclasses.replace(DISK, port=f"4-{i}", product_id=0x2300 + i, serial=f"S{i}")
        for i in range(1, 6)
    ]
    plan = qemu.plan_qemu([AUDIO, KEYLAB, *disks], qmp=str(sock))
    cfg = tmp_path / "usb.cfg"
    cfg.write_text(qemu.render_readconfig(plan))
    run = start_qemu(["-readconfig", str(cfg)])
    _check_in_qemu(run, plan)
    own = Qmp(sock)
    assert own.cmd("query-status")["status"] == "prelaunch"
    own.close()


def test_qemu_refuses_a_port_beyond_the_controller() -> None:
    """The port arithmetic is QEMU's: max(p2, p3) ports, no more."""
    err = qemu_fails(
        [
            "-device",
            "qemu-xhci,id=x,p2=4,p3=2",
            "-device",
            "usb-host,bus=x.0,port=5,vendorid=0x1234,productid=0x5678",
        ]
    )
    assert "port" in err.lower()
