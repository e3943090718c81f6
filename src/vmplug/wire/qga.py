"""The QEMU guest agent (``qemu-ga``) through :mod:`qemu.qmp`.

The agent speaks QMP without a greeting or capabilities negotiation
(``negotiate=False``) on a virtio-serial port named
``org.qemu.guest_agent.0``, whose host end is a unix socket.  The channel
outlives any one client, so output a previous client left unread may still
come: a connection is used only after ``guest-sync`` with a random id has
come back with that id (qemu-ga-ref), and every request carries an exec id
unique to this connection, so a stale reply is never taken for ours.

* :class:`AgentClient` and :func:`open_agent` / :func:`guest_sync` /
  :func:`guest_exec`: asyncio;
* :class:`GuestAgent`: the blocking front (the doctor, the lab): commands,
  ``guest-exec`` with ``guest-exec-status`` polling, file reads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError, Runstate
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import Message

from vmplug.wire._sync import LoopThread
from vmplug.wire.errors import AgentCommandError, AgentError
from vmplug.wire.proc import QGA_PORT_NAME
from vmplug.wire.qmp import Client, close_bounded, describe_connect_error


class AgentClient(Client):
    """A :class:`~vmplug.wire.qmp.Client` for ``qemu-ga``: no greeting, no
    negotiation, exec ids unique to this connection, and the leftovers of
    earlier clients (a ``guest-sync-delimited`` 0xFF, half a line, an answer
    without an id) dropped instead of ending the session."""

    def __init__(self, name: str) -> None:
        super().__init__(name, lambda _msg: None)
        self.await_greeting = False
        self.negotiate = False
        self._vmplug_session = secrets.token_hex(4)

    def _get_exec_id(self) -> str:
        return f"{self._vmplug_session}.{super()._get_exec_id()}"

    def reset_parser(self) -> None:
        """Send 0xFF: the agent's JSON parser drops whatever partial request an
        earlier client left in it (qemu-ga-ref, ``guest-sync-delimited``); its
        answer, an error without an id, is dropped here."""
        if self._writer is not None:
            self._writer.write(b"\xff")

    async def _do_recv(self) -> Message:
        while True:
            raw = await self._readline()
            line = raw.replace(b"\xff", b"").strip()
            if not line:
                continue
            try:
                return Message(line, eager=True)
            except ProtocolError:
                self.logger.debug("dropped a line that is no agent message: %r", line[:200])

    async def _on_message(self, msg: Message) -> None:
        if "id" not in msg and "event" not in msg:
            # every request of ours has an id: this answers someone before us
            self.logger.debug("dropped an answer without an id: %s", msg)
            return
        await super()._on_message(msg)


async def _execute(
    client: AgentClient, address: str, command: str, arguments: Mapping[str, object] | None
) -> Any:
    try:
        return await client.execute(command, arguments)
    except ExecuteError as exc:
        raise AgentCommandError(command, exc.error_class, str(exc), address=address) from exc
    except (QMPError, OSError, EOFError) as exc:
        raise AgentError(
            f"{address}: {command}: connection to the agent lost ({exc})",
            address=address,
            command=command,
        ) from exc


async def guest_sync(client: AgentClient, address: str, timeout: float) -> None:
    """Reset the agent's parser (0xFF), send ``guest-sync`` with a random id, and
    again until that id comes back (``timeout`` s in all, 2 s per attempt):
    from then on the channel is ours."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        client.reset_parser()
        tag = secrets.randbelow(2**31)
        left = deadline - loop.time()
        try:
            got = await asyncio.wait_for(
                _execute(client, address, "guest-sync", {"id": tag}), min(2.0, max(left, 0.01))
            )
        except TimeoutError:
            got = None
        if got == tag:
            return
        if loop.time() >= deadline:
            raise AgentError(
                f"{address}: no answer from a guest agent in {timeout:g} s "
                "(is qemu-ga installed and running in the guest?)",
                address=address,
                command="guest-sync",
            )


async def open_agent(address: str | Path, timeout: float, *, sync: bool = True) -> AgentClient:
    """Connect to the agent's socket and (``sync``) make the channel ours."""
    where = str(address)
    client = AgentClient(f"qga-{Path(where).name}")
    try:
        await asyncio.wait_for(client.connect(where), timeout)
    except TimeoutError:
        await close_bounded(client)
        raise AgentError(f"{where}: timed out connecting", address=where) from None
    except (QMPError, OSError, EOFError) as exc:
        await close_bounded(client)
        raise AgentError(
            f"{where}: cannot connect: {describe_connect_error(exc)}", address=where
        ) from exc
    if sync:
        try:
            await guest_sync(client, where, timeout)
        except BaseException:
            await close_bounded(client)
            raise
    return client


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished ``guest-exec``: exit code (128 + signal when killed) and output."""

    rc: int
    out: str
    err: str


async def guest_exec(
    client: AgentClient,
    address: str,
    path: str,
    args: Sequence[str],
    *,
    timeout: float,
    input_data: bytes | None = None,
) -> ExecResult:
    """Run ``path args`` in the guest with its output captured and wait for it
    (``guest-exec``, then ``guest-exec-status`` every 50..500 ms)."""
    arguments: dict[str, object] = {"path": path, "arg": list(args), "capture-output": True}
    if input_data is not None:
        arguments["input-data"] = base64.b64encode(input_data).decode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ret = await _execute(client, address, "guest-exec", arguments)
    pid = int(ret["pid"])
    delay = 0.05
    while True:
        st = await _execute(client, address, "guest-exec-status", {"pid": pid})
        if st.get("exited"):
            break
        if loop.time() > deadline:
            raise AgentError(
                f"guest-exec {path}: still running after {timeout:g} s",
                address=address,
                command="guest-exec",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
    err = base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace")
    rc = int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
    return ExecResult(rc, out, err)


def commands(info: Mapping[str, Any]) -> dict[str, bool]:
    """``guest-info``'s ``supported_commands``: name -> ``enabled`` (False when the
    agent was started with ``-b``/``--block-rpcs`` (``--blacklist`` before QEMU 8.1),
    or not in ``--allow-rpcs``, or its config file's ``block-rpcs``)."""
    out: dict[str, bool] = {}
    for item in info.get("supported_commands", []) or []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            out[item["name"]] = bool(item.get("enabled", True))
    return out


class GuestAgent:
    """A blocking connection to ``qemu-ga``; use as a context manager.

    Connecting syncs (``guest-sync``) unless ``sync=False`` (then call
    :meth:`sync` before the first command: a guest still booting has no
    agent yet).  Every call has a deadline; failures raise
    :class:`AgentError` (an error reply: :class:`AgentCommandError`).
    """

    def __init__(self, path: str | Path, timeout: float = 5.0, *, sync: bool = True) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._client: AgentClient | None = None
        self._runner = LoopThread("vmplug-qga")
        try:
            self._client = self._run(open_agent(self.path, timeout, sync=sync), timeout * 2 + 1)
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any, timeout: float, what: str = "the agent") -> Any:
        try:
            return self._runner.run(coro, timeout)
        except TimeoutError:
            raise AgentError(
                f"{self.path}: timed out waiting for {what} ({timeout:g} s)", address=self.path
            ) from None

    def _agent(self) -> AgentClient:
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            raise AgentError(f"{self.path}: not connected to the agent", address=self.path)
        return client

    def close(self) -> None:
        client, self._client = self._client, None

        async def finish() -> None:
            if client is not None:
                await close_bounded(client)

        self._runner.close(finish)

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ commands

    def sync(self, timeout: float | None = None) -> None:
        """``guest-sync`` with a random id until it comes back (see :func:`guest_sync`)."""
        limit = self.timeout if timeout is None else timeout
        self._run(guest_sync(self._agent(), self.path, limit), limit + 2.5, "guest-sync")

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        limit = self.timeout if timeout is None else timeout
        return self._run(
            _execute(self._agent(), self.path, command, arguments),
            limit,
            f"the answer to {command}",
        )

    def info(self) -> dict[str, Any]:
        return dict(self.execute("guest-info"))

    def supported(self) -> set[str]:
        return {name for name, enabled in commands(self.info()).items() if enabled}

    def ping(self) -> None:
        """``guest-ping``: returns when the agent answers (raises otherwise)."""
        self.execute("guest-ping")

    def osinfo(self) -> dict[str, Any]:
        try:
            return dict(self.execute("guest-get-osinfo"))
        except AgentCommandError:
            return {}

    def read_file(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """The file's bytes, or None when the guest cannot open it."""
        try:
            handle = self.execute("guest-file-open", {"path": path, "mode": "r"})
        except AgentCommandError:
            return None
        data = b""
        try:
            while len(data) < limit:
                ret = self.execute("guest-file-read", {"handle": handle, "count": 65536})
                data += base64.b64decode(ret.get("buf-b64", ""))
                if ret.get("eof") or not ret.get("count"):
                    break
        except AgentCommandError:
            return data or None
        finally:
            with contextlib.suppress(AgentCommandError):
                self.execute("guest-file-close", {"handle": handle})
        return data

    def read_text(self, path: str) -> str | None:
        data = self.read_file(path)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def exec(
        self, path: str, args: Sequence[str], timeout: float = 60.0, input_data: bytes | None = None
    ) -> tuple[int, str, str]:
        """Run a program in the guest and wait: (exit code, stdout, stderr)."""
        res: ExecResult = self._run(
            guest_exec(
                self._agent(), self.path, path, args, timeout=timeout, input_data=input_data
            ),
            timeout + self.timeout + 1.0,
            f"guest-exec {path}",
        )
        return res.rc, res.out, res.err


__all__ = [
    "QGA_PORT_NAME",
    "AgentClient",
    "ExecResult",
    "GuestAgent",
    "commands",
    "guest_exec",
    "guest_sync",
    "open_agent",
]
