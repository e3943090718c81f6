"""Health figures on scripted histories whose answers are worked out by hand."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmplug.history.health import Health, device_health, health_by_device
from vmplug.history.store import HistoryEntry, Store

DEV = "1235:821a/serial=Y7X"
KEY = "1c75:02cb/serial=K1"
VM = "windows"
H = 3600.0


class Script:
    """Builds a journal by hand: one method per thing the daemon records."""

    def __init__(self) -> None:
        self.entries: list[HistoryEntry] = []

    def _add(self, ts: float, entry: str, kind: str, **kw: Any) -> Script:
        self.entries.append(
            HistoryEntry(id=len(self.entries) + 1, ts=ts, entry=entry, kind=kind, **kw)
        )
        return self

    def ev(
        self, ts: float, kind: str, identity: str | None = None, vm: str | None = None
    ) -> Script:
        return self._add(ts, "event", kind, identity=identity, vm=vm)

    def act(
        self, ts: float, kind: str, identity: str = DEV, vm: str = VM, ok: bool = True
    ) -> Script:
        return self._add(
            ts,
            "action",
            kind,
            identity=identity,
            vm=vm,
            qemu_id="vmplug-x",
            result="ok" if ok else "error",
            error_class=None if ok else "GenericError",
        )

    # Shorthands for the common story.
    def vm_up(self, ts: float, vm: str = VM) -> Script:
        return self.ev(ts, "vm-up", vm=vm)

    def vm_down(self, ts: float, vm: str = VM) -> Script:
        return self.ev(ts, "vm-down", vm=vm)

    def plug(self, ts: float, ident: str = DEV, vm: str | None = VM) -> Script:
        return self.ev(ts, "device-add", ident, vm).ev(ts, "device-bind", ident, vm)

    def unplug(self, ts: float, ident: str = DEV, vm: str | None = VM) -> Script:
        return self.ev(ts, "device-remove", ident, vm)

    def attach(self, ts: float, ident: str = DEV, vm: str = VM, ok: bool = True) -> Script:
        return self.act(ts, "attach", ident, vm, ok)

    def steady(self, ts: float = 0.0) -> Script:
        """Daemon starts, VM is running, device plugged and attached at ``ts``."""
        return self.ev(ts, "daemon-start").vm_up(ts).plug(ts).attach(ts)


def health(s: Script, start: float = 0.0, end: float = H, ident: str = DEV) -> Health:
    return device_health(s.entries, ident, start, end)


def test_no_history() -> None:
    h = device_health([], DEV, 0.0, H)
    assert h == Health(identity=DEV, window_start=0.0, window_end=H, errors_per_hour=0.0)
    assert h.uptime is None and h.mtbf_s is None and h.median_recovery_s is None


def test_steady_hour_is_full_uptime_and_no_failure() -> None:
    h = health(Script().steady())
    assert h.wanted_s == H and h.up_s == H and h.uptime == 1.0
    assert h.failures == 0 and h.mtbf_s is None and h.recoveries == ()


def test_three_instant_replugs_of_two_seconds_each() -> None:
    # Unplugged and plugged back at the same instant; vmplug takes 2 s
    # (enumeration + attach) each time.
    s = Script().steady()
    for t in (600.0, 1800.0, 3000.0):
        s.unplug(t).plug(t).act(t + 2, "detach", ok=True).attach(t + 2)
    h = health(s)
    assert h.wanted_s == H
    assert h.uptime == (3600 - 6) / 3600
    assert h.failures == 3
    assert h.mtbf_s == 3600 / 3
    assert h.recoveries == (2.0, 2.0, 2.0)
    assert h.median_recovery_s == 2.0 and h.worst_recovery_s == 2.0


def test_replug_time_away_is_not_wanted_only_reattach_counts() -> None:
    # Out for 5 s each time, then 2 s to attach after it comes back.
    s = Script().steady()
    for t in (600.0, 1800.0, 3000.0):
        s.unplug(t).plug(t + 5).attach(t + 7)
    h = health(s)
    assert h.wanted_s == 3600 - 3 * 5
    assert h.up_s == 3600 - 3 * 5 - 3 * 2
    assert h.uptime == (3600 - 15 - 6) / (3600 - 15)
    assert h.failures == 3
    assert h.mtbf_s == (3600 - 15) / 3
    assert h.recoveries == (2.0, 2.0, 2.0)


def test_median_and_worst_recovery() -> None:
    s = Script().steady()
    for t, rec in ((100.0, 1.0), (200.0, 10.0), (300.0, 2.0), (400.0, 3.0)):
        s.unplug(t).plug(t).attach(t + rec)
    h = health(s)
    assert h.recoveries == (1.0, 10.0, 2.0, 3.0)
    assert h.median_recovery_s == (2.0 + 3.0) / 2
    assert h.worst_recovery_s == 10.0
    assert h.up_s == 3600 - (1 + 10 + 2 + 3)


def test_device_never_wanted_no_rule() -> None:
    s = Script().ev(0, "daemon-start").vm_up(0).plug(0, vm=None).unplug(100, vm=None)
    h = health(s)
    assert h.wanted_s == 0 and h.uptime is None and h.failures == 0 and h.mtbf_s is None


def test_device_never_wanted_vm_never_up() -> None:
    s = Script().ev(0, "daemon-start").plug(0).attach(1, ok=False)
    h = health(s)
    assert h.wanted_s == 0 and h.uptime is None
    assert h.errors == 1 and h.errors_per_hour == 1 / 1.0
    assert h.ongoing_recovery_s is None  # not wanted: nothing to recover


def test_attached_to_a_vm_other_than_its_target_is_not_up() -> None:
    s = Script().ev(0, "daemon-start").vm_up(0).vm_up(0, "other").plug(0).attach(0, vm="other")
    h = health(s)
    assert h.wanted_s == H and h.up_s == 0 and h.uptime == 0.0


def test_open_intervals_at_window_end() -> None:
    # Attached from 0, unplugged at 3000, back at 3500, still not attached at 3600.
    s = Script().steady().unplug(3000).plug(3500)
    h = health(s)
    assert h.wanted_s == 3000 + 100
    assert h.up_s == 3000
    assert h.failures == 1
    assert h.recoveries == ()
    assert h.ongoing_recovery_s == 100.0
    assert h.uptime == 3000 / 3100


def test_window_clips_and_state_comes_from_before_start() -> None:
    # Attached since 0; the window is the second hour; one 4 s replug at 5000.
    s = Script().steady().unplug(5000).plug(5000).attach(5004)
    h = health(s, start=H, end=2 * H)
    assert h.wanted_s == H and h.up_s == H - 4 and h.failures == 1
    # The same replug falls outside the first hour.
    h1 = health(s, start=0, end=H)
    assert h1.up_s == H and h1.failures == 0 and h1.recoveries == ()


def test_outage_straddling_window_start_counts_whole_recovery() -> None:
    s = Script().steady().ev(3590, "attachment-lost", DEV, VM).attach(3610)
    h = health(s, start=H, end=2 * H)
    assert h.failures == 0  # it happened before the window
    assert h.recoveries == (20.0,)
    assert h.up_s == H - 10


def test_vm_restart_is_not_a_failure_but_has_a_recovery() -> None:
    # VM down for 30 s; vmplug attaches 1 s after it is back.
    s = Script().steady().vm_down(1000).vm_up(1030).attach(1031)
    h = health(s)
    assert h.failures == 0 and h.mtbf_s is None
    assert h.wanted_s == 3600 - 30
    assert h.up_s == 3600 - 30 - 1
    assert h.recoveries == (1.0,)


def test_vm_down_while_device_unplugged_is_not_a_device_failure() -> None:
    # Unplug (a failure), VM goes down while it is out, device back at 1200
    # while the VM is still down, VM up at 2000, attached at 2003.
    s = Script().steady().unplug(1000).vm_down(1100).plug(1200).vm_up(2000).attach(2003)
    h = health(s)
    assert h.failures == 1
    assert h.recoveries == (3.0,)
    assert h.wanted_s == 1000 + (3600 - 2000)
    assert h.up_s == 1000 + (3600 - 2003)
    assert h.mtbf_s == (1000 + 1600) / 1


def test_unplug_while_vm_down_is_not_a_failure() -> None:
    s = Script().steady().vm_down(1000).unplug(1100).plug(1200).vm_up(2000).attach(2001)
    h = health(s)
    assert h.failures == 0
    assert h.recoveries == (1.0,)  # the VM restart's outage
    assert h.wanted_s == 1000 + 1600 and h.up_s == 1000 + 1599


def test_vm_reset_keeps_attachment() -> None:
    h = health(Script().steady().ev(100, "vm-reset", vm=VM))
    assert h.uptime == 1.0 and h.failures == 0


def test_reset_that_loses_the_device_then_retries() -> None:
    # After a reset QEMU drops it (1000); two attach errors, then ok at 1010.
    s = Script().steady().ev(1000, "vm-reset", vm=VM).ev(1000, "attachment-lost", DEV, VM)
    s.attach(1002, ok=False).attach(1005, ok=False).attach(1010)
    h = health(s)
    assert h.failures == 1
    assert h.recoveries == (10.0,)
    assert h.errors == 2 and h.errors_per_hour == 2 / 1.0
    assert h.up_s == 3600 - 10


def test_attachment_lost_in_another_vm_does_not_touch_this_one() -> None:
    h = health(Script().steady().ev(10, "attachment-lost", DEV, "other"))
    assert h.failures == 0 and h.uptime == 1.0


def test_first_attach_failing_opens_an_outage_at_the_first_error() -> None:
    s = Script().ev(0, "daemon-start").vm_up(0).plug(0)
    s.attach(1, ok=False).attach(2, ok=False).attach(5)
    h = health(s)
    assert h.failures == 0
    assert h.recoveries == (5.0 - 1.0,)
    assert h.up_s == 3600 - 5 and h.uptime == (3600 - 5) / 3600
    assert h.errors == 2


def test_detach_while_still_wanted_is_a_failure_route_change_first_is_not() -> None:
    lost = Script().steady().act(100, "detach").attach(103)
    h = health(lost)
    assert h.failures == 1 and h.recoveries == (3.0,)
    moved = Script().steady().ev(100, "device-route", DEV, None).act(100, "detach")
    h = health(moved)
    assert h.failures == 0 and h.wanted_s == 100 and h.uptime == 1.0


def test_daemon_stopped_time_is_not_wanted_and_restart_adopts() -> None:
    s = Script().steady().ev(1000, "daemon-stop")
    s.ev(1300, "daemon-start").vm_up(1300).plug(1300).act(1300, "adopt")
    h = health(s)
    assert h.wanted_s == 3600 - 300 and h.uptime == 1.0 and h.failures == 0


def test_daemon_crash_without_stop_keeps_last_state_until_restart() -> None:
    s = Script().steady().ev(1300, "daemon-start").vm_up(1300).plug(1300).act(1302, "adopt")
    h = health(s)
    assert h.wanted_s == H and h.up_s == H - 2 and h.failures == 0


def test_clock_stepping_back_adds_no_negative_time() -> None:
    s = Script().steady().unplug(1000).plug(900).attach(1002)
    h = health(s)
    # The add at "900" is taken at 1000 (running maximum), so 2 s to attach.
    assert h.recoveries == (2.0,) and h.up_s == 3600 - 2


def test_empty_window_and_bad_window() -> None:
    h = health(Script().steady(), start=10, end=10)
    assert h.wanted_s == 0 and h.errors_per_hour is None
    with pytest.raises(ValueError, match="before it starts"):
        health(Script(), start=10, end=5)


def test_health_by_device_shares_vm_events() -> None:
    s = Script().ev(0, "daemon-start").vm_up(0)
    s.plug(0).attach(0).plug(0, KEY).attach(1, KEY)
    s.vm_down(1000).vm_up(1010).attach(1012).attach(1015, KEY)
    s.unplug(2000, KEY)
    out = health_by_device(s.entries, 0, H)
    assert set(out) == {DEV, KEY}
    assert out[DEV].up_s == 3600 - 10 - 2 and out[DEV].recoveries == (2.0,)
    assert out[KEY].wanted_s == 2000 - 10
    assert out[KEY].up_s == 2000 - 10 - 1 - 5
    assert out[KEY].failures == 1 and out[KEY].recoveries == (5.0,)
    assert out[DEV] == device_health(s.entries, DEV, 0, H)


def test_to_json_is_plain_json() -> None:
    s = Script().steady().unplug(10).plug(10).attach(12)
    j = health(s).to_json()
    assert json.loads(json.dumps(j)) == j
    assert j["failures"] == 1 and j["median_recovery_s"] == 2.0 and j["recoveries"] == 1


def test_health_from_a_real_store(tmp_path: Any) -> None:
    s = Script().steady()
    for t in (600.0, 1800.0, 3000.0):
        s.unplug(t).plug(t).attach(t + 2)
    with Store(tmp_path / "v.db") as store:
        for e in s.entries:
            if e.is_action:
                store.record_action(
                    e.kind,
                    identity=e.identity or "",
                    qemu_id=e.qemu_id or "",
                    vm=e.vm or "",
                    result=e.result or "",
                    error_class=e.error_class,
                    ts=e.ts,
                )
            else:
                store.record_event(e.kind, identity=e.identity, vm=e.vm, ts=e.ts)
        h = device_health(store.history(DEV, limit=None), DEV, 0, H)
    assert h.uptime == (3600 - 6) / 3600 and h.failures == 3


# -- property: the sweep agrees with a brute-force per-instant replay ----------

_KINDS = (
    "device-add",
    "device-remove",
    "device-route",
    "attachment-lost",
    "vm-up",
    "vm-down",
    "vm-reset",
    "daemon-start",
    "daemon-stop",
    "attach",
    "detach",
    "adopt",
    "attach-error",
)


def _brute(entries: list[HistoryEntry], end: int) -> tuple[float, float]:
    """wanted/up seconds by replaying the rules at every half second."""
    wanted = up = 0.0
    for step in range(2 * end):
        t = step / 2 + 0.25
        observed, running = True, set[str | None]()
        present: bool = False
        target: str | None = None
        attached: str | None = None
        for e in entries:
            if e.ts > t:
                break
            k = e.kind
            if k == "daemon-start":
                observed, running = True, set()
                present, target, attached = False, None, None
            elif k == "daemon-stop":
                observed = False
            elif k == "vm-up":
                running.add(e.vm)
            elif k == "vm-down":
                running.discard(e.vm)
                attached = None if attached == e.vm else attached
            elif k in ("device-add", "device-bind"):
                present, target = True, e.vm
            elif k == "device-route":
                target = e.vm
            elif k == "device-remove":
                present, attached = False, None
            elif k == "attachment-lost":
                attached = None if e.vm is None or attached == e.vm else attached
            elif e.result == "ok" and k in ("attach", "adopt"):
                attached = e.vm
            elif e.result == "ok" and k == "detach" and attached == e.vm:
                attached = None
        w = observed and present and target is not None and target in running
        wanted += 0.5 * w
        up += 0.5 * (w and attached == target)
    return wanted, up


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.lists(
        st.tuples(
            st.integers(0, 40),
            # Repeats weigh the draw towards the common story.
            st.sampled_from((*_KINDS, "attach", "attach", "device-add", "vm-up")),
            st.sampled_from(["a", "a", "a", "b", None]),
        ),
        max_size=25,
    ),
)
def test_sweep_matches_brute_force(steady: bool, raw: list[tuple[int, str, str | None]]) -> None:
    s = Script()
    if steady:
        s.ev(0, "daemon-start").vm_up(0, "a").plug(0, vm="a").attach(0, vm="a")
    for ts, kind, vm in sorted(raw, key=lambda r: r[0]):
        if kind in ("attach", "detach", "adopt", "attach-error"):
            s.act(ts, kind.removesuffix("-error"), DEV, vm or "a", ok=kind != "attach-error")
        elif kind.startswith(("device", "attachment")):
            s.ev(ts, kind, DEV, vm)
        else:
            s.ev(ts, kind, None, vm)
    h = device_health(s.entries, DEV, 0, 40)
    wanted, up = _brute(s.entries, 40)
    assert h.wanted_s == wanted
    assert h.up_s == up
    assert 0 <= h.up_s <= h.wanted_s <= 40
    if h.uptime is not None:
        assert 0.0 <= h.uptime <= 1.0
    assert all(r >= 0 for r in h.recoveries)
    if h.recoveries:
        assert h.median_recovery_s == statistics.median(h.recoveries)
