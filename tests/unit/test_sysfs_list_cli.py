"""`vmplug list --json` answered without click (vmplug.cli._list_json) prints
exactly what the click command prints, for every captured tree (issue 16).

Each case runs twice in fresh interpreters: through ``vmplug.cli.main`` (the
fast path where it applies) and through ``vmplug.cli.app.main`` (always the
click group and ``vmplug.cli.devices.list_cmd``); exit status, stdout and
stderr must be the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSFS = Path(__file__).parents[1] / "fixtures" / "sysfs"
TREES = sorted(p.name for p in SYSFS.iterdir() if (p / "bus").is_dir())

_RUN = """
import sys
from {module} import main
try:
    main(sys.argv[1:])
finally:
    sys.stdout.flush()
    sys.stderr.write("\\nclick loaded: %s\\n" % ("click" in sys.modules))
"""


def _run(module: str, args: list[str], env: dict[str, str]) -> tuple[int, str, str, bool]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(module=module), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the exit status is compared
        env={**os.environ, "VMPLUG_CONFIG": "/nonexistent/vmplug.toml", **env},
    )
    err, _, flag = proc.stderr.rpartition("\nclick loaded: ")
    return proc.returncode, proc.stdout, err, flag.strip() == "True"


def _same(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str, bool]:
    """Both paths' (status, stdout, stderr), asserted equal; and whether the
    fast one loaded click."""
    fast = _run("vmplug.cli", args, env or {})
    full = _run("vmplug.cli.app", args, env or {})
    assert full[3]  # the reference really is the click command
    assert fast[:3] == full[:3], args
    return fast


@pytest.mark.parametrize("tree", TREES)
def test_list_json_is_the_click_commands_output_without_click(tree: str) -> None:
    root = str(SYSFS / tree)
    for args, env in (
        (["--sysfs-root", root, "list", "--json"], {}),
        (["list", "--json", "-a", "--sysfs-root", root], {}),
        (["--debug", "list", f"--sysfs-root={root}", "--all", "--json"], {}),
        (["list", "--json"], {"VMPLUG_SYSFS_ROOT": root}),
        (["--sysfs-root", "/nonexistent", "list", "--json", "--sysfs-root", root], {}),
    ):
        status, out, err, click_loaded = _same(args, env)
        assert status == 0 and not err and not click_loaded, args
        devices = json.loads(out)
        assert devices and all(d["port"] for d in devices)
        hubs = any(d["port"].startswith("usb") for d in devices)
        assert hubs == ("-a" in args or "--all" in args), args


def test_warnings_go_to_stderr_alike(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(SYSFS / "mixed", root, symlinks=True)
    (root / "bus/usb/devices/2-2.1/speed").write_text("fast\n")  # a garbled attribute
    status, out, err, click_loaded = _same(["--sysfs-root", str(root), "list", "--json"])
    assert status == 0 and not click_loaded
    assert "warning: 2-2.1: speed: garbled value 'fast'" in err
    assert next(d for d in json.loads(out) if d["port"] == "2-2.1")["speed_mbps"] is None


def test_what_click_would_refuse_or_shape_goes_to_click(tmp_path: Path) -> None:
    """A root that is a file, a missing one, a bad --debug spelling, other
    options, a config naming device hosts: the click command answers."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    config = tmp_path / "vmplug.toml"
    config.write_text('[host.lab]\naddress = "127.0.0.1:1"\n')
    mixed = str(SYSFS / "mixed")
    for args, env, status in (
        (["--sysfs-root", str(a_file), "list", "--json"], {}, 2),
        (["--sysfs-root", str(tmp_path / "nope"), "list", "--json"], {}, 2),
        (["--sysfs-root", mixed, "list", "--json"], {"VMPLUG_DEBUG": "maybe"}, 2),
        (["--sysfs-root", mixed, "list", "--json", "--bogus"], {}, 2),
        (["--sysfs-root", mixed, "--config", str(config), "list", "--json"], {}, None),
        (["--sysfs-root", mixed, "list", "--rules", "--json"], {}, 0),
    ):
        got, _out, _err, click_loaded = _same(args, env)
        assert click_loaded, args
        assert status is None or got == status, (args, got)
