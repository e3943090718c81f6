"""Talk to a running daemon's local API from the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from vmplug.errors import VmplugError

DEFAULT_SOCKET = Path("/run/vmplug/vmplug.sock")


class ApiError(VmplugError):
    def __init__(self, status: int, data: Any) -> None:
        message = data.get("error") if isinstance(data, dict) else str(data)
        super().__init__(str(message))
        self.status = status
        self.data = data

    def render(self) -> str:
        text = f"vmplug: {self}"
        candidates = self.data.get("candidates") if isinstance(self.data, dict) else None
        if candidates:
            text += "\ncandidates:\n" + "\n".join(f"  {c}" for c in candidates)
        return text


def daemon_running(socket: Path) -> bool:
    """A daemon answers on the socket (a stale socket file does not count)."""
    import socket as sk  # noqa: PLC0415

    if not socket.exists():
        return False
    s = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(socket))
    except OSError:
        return False
    finally:
        s.close()
    return True


async def _request(socket: Path, method: str, path: str, body: Any = None) -> Any:
    import aiohttp  # noqa: PLC0415

    connector = aiohttp.UnixConnector(path=str(socket))
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, f"http://vmplug{path}", json=body) as resp,
    ):
        text = await resp.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = {"error": text}
        if resp.status >= 400:
            raise ApiError(resp.status, data)
        return data


def call(socket: Path, method: str, path: str, body: Any = None) -> Any:
    try:
        return asyncio.run(_request(socket, method, path, body))
    except OSError as exc:
        raise VmplugError(f"cannot reach the daemon at {socket}: {exc}") from None
