"""The lab bundle reaches vmplug's own Python through a .pth line, not PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmplug_lab import pybundle

#: as at start-up: ``site`` reads the .pth files before the script's directory
#: (here ``-c``'s '') is put in front of sys.path
_SHOW = (
    "import json, site, sys; first = sys.path.pop(0); site.addsitedir(sys.argv[1]); "
    "sys.path.insert(0, first); import bundled_probe; "
    "print(json.dumps({'path': sys.path, 'probe': bundled_probe.__file__}))"
)


def _run(site: Path, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-S", "-c", _SHOW, str(site)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: dict[str, object] = json.loads(out.stdout)
    return found


def test_the_pth_line_puts_the_bundle_first_and_keeps_the_original_lines(tmp_path: Path) -> None:
    bundle, share, site = tmp_path / "bundle", tmp_path / "share", tmp_path / "site"
    for d in (bundle, share, site):
        d.mkdir()
    (bundle / "bundled_probe.py").write_text("")
    (share / "bundled_probe.py").write_text("")
    original = f"{share}\n"  # as an editable install's .pth: one directory
    (site / "x.pth").write_text(pybundle.pth_text(original, str(bundle)))
    got = _run(site)
    path = got["path"]
    assert isinstance(path, list)
    assert got["probe"] == str(bundle / "bundled_probe.py")
    assert path[1] == str(bundle) and str(share) in path  # the original line still counts
    checkout = tmp_path / "checkout"  # PYTHONPATH still wins, as it did before the bundle
    checkout.mkdir()
    (checkout / "bundled_probe.py").write_text("")
    named = _run(site, PYTHONPATH=str(checkout))
    assert named["probe"] == str(checkout / "bundled_probe.py")
    assert named["path"][1:3] == [str(checkout), str(bundle)]  # type: ignore[index]
    off = _run(site, VMPLUG_LAB_BUNDLE="0")
    assert off["probe"] == str(share / "bundled_probe.py")
    assert str(bundle) not in off["path"]  # type: ignore[operator]


def test_site_pth_is_this_pythons_own() -> None:
    pth = pybundle.site_pth()
    import sysconfig  # noqa: PLC0415

    assert pth is None or pth.parent == Path(sysconfig.get_paths()["purelib"])
