"""What `vmplug list --json` and `vmplug run` load: only what they need (issue 16).

Each in a fresh interpreter, so that nothing another test imported counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.vmplugproc import free_port
from tests.support.vmrig import stop_process
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
    assert "vmplug.api.server" in loaded  # the test sees imports
    for heavy in ("cryptography", "vmplug.remote.export", "vmplug.remote.devicehost", "rich"):
        assert heavy not in loaded, heavy


def _daemon_imports(tmp: Path, extra: str = "", events: str = "") -> set[str]:
    """Every module a real ``vmplug run`` imported (``python -X importtime``) by the
    time it answered its first request on the unix socket, and had run a second."""
    fifo = tmp / "uevents"
    os.mkfifo(fifo)
    cfg = tmp / "vmplug.toml"
    cfg.write_text(f'[vm.a]\nqmp = "{tmp}/absent.sock"\n\n{extra}')
    sock = tmp / "api.sock"
    argv = [sys.executable, "-X", "importtime", "-m", "vmplug", "--sysfs-root", str(MIXED)]
    argv += ["--config", str(cfg), "run", "--events", events or f"replay:{fifo}"]
    argv += ["--socket", str(sock)]
    argv += ["--db", str(tmp / "vmplug.db"), "--log-level", "warning"]
    err = (tmp / "stderr").open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        answer = b""
        while not answer.startswith(b"HTTP/1.1 200"):
            assert proc.poll() is None, (tmp / "stderr").read_text()[-2000:]
            assert time.monotonic() < deadline, "vmplug run never answered"
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")
                answer = b"".join(iter(lambda: s.recv(65536), b""))
            time.sleep(0.05)
        assert b'"vms"' in answer
        time.sleep(1.0)  # the first pass, the remedies, the retry of the absent VM
    finally:
        stop_process(proc, 10)
        err.close()
    names = set()
    for line in (tmp / "stderr").read_text().splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "vmplug.daemon.reconciler" in names, "no -X importtime output"
    return _tops(sorted(names))


#: what the daemon loads only when its config asks (issue 16: RSS; bench/bench_daemon.py)
NOT_ASKED = ("aiohttp", "prometheus_client", "multidict", "yarl", "vmplug.api.aioweb")


def test_run_serving_only_its_unix_socket_loads_no_aiohttp_or_metrics(tmp_path: Path) -> None:
    loaded = _daemon_imports(tmp_path)
    for heavy in (*NOT_ASKED, "vmplug.api.metrics", "libvirt", "rich"):
        assert heavy not in loaded, heavy
    assert "vmplug.api.http" in loaded


#: what the lab guest's start paid for before its first rescan (issue 16, under TCG:
#: bench/bench_lab_start.py): pyudev, ctypes (usbctl's struct, limits' malloc_trim)
#: and find_library's ctypes.util (it runs ``ldconfig -p``), importlib.resources
#: (tempfile, shutil, bz2, lzma)
NOT_AT_START = (
    "pyudev", "ctypes", "ctypes.util", "importlib.resources", "tempfile", "bz2", "lzma",
)  # fmt: skip


def test_run_on_the_kernels_uevents_loads_no_pyudev_or_find_library(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15).close()  # NETLINK_KOBJECT_UEVENT
    except OSError as exc:
        pytest.skip(f"no uevent netlink socket here: {exc}")
    loaded = _daemon_imports(tmp_path, events="kernel")
    assert "vmplug.host.events" in loaded
    for heavy in NOT_AT_START:
        assert heavy not in loaded, heavy


def test_ctypes_is_loaded_only_to_give_memory_back() -> None:
    code = (
        "import sys, vmplug.api.limits as l; before = 'ctypes' in sys.modules; "
        "print(before, l.give_back_memory(), 'ctypes' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out[0] == "False"  # not at import
    assert out[2] == "True"  # at the end of a flood
    if platform.libc_ver()[0] == "glibc":
        assert out[1] == "True"  # malloc_trim found without find_library


def test_run_without_guest_checks_loads_no_doctor(tmp_path: Path) -> None:
    loaded = _daemon_imports(tmp_path)
    assert "vmplug.doctor" not in loaded
    assert "vmplug.generate" not in loaded  # doctor.guest imports generate.spice


def test_run_with_a_tcp_listener_loads_aiohttp_and_metrics(tmp_path: Path) -> None:
    extra = f'[api]\nlisten = "127.0.0.1:{free_port()}"\ntoken_file = "{tmp_path}/token"\n'
    loaded = _daemon_imports(tmp_path, extra)
    for asked in ("aiohttp", "prometheus_client", "vmplug.api.aioweb", "vmplug.api.metrics"):
        assert asked in loaded, asked


def test_list_finds_the_config_where_the_config_module_does() -> None:
    from vmplug.cli.devices import DEFAULT_CONFIG  # noqa: PLC0415
    from vmplug.config import DEFAULT_PATH  # noqa: PLC0415

    assert Path(DEFAULT_CONFIG) == DEFAULT_PATH
