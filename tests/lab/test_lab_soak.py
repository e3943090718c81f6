"""Lab: the soak on a real kernel (bench/soak_lab.py), short.

The lab guest with a VM (a bare QEMU), the QOM watcher and ``vmplug run`` on
the guest kernel's own netlink uevents; the keyboard and tablet plugged and
unplugged through the outer QEMU's QMP, and every fault kind at least once:
VM kill -9, vmplug kill -9 (also mid-attach), the VM's QEMU SIGSTOPped, a real
ENOBUFS (a veth burst while vmplug is stopped, device changes dropped behind
it), the database's tmpfs full.  After each, the invariants; at the end the
journal against what the harness did.  The guest is stopped by PID in the
soak's ``finally``.
"""

from __future__ import annotations

import pytest

from bench.soak_lab import FAULTS, soak_lab
from vmplug_lab.guest import lab_unavailable_reason

pytestmark = [pytest.mark.lab, pytest.mark.long_lab]


def test_lab_soak_has_no_violation() -> None:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    out = soak_lab(duration=300.0, seed=11)
    assert out["violations"] == [], out
    assert set(out["faults_survived"]) >= set(FAULTS), out
    assert out["overflow_bursts"] >= 1, out
    assert out["journal_kinds"].get("overflow") == out["overflow_bursts"], out
    assert out["cycles"] >= 30, out
    assert out["uevents_checked_in_journal"] >= 30, out
