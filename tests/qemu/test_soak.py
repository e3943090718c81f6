"""The soak (bench/soak.py), short: ~40 s of plug/unplug cycles with every fault
kind at least once (VM kill -9, vmplug kill -9 incl. mid-attach, QEMU SIGSTOP,
a real ENOBUFS on the daemon's netlink socket -- a veth burst in its network
namespace while it is stopped, device changes dropped behind it -- the
journal's disk full), the invariants after each.

And the soak's one finding, made on purpose: a device whose ``add`` is read
while the kernel is still setting it up is read again later; that re-read is
no new uevent and must not journal the add's seqnum a second time."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest

from bench.soak import FAULTS, soak
from tests.qemu.test_daemon import Rig
from tests.support.fakekernel import until

pytestmark = pytest.mark.qemu

KBD = "2-2.4.2"


async def _true(value: bool) -> bool:
    return value


async def test_a_device_read_while_setting_up_journals_its_uevent_once(tmp_path: Path) -> None:
    r = Rig(tmp_path, "mixed")
    try:
        d = await r.up(f'[[rule]]\nattach = "a"\nmatch = \'via-port "{KBD}"\'\n')
        store = r.stores[0]
        await until(lambda: _ports(r, "a", {KBD}), timeout=20, what="keyboard attached")
        r.kernel.unplug(KBD)
        await until(lambda: _ports(r, "a", set()), timeout=20, what="keyboard detached")
        seq = r.kernel.plug_setting_up(KBD, devnum=77)

        def seqnums() -> Counter[int]:
            return Counter(
                int(e.detail["seqnum"])
                for e in store.history(None, limit=None)
                if e.detail and "seqnum" in e.detail
            )

        # the add was read "in flux" (no port link yet): journaled, read again later
        await until(lambda: _true(seqnums()[seq] >= 1), timeout=10, what="add journaled")
        assert KBD not in d.inventory
        r.kernel.finish_setup(KBD)
        await until(lambda: _ports(r, "a", {KBD}), timeout=20, what="keyboard attached again")
        await until(lambda: _true(d.inventory[KBD].devnum == 77), timeout=5, what="re-read")
        await _settled()
        counts = seqnums()
        assert counts[seq] == 1, counts
        assert counts[seq + 1] == 1, counts  # the kernel's own bind, once
        assert [n for n in counts.values() if n > 1] == [], counts
    finally:
        await r.close()


async def _ports(r: Rig, vm: str, want: set[str]) -> bool:
    return await r.ports(vm) == want


async def _settled() -> None:
    await asyncio.sleep(2.0)  # every look-again (0.05 .. 0.8 s) has come and gone


@pytest.mark.skipif(os.geteuid() != 0, reason="the soak mounts a tmpfs for the journal")
async def test_short_soak_has_no_violation() -> None:
    out = await soak(duration=40.0, seed=7, settle=20.0)
    assert out["violations"] == [], out
    assert set(out["faults_survived"]) >= set(FAULTS), out
    assert out["cycles"] >= 100, out
    assert out["uevents_checked_in_journal"] >= 100, out
    # each burst a real ENOBUFS, journaled once, and nothing else overflowed
    assert out["overflow_bursts"] >= 1, out
    assert out["journal_kinds"].get("overflow") == out["overflow_bursts"], out
