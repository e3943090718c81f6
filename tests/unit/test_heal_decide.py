"""The ladder's pure decision (vmplug.daemon.heal.decide) over journals written
to a real SQLite store, and the kernel lever that must refuse: the controller
rung only for a controller ``[heal] controllers`` names, the guest's problem
as a trigger, the backoff between rungs and the hourly cap.  Each test fails
when its rule is taken out of decide()."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vmplug.daemon.heal import GUEST_PROBLEM, LADDER, HubPower, Rung, decide
from vmplug.engine.remedy import HealPolicy, parse_policy
from vmplug.history.store import EventKind, HistoryEntry, Store
from vmplug.host import usbctl

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sysfs"
ID, PORT, CTRL = "dev-1", "2-2.4.2", "0000:00:0b.0"
POLICY = HealPolicy(interval_s=1.0, settle_s=5.0, attach_refusals=2)


class Log:
    """A journal in a real store, written at the times a test gives."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)

    def refused(self, ts: float) -> None:
        self.store.record_action(
            "attach", identity=ID, qemu_id="vmplug-x", vm="a", result="error",
            error_class="GenericError", error_message="Bus 'xhci.0' not found", ts=ts,
        )  # fmt: skip

    def heal(self, ts: float, rung: Rung, step: int) -> None:
        detail = {"rung": rung.value, "reason": "attach refused", "step": step}
        self.store.record_event(EventKind.HEAL, identity=ID, port=PORT, detail=detail, ts=ts)

    def guest(self, ts: float, message: str) -> None:
        detail = {"problem": "no-driver", "message": message}
        self.store.record_event(GUEST_PROBLEM, identity=ID, vm="a", detail=detail, ts=ts)

    def entries(self) -> list[HistoryEntry]:
        return self.store.history(None, limit=None)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    lg = Log(tmp_path / "j.db")
    yield lg
    lg.store.close()


def _climb(log: Log, policy: HealPolicy, controller: str | None, t: float = 100.0) -> float:
    """Refusals, then every rung decide() gives, each followed by two refusals."""
    log.refused(t)
    log.refused(t + 0.1)
    for step, rung in enumerate(LADDER, 1):
        t += 100.0
        status = decide(log.entries(), ID, PORT, policy, t, controller)
        assert status.decision is not None and status.decision.rung is rung, status
        log.heal(t, rung, step)
        log.refused(t + 0.5)
        log.refused(t + 0.6)
    return t + 100.0


def test_the_controller_is_never_the_next_rung_unless_the_config_names_it(log: Log) -> None:
    t = _climb(log, POLICY, CTRL)
    entries = log.entries()
    refused = decide(entries, ID, PORT, POLICY, t, CTRL)
    assert refused.decision is None and refused.why == "exhausted"
    assert refused.refused is not None and CTRL in refused.refused
    other = decide(entries, ID, PORT, replace(POLICY, controllers=("0000:00:14.0",)), t, CTRL)
    assert other.decision is None and other.refused
    # a device not on PCI (dummy_hcd) or of unknown controller: never
    allowed = replace(POLICY, controllers=(CTRL,))
    assert decide(entries, ID, PORT, allowed, t, None).decision is None
    # named: the fifth rung, after the four, with the trigger as its reason
    fifth = decide(entries, ID, PORT, allowed, t, CTRL)
    assert fifth.decision is not None and fifth.decision.rung is Rung.CONTROLLER
    assert fifth.decision.step == len(LADDER) + 1 and "attach refused" in fifth.decision.reason
    log.heal(t, Rung.CONTROLLER, 5)
    log.refused(t + 0.5)
    log.refused(t + 0.6)
    assert decide(log.entries(), ID, PORT, allowed, t + 100, CTRL).why == "exhausted"


def _ladder(log: Log, policy: HealPolicy, hub: HubPower | None, t: float = 100.0) -> list[Rung]:
    """The rungs decide() climbs for a device whose every rung is followed by
    two more refusals, until it says no more."""
    log.refused(t)
    log.refused(t + 0.1)
    climbed: list[Rung] = []
    while True:
        t += 100.0
        status = decide(log.entries(), ID, PORT, policy, t, None, hub)
        if status.decision is None:
            assert status.why == "exhausted", status
            return climbed
        d = status.decision
        assert d.step == len(climbed) + 1, d
        climbed.append(d.rung)
        log.heal(t, d.rung, d.step)
        log.refused(t + 0.5)
        log.refused(t + 0.6)


def test_a_hub_that_cannot_cut_a_ports_power_gets_no_port_cycle(log: Log) -> None:
    # EHCI's root hub in the lab guest claims no power switching; a port cycle
    # there left the device disconnected for good (tests/lab/test_lab_heal_ladder.py)
    usb1 = HubPower("usb1", "none")
    assert _ladder(log, POLICY, usb1) == [Rung.REATTACH, Rung.RESET, Rung.REAUTHORIZE]
    # the skip rides on the rung that follows it, with why, and only there
    entries = log.entries()
    first_two = [e for e in entries if e.kind == EventKind.HEAL][:2]
    upto = [e for e in entries if e.id <= first_two[-1].id + 2]
    nxt = decide(upto, ID, PORT, POLICY, first_two[-1].ts + 100, None, usb1).decision
    assert nxt is not None and nxt.rung is Rung.REAUTHORIZE and nxt.step == 3
    assert nxt.skipped == (
        (
            Rung.PORT_CYCLE,
            "hub usb1 has no per-port power switching (none): port-cycle cuts no power "
            "there and may strand the device",
        ),
    )
    upto1 = [e for e in entries if e.id <= first_two[0].id + 2]
    second = decide(upto1, ID, PORT, POLICY, first_two[0].ts + 100, None, usb1).decision
    assert second is not None and second.rung is Rung.RESET and second.skipped == ()


@pytest.mark.parametrize("switching", ["ganged", "none"])
def test_ganged_or_no_switching_both_leave_the_power_on(log: Log, switching: str) -> None:
    hub = HubPower("2-2.4", switching)
    assert Rung.PORT_CYCLE not in _ladder(log, POLICY, hub)


@pytest.mark.parametrize("hub", [HubPower("2-3", "per-port"), None])
def test_per_port_switching_or_an_unknown_hub_keeps_the_port_cycle(
    log: Log, hub: HubPower | None
) -> None:
    # per-port: the lab's usb-hub with port-power=on (its port read unpowered
    # while disabled); unknown: the lever itself measures and journals the power
    assert _ladder(log, POLICY, hub) == list(LADDER)


def test_with_the_port_cycle_skipped_the_controller_still_follows_the_ladder(log: Log) -> None:
    allowed = replace(POLICY, controllers=(CTRL,))
    log.refused(0.0)
    log.refused(0.1)
    rungs: list[Rung] = []
    t = 0.0
    hub = HubPower("usb2", "none")
    while (d := decide(log.entries(), ID, PORT, allowed, t + 100, CTRL, hub).decision) is not None:
        t += 100
        rungs.append(d.rung)
        log.heal(t, d.rung, d.step)
        log.refused(t + 0.5)
        log.refused(t + 0.6)
    assert rungs == [Rung.REATTACH, Rung.RESET, Rung.REAUTHORIZE, Rung.CONTROLLER]


def test_controllers_in_the_config_are_pci_addresses_and_not_a_rung() -> None:
    assert parse_policy({"controllers": [CTRL]}).controllers == (CTRL,)
    with pytest.raises(ValueError, match="PCI addresses"):
        parse_policy({"controllers": ["usb2"]})
    with pytest.raises(ValueError, match="rungs"):  # only [heal] controllers turns it on
        parse_policy({"rungs": ["reattach", "controller"]})


def test_a_guest_problem_is_a_trigger_answered_one_rung_at_a_time(log: Log) -> None:
    store = log.store
    store.record_action("attach", identity=ID, qemu_id="vmplug-x", vm="a", result="ok", ts=10.0)
    assert decide(log.entries(), ID, PORT, POLICY, 11.0).why == "healthy"
    log.guest(20.0, "usb 1-1: no driver bound in the guest (Linux)")
    first = decide(log.entries(), ID, PORT, POLICY, 21.0)
    assert first.decision is not None and first.decision.rung is Rung.REATTACH
    assert "guest a: usb 1-1: no driver bound" in first.decision.reason
    log.heal(21.0, Rung.REATTACH, 1)
    # the rung answered it: no new problem, nothing more
    assert decide(log.entries(), ID, PORT, POLICY, 22.0).decision is None
    # the guest says it again after the rung: the next rung
    store.record_action("attach", identity=ID, qemu_id="vmplug-x", vm="a", result="ok", ts=21.5)
    log.guest(23.0, "Windows problem code 10")
    second = decide(log.entries(), ID, PORT, POLICY, 24.0)
    assert second.decision is not None and second.decision.rung is Rung.RESET
    assert "problem code 10" in second.decision.reason
    # attached and quiet for settle_s after it: recovered, a later problem starts at rung 1
    log.heal(24.0, Rung.RESET, 2)
    store.record_action("attach", identity=ID, qemu_id="vmplug-x", vm="a", result="ok", ts=25.0)
    assert decide(log.entries(), ID, PORT, POLICY, 31.0).why == "healthy"
    log.guest(40.0, "no driver bound")
    again = decide(log.entries(), ID, PORT, POLICY, 41.0)
    assert again.decision is not None and again.decision.rung is Rung.REATTACH


def test_rungs_back_off_doubling_and_stop_at_the_hourly_cap(log: Log) -> None:
    policy = replace(POLICY, interval_s=10.0, max_per_hour=3)
    log.refused(0.0)
    log.refused(0.1)
    t = 1.0
    for step in range(1, 4):
        status = decide(log.entries(), ID, PORT, policy, t)
        assert status.decision is not None and status.decision.step == step, status
        log.heal(t, status.decision.rung, step)
        log.refused(t + 0.1)
        log.refused(t + 0.2)
        wait = 10.0 * 2 ** (step - 1)  # 10, 20, 40 s after rung 1, 2, 3
        assert decide(log.entries(), ID, PORT, policy, t + wait - 0.5).why == "waiting"
        t += wait + 0.5
    # three rungs within the hour: the fourth waits for the hour to pass
    assert decide(log.entries(), ID, PORT, policy, t).why == "rate-limited"
    later = decide(log.entries(), ID, PORT, policy, 1.0 + 3600.5)
    assert later.decision is not None and later.decision.rung is Rung.REAUTHORIZE


def test_the_controller_lever_refuses_what_the_config_does_not_name(tmp_path: Path) -> None:
    # a copy of the captured tree's controller with a driver directory whose
    # bind/unbind are plain files: a refused call must leave both untouched
    dev = tmp_path / "bus/pci/devices" / CTRL
    drv = tmp_path / "bus/pci/drivers/xhci_hcd"
    dev.mkdir(parents=True)
    drv.mkdir(parents=True)
    for name in ("bind", "unbind"):
        (drv / name).write_text("")
    (dev / "driver").symlink_to(drv)
    with pytest.raises(usbctl.UsbCtlError, match="not in \\[heal\\] controllers"):
        usbctl.rebind_controller(tmp_path, CTRL, allowed=())
    assert (drv / "unbind").read_text() == "" and (drv / "bind").read_text() == ""
    usbctl.rebind_controller(tmp_path, CTRL, allowed=(CTRL,), off_s=0)
    assert (drv / "unbind").read_text() == CTRL and (drv / "bind").read_text() == CTRL


def test_a_device_names_the_pci_controller_it_hangs_from() -> None:
    root = FIXTURES / "mixed"  # captured from the lab guest's kernel
    assert usbctl.controller_of(root, "2-2.4.2") == CTRL
    assert usbctl.controller_of(root, "1-3") == "0000:00:0c.0"


def test_the_disable_attribute_of_a_root_hub_port_and_of_a_hub_port() -> None:
    root = FIXTURES / "mixed"  # captured from the lab guest's kernel
    assert usbctl.port_of("1-3").disable_path(root).is_file()  # usb1/1-0:1.0/usb1-port3
    assert usbctl.port_of("2-2.4.2").disable_path(root).is_file()  # 2-2.4/2-2.4:1.0/...
