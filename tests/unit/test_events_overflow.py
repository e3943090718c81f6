"""The daemon's netlink uevent socket overflowed by the real kernel (ENOBUFS),
in a network namespace the test makes (tests/support/netns_overflow.py): a
tiny receive buffer and a burst of real uevents give ENOBUFS, the daemon
journals ``overflow`` and rescans, and a change whose uevent was lost is in
its inventory; the default buffer keeps the same burst (no ENOBUFS), so the
lost change stays unseen -- the rescan is what finds it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip (a network namespace of its own)",
)


def _run(tmp: Path, rcvbuf: int, pairs: int) -> dict[str, Any]:
    res = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "tests.support.netns_overflow",
         str(tmp), str(rcvbuf), str(pairs)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if res.returncode != 0 and "unshare failed" in res.stderr:
        pytest.skip(f"no network namespace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_a_real_enobufs_is_journaled_and_the_rescan_finds_the_lost_change(
    tmp_path: Path,
) -> None:
    out = _run(tmp_path, 4096, 20)
    assert out["overflows"] >= 1, out
    assert out["overflow_journaled"] >= 1 and out["rescans"] >= 1, out
    assert out["present_before"] and not out["present_after"], out
    assert out["inventory_matches_tree"], out


def test_the_default_buffer_keeps_the_burst_and_needs_no_rescan(tmp_path: Path) -> None:
    out = _run(tmp_path, 0, 20)
    assert out["overflows"] == 0 and out["overflow_journaled"] == 0, out
    assert out["rescans"] == 0, out
    # nothing lost on the socket; the unplug had no uevent at all, so it is unseen
    assert out["present_after"] and not out["inventory_matches_tree"], out
