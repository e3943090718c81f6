"""The healing ladder and the alerts on a real daemon: real QEMU, a captured
sysfs tree changed as the kernel would, replayed uevents, a real SQLite journal.

The pure halves (:func:`vmplug.daemon.heal.decide`, :func:`vmplug.daemon.alerts.replay`)
are checked against the journals these runs wrote: each rung the daemon took is
the rung ``decide`` gives for the journal as it stood at that moment, and the
alert transitions a webhook server on loopback received are the ones
``replay`` finds in the same journal.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.qemu.test_daemon import Rig
from tests.support.fakekernel import until
from vmplug.daemon.alerts import AlertConfig, active, replay
from vmplug.daemon.heal import LADDER, Rung, decide
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import EventKind, HistoryEntry, Store

pytestmark = pytest.mark.qemu

KBD, MIDI = "2-2.4.2", "1-3"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[[str], Rig]]:
    made: list[Rig] = []

    def make(capture: str) -> Rig:
        r = Rig(tmp_path, capture)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.close()


def _heals(entries: list[HistoryEntry]) -> list[HistoryEntry]:
    return [e for e in entries if e.kind in (EventKind.HEAL, EventKind.HEAL_FAILED)]


async def _true(value: bool) -> bool:
    return value


async def test_refused_attaches_climb_the_whole_ladder_and_decide_replays_it(
    rig: Callable[[str], Rig],
) -> None:
    r = rig("mixed")
    # neither VM has a USB controller: every device_add is refused by QEMU
    r.qemu("a", usb=False).start()
    r.qemu("b", usb=False).start()
    r.write_config(
        f"""
[heal]
attach_refusals = 2
interval_s = 0.2
settle_s = 1

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'

[[rule]]
attach = "b"
heal = false
match = 'via-port "{MIDI}"'
"""
    )
    d = await r.daemon()
    store = r.stores[0]
    kbd = d.inventory[KBD]

    def climbed() -> bool:
        return len(_heals(store.history(kbd.identity, limit=None))) >= len(LADDER)

    await until(lambda: _true(climbed()), timeout=40, what="four rungs journaled")
    await asyncio.sleep(1.0)  # the ladder is exhausted: nothing more comes
    entries = store.history(None, limit=None)
    heals = _heals(entries)
    # one rung at a time, in the ladder's order, each with its reason; then no more
    assert [h.detail["rung"] for h in heals if h.detail] == [r.value for r in LADDER]
    assert all(h.identity == kbd.identity and h.port == KBD for h in heals)
    assert all("attach refused" in str(h.detail and h.detail["reason"]) for h in heals)
    # reattach has nothing to undo; reset, port-cycle, reauthorize fail on a
    # replayed tree (no /dev/bus/usb node, no hub port attributes): journaled as such
    kinds = {h.detail["rung"]: h.kind for h in heals if h.detail}
    assert kinds[Rung.REATTACH] == EventKind.HEAL
    assert kinds[Rung.RESET] == EventKind.HEAL_FAILED
    assert all(h.detail and h.detail.get("error") for h in heals if h.kind == "heal-failed")
    # the device whose rule says heal = false was refused as often and never touched
    midi = d.inventory[MIDI].identity
    refused = [e for e in store.history(midi, limit=None) if e.result == "error"]
    assert len(refused) >= 3
    assert not [h for h in heals if h.identity == midi]
    # the pure ladder over the journal as it stood at each rung gives that rung
    policy = d.config.heal
    for h in heals:
        before = [e for e in entries if e.id < h.id]
        status = decide(before, kbd.identity, KBD, policy, h.ts)
        assert status.decision is not None, (h, status)
        assert status.decision.rung.value == h.detail["rung"] if h.detail else False
    # ... and after the last one: exhausted, it climbs no further
    assert decide(entries, kbd.identity, KBD, policy, heals[-1].ts + 60).why == "exhausted"
    # between two rungs the backoff holds it back
    mid = decide([e for e in entries if e.id <= heals[1].id], kbd.identity, KBD, policy,
                 heals[1].ts + 0.01)  # fmt: skip
    assert mid.decision is None and mid.why in ("waiting", "no-trigger")


async def test_a_kernel_error_on_its_port_reattaches_the_device_in_qemu(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    r = rig("mixed")
    r.write_config(
        f"""
[heal]
interval_s = 0.2
settle_s = 1

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'
""",
        vms=("a",),
    )
    r.qemu("a").start()
    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    try:

        class KmsgDaemon(Daemon):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.kernel_log = kmsg

        d = await r.daemon(KmsgDaemon)
        await until(lambda: _ports_eq(r, "a", {KBD}), what="attached at start")
        store = r.stores[0]
        ident = d.inventory[KBD].identity
        # a /dev/kmsg record as the kernel writes it, for the device's port
        os.write(
            writer, f"3,812,99122,-;usb {KBD}: device descriptor read/64, error -110\n".encode()
        )
        await until(lambda: _true(bool(_heals(store.history(ident, limit=None)))), what="heal")
        await until(lambda: _ports_eq(r, "a", {KBD}), what="attached again")
        await asyncio.sleep(1.5)  # settle: the episode ends, no second rung
        entries = store.history(ident, limit=None)
        heals = _heals(entries)
        assert len(heals) == 1 and heals[0].kind == "heal"
        assert heals[0].detail and heals[0].detail["rung"] == "reattach"
        assert "error -110" in heals[0].detail["reason"]
        after = [(e.kind, e.result) for e in entries if e.id > heals[0].id and e.is_action]
        # detached by the rung (held by QEMU), attached again by the reconciler
        kinds = [(e.kind, e.result) for e in entries if e.is_action]
        assert ("detach", "ok") in kinds and ("attach", "ok") in after
        assert decide(entries, ident, KBD, d.config.heal, entries[-1].ts + 5).why == "healthy"
    finally:
        os.close(writer)


async def _more_heals(store: Store, identity: str, n: int) -> bool:
    return len(_heals(store.history(identity, limit=None))) > n


async def _ports_eq(r: Rig, vm: str, want: set[str]) -> bool:
    return await r.ports(vm) == want


async def test_a_flapping_device_sends_one_alert_and_one_all_clear(
    rig: Callable[[str], Rig],
) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    r = rig("mixed")
    try:
        r.write_config(
            f"""
[heal]
enabled = false

[[alert]]
name = "flapping"
drops = 3
drops_window_s = 3
clear_after_s = 1.5
webhook = "http://127.0.0.1:{port}/hook"

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'
""",
            vms=("a",),
        )
        r.qemu("a").start()
        d = await r.daemon()
        await until(lambda: _ports_eq(r, "a", {KBD}), what="attached at start")
        ident = d.inventory[KBD].identity
        for i in range(10):  # ten drops, one every ~0.4 s
            r.kernel.unplug(KBD)
            await asyncio.sleep(0.2)
            r.kernel.plug(KBD, devnum=60 + i)
            await asyncio.sleep(0.2)
        await until(lambda: _ports_eq(r, "a", {KBD}), what="attached after the flapping")
        await until(lambda: _true(len(got) >= 2), timeout=20, what="the all-clear")
        await asyncio.sleep(2.0)  # nothing more comes
        assert [(b["state"], b["subject"], b["condition"]) for b in got] == [
            ("firing", ident, "drops"),
            ("resolved", ident, "drops"),
        ]
        entries = r.stores[0].history(None, limit=None)
        journaled = [e.kind for e in entries if e.kind in ("alert", "alert-clear")]
        assert journaled == ["alert", "alert-clear"]
        # the pure dedup over the same journal, checked every 0.25 s: the same two
        alert = d.config.alerts[0]
        t0, t1 = entries[0].ts, entries[-1].ts + 5
        times = [t0 + 0.25 * i for i in range(int((t1 - t0) / 0.25) + 1)]
        again = replay(entries, alert, times)
        assert [(t.state, t.subject) for t in again] == [("firing", ident), ("resolved", ident)]
        json.dumps(got)  # the body is plain JSON
        # the health-figure conditions over the same journal: ten failures in
        # seconds put MTBF under an hour; a bound above every recovery stays quiet
        now = entries[-1].ts
        mtbf = active(entries, AlertConfig(name="m", mtbf_below_s=3600.0), now)
        assert mtbf[ident].condition == "mtbf"
        assert active(entries, AlertConfig(name="r", recovery_above_s=3600.0), now) == {}
    finally:
        await runner.cleanup()


async def test_a_lost_vm_alerts_once_through_a_command_and_clears_when_back(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    out = tmp_path / "alerts.jsonl"
    script = tmp_path / "alert.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$VMPLUG_ALERT_JSON" >> {out}\n')
    script.chmod(0o755)
    r = rig("mixed")
    r.write_config(
        f"""
[heal]
enabled = false

[[alert]]
name = "vm"
vm_lost = true
not_back_s = 1
clear_after_s = 1
command = ["{script}"]

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'
""",
        vms=("a",),
    )
    r.qemu("a").start()
    d = await r.daemon()
    await until(lambda: _ports_eq(r, "a", {KBD}), what="attached at start")
    ident = d.inventory[KBD].identity
    r.qemus["a"].kill()
    r.qemus["a"].wait()
    await asyncio.sleep(3.0)  # down for longer than not_back_s: both fire, once
    r.qemus["a"].cleanup()
    r.qemus.pop("a")
    obs = r.observers.pop("a", None)
    if obs is not None:
        await obs.stop()
    r.qemu("a").start()
    await until(lambda: _ports_eq(r, "a", {KBD}), timeout=30, what="attached again")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    await until(lambda: _true(len(lines()) >= 4), timeout=20, what="two fires, two clears")
    await asyncio.sleep(1.5)
    got = sorted((x["subject"], x["condition"], x["state"]) for x in lines())
    assert got == [
        (ident, "not-back", "firing"),
        (ident, "not-back", "resolved"),
        ("vm:a", "vm-lost", "firing"),
        ("vm:a", "vm-lost", "resolved"),
    ]
    firing = [x for x in lines() if x["state"] == "firing"]
    assert all(x["alert"] == "vm" and x["reason"] for x in firing)


async def test_dry_run_journals_the_rung_and_touches_nothing(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    r = rig("mixed")
    r.write_config(
        f"""
[heal]
dry_run = true
interval_s = 0.2

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'
""",
        vms=("a",),
    )
    r.qemu("a").start()
    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    try:

        class KmsgDaemon(Daemon):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.kernel_log = kmsg

        d = await r.daemon(KmsgDaemon)
        await until(lambda: _ports_eq(r, "a", {KBD}), what="attached at start")
        held = set((await r.held("a")).keys())
        ident = d.inventory[KBD].identity
        store = r.stores[0]
        for _ in range(3):  # three errors, each answered by the next rung (only said)
            n = len(_heals(store.history(ident, limit=None)))
            record = f"3,1,1,-;usb {KBD}: device not accepting address 9, error -71\n"
            os.write(writer, record.encode())
            await until(partial(_more_heals, store, ident, n), what="the next rung said")
        heals = _heals(store.history(ident, limit=None))
        assert [h.detail["rung"] for h in heals if h.detail] == ["reattach", "reset", "port-cycle"]
        assert all(h.detail and h.detail["dry_run"] is True for h in heals)
        # QEMU kept the device all along under the same id; vmplug never detached it
        assert set((await r.held("a")).keys()) == held
        assert not [e for e in store.history(ident, limit=None) if e.kind == "detach"]
    finally:
        os.close(writer)


async def test_a_guest_problem_heals_only_what_a_rule_sends_to_a_vm_that_allows_it(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    """The guest-agent probe's ``guest-problem`` (as it journals it) drives the
    ladder for the routed device; the same report, and kernel errors on their
    ports, for a device no rule routes and for one whose VM says ``heal =
    false`` touch neither (QEMU keeps holding the latter under the same id)."""
    r = rig("mixed")
    r.write_config(
        f"""
[heal]
interval_s = 0.2
settle_s = 30

[vm.b]
heal = false

[[rule]]
attach = "a"
match = 'via-port "{KBD}"'

[[rule]]
attach = "b"
match = 'via-port "{MIDI}"'
""",
        vms=("a",),
    )
    # vm.b is written by write_config only for "a": add its qmp to the table above
    text = r.config_path.read_text().replace(
        "[vm.b]\n", f'[vm.b]\nqmp = "{r.qemu("b").qmp_paths[0]}"\n'
    )
    r.config_path.write_text(text)
    r.qemu("a").start()
    r.qemu("b").start()
    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    try:

        class KmsgDaemon(Daemon):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.kernel_log = kmsg

        d = await r.daemon(KmsgDaemon)
        await until(lambda: _ports_eq(r, "a", {KBD}), what="keyboard in a")
        await until(lambda: _ports_eq(r, "b", {MIDI}), what="midi in b")
        held_b = set((await r.held("b")).keys())
        store = r.stores[0]
        kbd, midi = d.inventory[KBD].identity, d.inventory[MIDI].identity
        unrouted = next(
            p for p, dev in d.inventory.items() if p not in (KBD, MIDI) and not dev.is_hub
        )
        other = d.inventory[unrouted].identity
        for ident, vm in ((midi, "b"), (other, None), (kbd, "a")):
            d.journal.event(
                EventKind.GUEST_PROBLEM, identity=ident, vm=vm,
                detail={"problem": "no-driver", "message": "no driver bound in the guest"},
            )  # fmt: skip
        for port in (MIDI, unrouted):
            os.write(writer, f"3,1,1,-;usb {port}: device not accepting address 9\n".encode())
        await until(lambda: _true(bool(_heals(store.history(kbd, limit=None)))), what="heal")
        await asyncio.sleep(1.5)  # several healer ticks
        heals = _heals(store.history(None, limit=None))
        assert {h.identity for h in heals} == {kbd}, heals
        first = heals[0]
        assert first.detail and first.detail["rung"] == "reattach"
        assert "guest a: no driver bound in the guest" in first.detail["reason"]
        # the heal=false VM kept its device under the same id, never detached
        assert set((await r.held("b")).keys()) == held_b
        for ident in (midi, other):
            assert not [e for e in store.history(ident, limit=None) if e.kind == "detach"]
        await until(lambda: _ports_eq(r, "a", {KBD}), what="keyboard back in a")
    finally:
        os.close(writer)
