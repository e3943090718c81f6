"""vmplug_lab.pybundle: the bundle the lab guest unpacks serves vmplug run's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from vmplug_lab import pybundle


def test_the_bundle_serves_the_daemons_imports_from_its_own_directory(tmp_path: Path) -> None:
    tar = tmp_path / "bundle.tar"
    n = pybundle.build(tar)
    assert n > 100
    target = tmp_path / "py"
    target.mkdir()
    with tarfile.open(tar) as t:
        names = set(t.getnames())
        # extraction filters came with Python 3.11.4; Debian 12 has 3.11.2 (our own archive)
        if hasattr(tarfile, "tar_filter"):
            t.extractall(target, filter="tar")
        else:  # pragma: no cover - Python < 3.11.4
            t.extractall(target)
    assert "vmplug/__init__.py" in names and "vmplug/daemon/reconciler.py" in names
    assert not any(".opt-" in name for name in names)
    code = (
        "import json, sys\n"
        "import vmplug.cli.daemon, vmplug.daemon.reconciler, vmplug.api.server, asyncio\n"
        "from aiohttp import _http_parser\n"
        "print(json.dumps({m: sys.modules[m].__file__ for m in "
        "('vmplug', 'vmplug.daemon.reconciler', 'asyncio', 'aiohttp._http_parser')}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout)
    # every one from the bundle, the C extension too (not its pure-Python fallback)
    assert all(f.startswith(f"{target}/") for f in files.values()), files
    assert files["aiohttp._http_parser"].endswith(".so")
