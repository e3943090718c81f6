"""The lab guest's module bundle (vmplug_lab.pybundle) carries bytecode the
guest's import system takes as it is, even for a source edited after the
host's ``.pyc`` was written by a host that writes none (PYTHONDONTWRITEBYTECODE):
nothing is compiled in the guest (issue 16: under TCG that was paid at the
first ``vmplug run`` of every boot)."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vmplug_lab import pybundle


def test_an_edited_module_gets_current_bytecode_in_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src" / "labpkg"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    mod = src / "mod.py"
    mod.write_text("VALUE = 1\n")
    os.utime(mod, (1_700_000_000, 1_700_000_000))
    py_compile.compile(str(mod), doraise=True)  # the host's .pyc, of the old source
    host_pyc = Path(importlib.util.cache_from_source(str(mod)))
    assert host_pyc.exists()
    mod.write_text("VALUE = 22  # edited\n")  # another size and mtime: the host's .pyc is stale
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "src"))
    # as on a fresh machine, whose Python writes bytecode: the bundle's build
    # must still leave the host's files as they are
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    dest = tmp_path / "bundle.tar"
    pybundle.build(dest, entries=("labpkg.mod",))
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "guest")  # our own tar (3.11.2: no filter=)
    tag = sys.implementation.cache_tag
    assert f"labpkg/__pycache__/mod.{tag}.pyc" in names
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "guest"), PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run(
        [sys.executable, "-v", "-c", "import labpkg.mod; print(labpkg.mod.VALUE)"],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    assert res.stdout.strip() == "22"
    guest_pyc = tmp_path / "guest" / "labpkg" / "__pycache__" / f"mod.{tag}.pyc"
    assert f"# {guest_pyc} matches" in res.stderr, res.stderr[-2000:]
    assert "bytecode is stale for 'labpkg.mod'" not in res.stderr
    assert host_pyc.read_bytes() != guest_pyc.read_bytes()  # the host's stale one left alone
