"""The soak (bench/soak.py), short: ~45 s of plug/unplug cycles with every fault
kind at least once (VM kill -9, vmplug kill -9 incl. mid-attach, QEMU SIGSTOP,
a uevent overflow burst, the journal's disk full), the invariants after each."""

from __future__ import annotations

import os

import pytest

from bench.soak import FAULTS, soak

pytestmark = pytest.mark.qemu


@pytest.mark.skipif(os.geteuid() != 0, reason="the soak mounts a tmpfs for the journal")
@pytest.mark.xfail(
    strict=False,
    reason="open bug (issue 15): in a clean Debian 12 tree the soak once found one uevent "
    "journaled twice ('journal: 1 seqnums twice'), around a vmplug kill -9 or a full disk; "
    "it passes most runs, and the violation is real until the journal writes exactly once",
)
async def test_short_soak_has_no_violation() -> None:
    out = await soak(duration=40.0, seed=7, settle=20.0)
    assert out["violations"] == [], out
    assert set(out["faults_survived"]) >= set(FAULTS), out
    assert out["cycles"] >= 100, out
    assert out["uevents_checked_in_journal"] >= 100, out
