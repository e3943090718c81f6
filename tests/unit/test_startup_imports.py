"""What `vmplug list --json` and `vmplug run` load: only what they need (issue 16).

Each in a fresh interpreter, so that nothing another test imported counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vmplug.host.inventory import read_devices

MIXED = Path(__file__).parents[1] / "fixtures" / "sysfs" / "mixed"

_LIST = """
import contextlib, io, json, sys
from vmplug.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["--sysfs-root", sys.argv[1], "list", "--json"])
    except SystemExit:
        pass
print(json.dumps({"modules": sorted(sys.modules), "devices": len(json.loads(out.getvalue()))}))
"""

#: what `vmplug run`'s command imports before it reads its config (cli/daemon.py run_cmd)
_RUN = """
import json, sys
import vmplug.cli.daemon, vmplug.api.limits, vmplug.api.server, vmplug.daemon.notify
import vmplug.daemon.reconciler, vmplug.history.store, vmplug.host.events, vmplug.wire.systemd
print(json.dumps({"modules": sorted(sys.modules)}))
"""


def _modules(code: str, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=True
    )
    found: dict[str, object] = json.loads(out.stdout)
    return found


def _tops(modules: object) -> set[str]:
    assert isinstance(modules, list)
    return {m.split(".", 1)[0] for m in modules} | set(modules)


def test_list_json_loads_no_daemon_api_rich_or_config() -> None:
    got = _modules(_LIST, str(MIXED))
    present = [d for d in read_devices(MIXED) if not d.is_root_hub]
    assert got["devices"] == len(present) > 0  # it really listed the capture
    loaded = _tops(got["modules"])
    for heavy in ("rich", "asyncio", "aiohttp", "vmplug.config", "vmplug.rules", "sqlite3"):
        assert heavy not in loaded, heavy


def test_run_without_export_loads_no_cryptography_or_export_side() -> None:
    loaded = _tops(_modules(_RUN)["modules"])
    assert "aiohttp" in loaded  # the unix-socket API is served with it: the test sees imports
    for heavy in ("cryptography", "vmplug.remote.export", "vmplug.remote.devicehost", "rich"):
        assert heavy not in loaded, heavy


def test_list_finds_the_config_where_the_config_module_does() -> None:
    from vmplug.cli.devices import DEFAULT_CONFIG  # noqa: PLC0415
    from vmplug.config import DEFAULT_PATH  # noqa: PLC0415

    assert Path(DEFAULT_CONFIG) == DEFAULT_PATH
