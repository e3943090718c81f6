"""wire.qga against the real qemu-ga, run as a host process on a unix socket."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from vmplug.errors import VmplugError
from vmplug.wire.errors import AgentCommandError, AgentError, CommandError
from vmplug.wire.qga import GuestAgent, guest_exec, guest_sync, open_agent


def test_ping_info_and_sync(qemu_ga: Path) -> None:
    with GuestAgent(qemu_ga, timeout=5) as agent:
        assert agent.execute("guest-ping") == {}
        info = agent.info()
        assert info["version"] and "guest-sync" in agent.supported()
        agent.sync(timeout=5)  # again, with a new random id
        assert agent.execute("guest-ping") == {}


def test_guest_sync_returns_the_id_it_was_given(qemu_ga: Path) -> None:
    async def run() -> object:
        client = await open_agent(qemu_ga, 5, sync=False)
        try:
            await guest_sync(client, str(qemu_ga), 5)
            return await client.execute("guest-sync", {"id": 424242})
        finally:
            await client.disconnect()

    assert asyncio.run(run()) == 424242


def test_exec_and_file_read(qemu_ga: Path, tmp_path: Path) -> None:
    """guest-exec + guest-exec-status; guest-file-*: here the "guest" is this host."""
    probe = tmp_path / "probe.txt"
    probe.write_text("read through the agent\n")
    with GuestAgent(qemu_ga, timeout=5) as agent:
        rc, out, err = agent.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"], timeout=20)
        assert (rc, out, err) == (3, "out\n", "err\n")
        rc, out, _ = agent.exec("/bin/cat", [], timeout=20, input_data=b"stdin data")
        assert (rc, out) == (0, "stdin data")
        assert agent.read_text(str(probe)) == "read through the agent"
        assert agent.read_file(str(tmp_path / "missing")) is None


def test_exec_helper_times_out(qemu_ga: Path) -> None:
    async def run() -> None:
        client = await open_agent(qemu_ga, 5)
        try:
            await guest_exec(client, str(qemu_ga), "/bin/sleep", ["5"], timeout=0.5)
        finally:
            await client.disconnect()

    began = time.monotonic()
    with pytest.raises(AgentError, match="still running"):
        asyncio.run(run())
    assert time.monotonic() - began < 4


def test_error_reply(qemu_ga: Path) -> None:
    with GuestAgent(qemu_ga, timeout=5) as agent:
        with pytest.raises(AgentCommandError) as info:
            agent.execute("guest-no-such-command")
        assert info.value.qmp_class == "CommandNotFound"
        assert isinstance(info.value, CommandError) and isinstance(info.value, VmplugError)
        assert agent.execute("guest-ping") == {}


def test_leftovers_of_an_earlier_client_are_dropped(qemu_ga: Path) -> None:
    """What a client before us may leave on a virtio-serial channel: a
    guest-sync-delimited answer (0xFF first), answers without an id, a parse
    error.  The agent is made to send exactly those on our own connection."""

    async def run() -> object:
        client = await open_agent(qemu_ga, 5, sync=False)
        try:
            writer = client._writer
            assert writer is not None
            sync = {"execute": "guest-sync-delimited", "arguments": {"id": 7}}
            writer.write(json.dumps(sync).encode() + b"\n")
            writer.write(b'{"execute": "guest-ping"}\n{"execute": "guest-nonsense"}\n')
            writer.write(b'{"execute": "guest-info", \n')  # half a request, then ours
            await writer.drain()
            await asyncio.sleep(0.2)
            await guest_sync(client, str(qemu_ga), 5)
            return await client.execute("guest-ping")
        finally:
            await client.disconnect()

    assert asyncio.run(run()) == {}


def test_nobody_answers(tmp_path: Path) -> None:
    """A socket whose peer never speaks (a channel with no agent in the guest)."""
    path = Path("/tmp") / f"vmplug-mute-{id(tmp_path)}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        began = time.monotonic()
        with pytest.raises(AgentError, match="no answer from a guest agent"):
            GuestAgent(path, timeout=1)
        assert time.monotonic() - began < 5
        with pytest.raises(AgentError, match="cannot connect"):
            GuestAgent(tmp_path / "none.sock", timeout=1)
    finally:
        srv.close()
        path.unlink()
