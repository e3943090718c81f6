"""The dependency floors: what tools/floors.py pins, and the parts of aiohttp,
prometheus_client and pyudev that only the daemon uses, run for real without
QEMU, so the floors check (which runs this unit tier at the floors) covers them.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tools import floors
from vmplug.api.server import Api
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import NetlinkEventSource, ReplayEventSource

ROOT = Path(__file__).resolve().parents[2]


def test_every_direct_dependency_has_a_floor_and_qemu_qmp_a_ceiling() -> None:
    runtime, tools, backend = floors.read_pins(ROOT / "pyproject.toml", {})
    names = {floors.normalize(p.split("==")[0]) for p in runtime}
    assert {"click", "rich", "pyudev", "qemu-qmp", "tomlkit", "ruamel-yaml", "aiohttp"} <= names
    assert all("==" in p for p in runtime), runtime
    assert backend.startswith("setuptools==")
    assert any(t.startswith("pytest-asyncio==") for t in tools)
    # vms/qmp.py overrides private methods of QMPClient: no release it was not tested with
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    qmp = next(floors.parse_requirement(d) for d in deps if d.startswith("qemu.qmp"))
    assert "<" in qmp.spec.replace("<=", "<"), qmp.spec


def test_requirements_parse_as_pip_reads_them() -> None:
    r = floors.parse_requirement("qemu.qmp >= 0.0.3, <0.0.7")
    assert (r.name, r.spec, r.floor) == ("qemu.qmp", ">=0.0.3,<0.0.7", "0.0.3")
    r = floors.parse_requirement('ruamel.yaml[jinja2]>=0.18.6; python_version >= "3.11"')
    assert (r.name, r.floor) == ("ruamel.yaml", "0.18.6")
    assert floors.parse_requirement("types-PyYAML").floor is None
    with pytest.raises(floors.FloorsError):
        floors.parse_requirement("x>=1,>=2")


def test_an_override_names_a_pinned_dependency_or_is_refused() -> None:
    runtime, _, _ = floors.read_pins(ROOT / "pyproject.toml", {"aiohttp": "3.13.5"})
    assert "aiohttp==3.13.5" in runtime
    with pytest.raises(floors.FloorsError, match="no pinned dependency"):
        floors.read_pins(ROOT / "pyproject.toml", {"no-such-thing": "1"})


def test_a_dependency_without_a_floor_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\n'
        '[project]\ndependencies = ["click"]\n'
        "[project.optional-dependencies]\ntest = ["
        + ", ".join(f'"{t}>=1"' for t in floors.UNIT_TIER_TOOLS)
        + "]\n"
    )
    with pytest.raises(floors.FloorsError, match="no '>=' floor"):
        floors.read_pins(tmp_path / "pyproject.toml", {})
    assert floors.main(["--venv", str(tmp_path / "v"), "--floor", "nonsense"]) == 2


TOKEN = "floors-token-0123456789abcdef"


async def test_api_without_vms_over_unix_socket_and_tcp(tmp_path: Path) -> None:
    """aiohttp's server (middleware, request keys, unix and TCP sites), its
    client (UnixConnector) and prometheus_client's page, on a daemon that
    reads a captured sysfs tree and has no VM."""
    root = tmp_path / "sys"
    shutil.copytree(ROOT / "tests/fixtures/sysfs/mixed", root, symlinks=True)
    fifo = tmp_path / "uevents"
    os.mkfifo(fifo)
    config_path = tmp_path / "vmplug.toml"
    config_path.write_text("")
    store = Store(tmp_path / "vmplug.db")
    daemon = Daemon(
        parse_config("", config_path),
        sysfs_root=root,
        source=ReplayEventSource(fifo),
        store=store,
        config_path=config_path,
    )
    api = Api(daemon)
    sock = Path(tempfile.mkdtemp(prefix="vmplug-floors", dir="/tmp")) / "api.sock"
    try:
        await api.start_unix(sock)
        port = await api.start_tcp("127.0.0.1:0", TOKEN)
        await daemon.start()
        await _exercise(sock, f"http://127.0.0.1:{port}")
    finally:
        await api.stop()
        await daemon.stop()
        store.close()
        shutil.rmtree(sock.parent, ignore_errors=True)


async def _exercise(sock: Path, base: str) -> None:
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get("http://vmplug/v1/devices") as resp:
            assert resp.status == 200, await resp.text()
            body: Any = await resp.json()
        assert body, body  # the captured tree has devices to serve
        async with s.get("http://vmplug/v1/openapi.json") as resp:
            assert resp.status == 200
            assert "/v1/devices" in (await resp.json())["paths"]
        async with s.get("http://vmplug/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert "# TYPE" in await resp.text()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/vms") as resp:
            assert resp.status == 401
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        async with s.get(f"{base}/v1/vms", headers=hdr) as resp:
            assert resp.status == 200, await resp.text()


async def test_udev_monitor_starts_and_stops_on_a_real_netlink_socket() -> None:
    """pyudev: Context, Monitor.from_netlink, filter_by, start, fileno, poll."""
    try:
        probe = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)  # NETLINK_KOBJECT_UEVENT
        probe.close()
    except OSError as exc:
        pytest.skip(f"no uevent netlink socket here: {exc}")
    events: list[object] = []
    # pyudev's Monitor reads udevd's events; the kernel's come through vmplug's own socket
    src = NetlinkEventSource(source="udev")
    src.start(events.append, lambda: None)
    try:
        monitor = src._monitor
        assert monitor is not None
        assert stat.S_ISSOCK(os.fstat(monitor.fileno()).st_mode)
        assert monitor.poll(timeout=0) is None  # nothing plugged in the meantime
    finally:
        src.stop()
    assert src._monitor is None
    assert events == []
