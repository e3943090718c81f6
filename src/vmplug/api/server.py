"""The daemon's local API: JSON over HTTP on a unix socket (root-only by default).

The CLI's one-shot commands (``status``, ``attach``, ``detach``, ``reload``,
``history``) use it when a daemon runs, so there is one owner of every QMP
connection and one reconciler deciding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from aiohttp import web

from vmplug.engine.daemon import Daemon
from vmplug.errors import SelectorError, VmplugError
from vmplug.host.select import describe, select_one

API_PREFIX = "/v1"


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        )
    return data


def _field(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise web.HTTPBadRequest(
            text=f'{{"error": "missing string field {key!r}"}}', content_type="application/json"
        )
    return value


class Api:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.app = web.Application()
        r = self.app.router
        r.add_get(f"{API_PREFIX}/status", self.status)
        r.add_get(f"{API_PREFIX}/devices", self.devices)
        r.add_get(f"{API_PREFIX}/history", self.history)
        r.add_post(f"{API_PREFIX}/attach", self.attach)
        r.add_post(f"{API_PREFIX}/detach", self.detach)
        r.add_post(f"{API_PREFIX}/reload", self.reload)
        self._runner: web.AppRunner | None = None

    async def start_unix(self, path: Path, mode: int = 0o600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a stale socket from a daemon that died
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old)
        path.chmod(mode)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers -----------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.daemon.status())

    async def devices(self, request: web.Request) -> web.Response:
        wanted = {a.identity: a.vm for a in self.daemon.wanted()}
        out = []
        for dev in sorted(self.daemon.inventory.values(), key=lambda d: d.port):
            data = dev.to_json()
            data["vm"] = wanted.get(dev.identity)
            out.append(data)
        return web.json_response(out)

    async def history(self, request: web.Request) -> web.Response:
        store = self.daemon.store
        if store is None:
            return _error(503, "the daemon runs without a history database")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 0 < limit <= 10000:
            return _error(400, "limit must be between 1 and 10000")
        identity = request.query.get("device")
        if identity:
            # A device that is gone is matched by the stored identity as given.
            with contextlib.suppress(SelectorError):
                identity = select_one(list(self.daemon.inventory.values()), identity).identity
        entries = store.history(identity or None, limit=limit)
        return web.json_response([e.to_json() if hasattr(e, "to_json") else e for e in entries])

    def _select(self, selector: str) -> Any:
        try:
            return select_one(list(self.daemon.inventory.values()), selector)
        except SelectorError as exc:
            raise web.HTTPNotFound(
                text=_json({"error": str(exc), "candidates": list(exc.candidates)}),
                content_type="application/json",
            ) from None
        except VmplugError as exc:
            raise web.HTTPBadRequest(
                text=_json({"error": exc.render()}), content_type="application/json"
            ) from None

    async def attach(self, request: web.Request) -> web.Response:
        data = await _body(request)
        vm = _field(data, "vm")
        dev = self._select(_field(data, "device"))
        if vm not in self.daemon.vms:
            return _error(404, f"no VM named {vm!r}", vms=sorted(self.daemon.vms))
        if dev.is_hub:
            return _error(400, f"{dev.port} is a hub: QEMU cannot pass hubs through")
        self.daemon.set_route(overrides={**self.daemon.overrides, dev.identity: vm})
        state = await self._settle(dev.qemu_id, vm, want=True)
        return web.json_response({"device": describe(dev), "vm": vm, **state})

    async def detach(self, request: web.Request) -> web.Response:
        data = await _body(request)
        dev = self._select(_field(data, "device"))
        self.daemon.set_route(overrides={**self.daemon.overrides, dev.identity: None})
        held = [n for n, h in self.daemon.observed.items() if dev.qemu_id in h]
        results = {vm: await self._settle(dev.qemu_id, vm, want=False) for vm in held}
        return web.json_response({"device": describe(dev), "vms": results})

    async def _settle(
        self, qemu_id: str, vm: str, *, want: bool, timeout: float = 10.0
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            held = qemu_id in self.daemon.observed.get(vm, {})
            if held == want:
                return {"state": "attached" if want else "detached"}
            retry = self.daemon.retries.get((vm, qemu_id))
            if retry is not None:
                return {"state": "retrying", "error": retry.error, "attempts": retry.attempt}
            await asyncio.sleep(0.01)
        return {"state": "pending", "error": f"not settled after {timeout:.0f}s"}

    async def reload(self, request: web.Request) -> web.Response:
        ok, message = await self.daemon.reload()
        return web.json_response({"ok": ok, "message": message}, status=200 if ok else 422)


def _json(data: Any) -> str:
    import json  # noqa: PLC0415

    return json.dumps(data)
