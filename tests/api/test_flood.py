"""A flood of connections never stops the daemon routing devices, and leaves nothing behind.

A real ``vmplug run`` with its default ``[api]`` bounds and a real QEMU
(tests/support/floodrig.py); a separate process holds 1,000 event streams and
1,000 half-open requests against its TCP port and keeps opening connections
with 9 KiB request lines.  Meanwhile the keyboard is replugged: QEMU (read on
its own QMP socket) must hold it again about as fast as without the flood
(within a generous factor: the machine is shared), and once the flood stops
the daemon's file descriptors and memory are back where they were.
bench/bench_flood.py prints the same figures at full length.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.floodrig import FloodRig, median, proc_figures

pytestmark = pytest.mark.qemu


@pytest.fixture
def flood_rig(tmp_path: Path) -> Iterator[FloodRig]:
    rig = FloodRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def test_a_flood_does_not_slow_a_replug_and_leaves_nothing_behind(flood_rig: FloodRig) -> None:
    rig = flood_rig
    rig.start()
    rig.replugs(1)  # warm up
    quiet = rig.replugs(5)
    rss0, fds0 = proc_figures(rig.pid)
    log0 = len(rig.log.read_bytes().splitlines())
    rig.flood(1000, 1000)
    assert "refused=" in rig.flood_report and "refused=0 " not in rig.flood_report
    rss1, fds1 = proc_figures(rig.pid)
    loud = rig.replugs(5)
    rig.stop_flood()
    rig.wait(lambda: proc_figures(rig.pid)[1] <= fds0 + 2, "the flood's fds closed", 20)
    rss2, fds2 = proc_figures(rig.pid)
    log = rig.log.read_bytes().decode("utf-8", "replace")
    figures = (
        f"replug median {median(quiet) * 1000:.0f} ms quiet, {median(loud) * 1000:.0f} ms "
        f"in the flood; RSS {rss0:.1f} -> {rss1:.1f} -> {rss2:.1f} MB; fds {fds0} -> {fds1} -> "
        f"{fds2}; {rig.flood_report}"
    )
    print(figures)
    assert median(loud) <= max(4 * median(quiet), median(quiet) + 0.5), figures
    assert max(loud) < 3.0, figures
    assert fds1 <= fds0 + 256 + 8, figures  # [api] max_connections bounds what one site holds
    assert rss1 - rss0 < 16, figures
    assert rss2 - rss0 < 8, figures
    assert "Traceback" not in log and "Error handling request" not in log
    assert len(log.splitlines()) - log0 < 300, "the flood flooded the log"
