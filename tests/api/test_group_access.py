"""The unix socket's ``[api] group``: a member who cannot read the database still gets
`vmplug health` (through the daemon); someone outside the group gets a clear error.

Runs the CLI as the unprivileged user ``nobody`` (the tests run as root)."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from tests.support.apirig import ApiRig


def _closed_to_others() -> Path | None:
    """A directory on the way to this venv or to vmplug's code that others cannot
    search (a clone in root's 0700 home): nobody could not even start the CLI."""
    import vmplug  # noqa: PLC0415

    for target in (Path(sys.executable).parent, Path(vmplug.__file__).parent):
        for d in reversed(target.absolute().parents):
            if not d.stat().st_mode & stat.S_IXOTH:
                return d
    return None


_CLOSED = _closed_to_others()

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
    ),
    pytest.mark.skipif(
        _CLOSED is not None,
        reason=f"nobody cannot search {_CLOSED} on the way to the venv: clone elsewhere to run it",
    ),
]

KBD = "2-2.4.2"


async def as_user(group: str, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The CLI as ``nobody`` with only ``group``; run without blocking the daemon's loop."""
    vmplug = str(Path(sys.executable).parent / "vmplug")
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=nobody", f"--regid={group}", "--clear-groups", vmplug, *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_group_member_gets_health_through_the_daemon(rig: ApiRig) -> None:
    await rig.up(group="nogroup")
    await rig.wait_ports("a", {KBD})
    sock = rig.socket.stat()
    assert stat.S_IMODE(sock.st_mode) == 0o660
    assert sock.st_gid == grp.getgrnam("nogroup").gr_gid
    rig.sock_dir.chmod(0o711)  # the socket's directory, like /run/vmplug
    config = rig.sock_dir / "vmplug.toml"
    config.write_text(f'[daemon]\nsocket = "{rig.socket}"\ndatabase = "{rig.tmp / "vmplug.db"}"\n')
    config.chmod(0o644)
    env = {"PATH": os.environ["PATH"], "VMPLUG_CONFIG": str(config)}
    # the database is root's alone (under pytest's 0700 tmp dir): nobody cannot read it ...
    assert stat.S_IMODE(rig.tmp.parent.parent.stat().st_mode) & 0o007 == 0
    code, out, err = await as_user("nogroup", "health", KBD, "--json", env=env)
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["port"] == KBD and row["present"] and row["failures"] == 0
    # ... and outside the group the socket refuses too: a message, no traceback
    code, out, err = await as_user("daemon", "health", KBD, "--json", env=env)
    assert code == 1, (out, err)
    assert "cannot read the history database" in err and "Traceback" not in err
