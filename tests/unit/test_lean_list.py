"""bench/lean_list.py is bench_list's measuring stick for the `list --json`
goal (issue 16): it only measures something if it prints, byte for byte, what
`vmplug list --json` prints.  On every captured tree it must; a field added to
the output without the stick learning it fails here, not in a benchmark run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "sysfs"
TREES = sorted(p.name for p in FIXTURES.iterdir() if (p / "bus/usb/devices").is_dir())


def _out(*args: str) -> bytes:
    return subprocess.run(
        [sys.executable, *args], check=True, capture_output=True, timeout=60
    ).stdout


@pytest.mark.parametrize("tree", TREES)
def test_the_lean_reader_prints_what_vmplug_prints(tree: str) -> None:
    root = str(FIXTURES / tree)
    ours = _out("-m", "vmplug", "--sysfs-root", root, "list", "--json")
    lean = _out(str(ROOT / "bench" / "lean_list.py"), root)
    assert ours.startswith(b"[{") and b'"port"' in ours  # devices, not an empty list
    assert lean == ours


def test_the_trees_are_all_there() -> None:
    assert {"gadgets", "identical", "minimal", "mixed"} <= set(TREES)
