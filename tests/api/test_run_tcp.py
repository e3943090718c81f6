"""`vmplug run` as a user starts it, with `[api] listen`: the token file is made (0600),
the TCP listener answers only with it, and the unix socket still serves the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.apirig import ApiRig, until

pytestmark = pytest.mark.qemu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_vmplug_run_serves_the_token_guarded_tcp_listener(
    rig: ApiRig, tmp_path: Path
) -> None:
    q = rig.qemu("a")
    q.start()
    port = _free_port()
    token_file = tmp_path / "secret" / "api-token"
    config = tmp_path / "run.toml"
    config.write_text(
        f'[daemon]\nsocket = "{rig.sock_dir}/run.sock"\ndatabase = "{tmp_path}/run.db"\n\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n\n'
        f'[vm.a]\nqmp = "{q.qmp_paths[0]}"\n\n'
        "[[rule]]\nattach = 'a'\nmatch = 'via-port \"2-2.4.2\"'\n"
    )
    vmplug = str(Path(sys.executable).parent / "vmplug")
    env = {**os.environ, "VMPLUG_SYSFS_ROOT": str(rig.kernel.root)}
    proc = subprocess.Popen(
        [vmplug, "--config", str(config), "run", "--events", f"replay:{rig.kernel.fifo}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        async def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError((proc.stderr.read() if proc.stderr else b"").decode())
            try:
                async with aiohttp.ClientSession() as s, s.get(base + "/v1/status") as r:
                    return r.status == 401
            except aiohttp.ClientConnectionError:
                return False

        await until(answers, 30, "TCP listener up")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        auth = {"Authorization": f"Bearer {token}"}

        async def listed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(base + "/v1/devices", headers=auth) as r:
                assert r.status == 200
                return any(d["port"] == "2-2.4.2" for d in await r.json())

        # the listener is up before the first read of the tree has ended (the
        # daemon connects its VMs while it reads): the device comes with that read
        await until(listed, 30, "2-2.4.2 listed")
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/metrics", headers=auth) as r:
                assert r.status == 200 and "vmplug_reconcile_duration_seconds" in await r.text()
            async with s.get(base + "/", headers=auth) as r:
                assert r.status == 200 and "/static/app.js" in await r.text()
        await rig.wait_ports("a", {"2-2.4.2"})
        # the CLI still talks over the unix socket, no token
        status = subprocess.run(
            [vmplug, "--config", str(config), "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert '"state":"attached"' in status.stdout.replace(" ", "")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 15)
            except TimeoutError:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            if proc.stderr:
                proc.stderr.close()
    assert proc.returncode == 0
