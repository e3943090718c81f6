"""plan(): when an observed attachment pinned to a device number is stale, and the
usb-host arguments of the node form."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vmplug.engine.desired as desired_mod
import vmplug.model as model
import vmplug.vms.base as base
from vmplug.engine.desired import Attachment, plan, stale_pin
from vmplug.vms.base import UsbHostSpec


def want(devnum: int = 7) -> Attachment:
    return Attachment("vm", "vmplug-0123456789ab", 2, "2.1", hostaddr=devnum, port="2-2.1")


def held(hostaddr: int | None, live: bool = True, hostport: str = "2.1") -> Attachment:
    return Attachment("vm", "vmplug-0123456789ab", 2, hostport, hostaddr=hostaddr, live=live)


def kinds(have: Attachment) -> list[str]:
    return [a.kind for a in plan([want()], {"vm": {have.qemu_id: have}}, ["vm"])]


def test_port_form_follows_the_socket_whatever_the_number() -> None:
    # QEMU re-grabs a port-form device itself: no number to be stale about
    assert not stale_pin(held(None), want())
    assert not stale_pin(held(None, live=False), want())
    assert kinds(held(None)) == []


def test_pinned_to_the_current_number_and_held_is_kept() -> None:
    assert not stale_pin(held(7), want(7))
    assert kinds(held(7)) == []


def test_pinned_to_an_old_number_is_replaced() -> None:
    # a replug vmplug did not see (daemon down, lost uevents): QEMU never re-grabs
    assert stale_pin(held(5), want(7))
    assert kinds(held(5)) == ["detach", "attach"]


def test_pinned_but_let_go_by_qemu_is_replaced() -> None:
    assert stale_pin(held(7, live=False), want(7))
    actions = plan([want()], {"vm": {"vmplug-0123456789ab": held(7, live=False)}}, ["vm"])
    assert [a.kind for a in actions] == ["detach", "attach"]
    assert "gone" in actions[0].reason


def test_another_port_is_replaced_before_any_number_check() -> None:
    actions = plan([want()], {"vm": {"vmplug-0123456789ab": held(7, hostport="2.2")}}, ["vm"])
    assert [a.kind for a in actions] == ["detach", "attach"]
    assert "2-2.2" in actions[0].reason


def test_unreachable_vm_gets_no_actions() -> None:
    assert plan([want()], {"vm": {"vmplug-0123456789ab": held(5)}}, []) == []


def test_node_form_arguments_keep_the_port_for_observers() -> None:
    spec = UsbHostSpec(hostbus=2, hostport="2.1", hostaddr=7, hostdevice="/dev/bus/usb/002/007")
    assert spec.problem() is None
    assert spec.qmp_args() == {
        "hostdevice": "/dev/bus/usb/002/007",
        "hostbus": 2,
        "hostaddr": 7,
        "hostport": "2.1",
    }
    assert UsbHostSpec(hostdevice="/dev/bus/usb/001/002").problem() is None


@pytest.mark.parametrize(
    "node", ["/dev/sda", "/dev/bus/usb/2/7", "/dev/bus/usb/002/007/../../../sda", ""]
)
def test_node_form_takes_only_a_usbfs_node(node: str) -> None:
    spec = UsbHostSpec(hostbus=2, hostport="2.1", hostdevice=node)
    assert spec.problem() is not None and "hostdevice" in str(spec.problem())
    with pytest.raises(ValueError, match="hostdevice"):
        spec.qmp_args()


def test_one_id_prefix_for_every_qemu_id() -> None:
    """vmplug's QEMU ids have one prefix, defined once (model.py, next to the
    id it prefixes) and read by the VM side and the daemon from there."""
    assert base.ID_PREFIX is model.ID_PREFIX == "vmplug-"
    assert not hasattr(desired_mod, "ID_PREFIX")
    src = Path(model.__file__).parent
    defined = [
        path.relative_to(src).as_posix()
        for path in sorted(src.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(t, ast.Name) and t.id == "ID_PREFIX"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    assert defined == ["model.py"]
