"""The daemon's HTTP API, its live event stream, metrics and web page.

One set of routes and handlers (:class:`Api`, on :mod:`vmplug.api.http`'s
request and response), served in the daemon's own event loop on two kinds of
site:

* the **unix socket** (``[daemon] socket``): root, or the ``[api] group`` with
  mode 0660.  The CLI's one-shot commands (``status``, ``attach``, ``detach``,
  ``reload``, ``history``, ``health``) use it, so there is one owner of every
  QMP connection and one reconciler deciding.  No token: the file mode decides.
  Served by :class:`vmplug.api.http.Connection` (the standard library only).
* a **loopback TCP port** when ``[api] listen`` is set: the same API plus the
  web page at ``/``; every request needs the bearer token (see
  :mod:`vmplug.api.security`).  Served by aiohttp (:mod:`vmplug.api.aioweb`,
  imported only then).
* on a **device host** (``[export]``), ``[api] listen`` may face the network:
  the listener then takes mutual TLS (a client certificate signed by the
  installation's CA, named in ``[export] allow`` when that is set), and
  ``GET /v1/export`` (the devices this host lets go, their endpoint ports and
  who holds each; an ETag, and ``?wait=S`` with ``If-None-Match`` to wait for
  the next change) needs nothing more: the certificate is the credential.
  Everything else still needs the token.

The routes and their schemas are in :mod:`vmplug.api.openapi`
(``GET /v1/openapi.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmplug.api import security
from vmplug.api.http import (
    MAX_BODY,
    Connection,
    HttpError,
    Request,
    Response,
    Router,
    StreamResponse,
    json_response,
)
from vmplug.api.limits import BadRequests, Gate, Limits, client_key, listen_tcp, listen_unix
from vmplug.api.openapi import document
from vmplug.daemon.reconciler import Daemon
from vmplug.errors import SelectorError, VmplugError
from vmplug.host.select import describe, select_one
from vmplug.model import UsbDevice
from vmplug.wire.tls import peer_names

if TYPE_CHECKING:  # made by cli/daemon.py only for [export]: cryptography stays out otherwise
    from aiohttp import web

    from vmplug.remote.devicehost import DeviceHostExport

log = logging.getLogger("vmplug.api")

API_PREFIX = "/v1"
MAX_SELECTOR = 256
DEFAULT_WINDOW_S = 7 * 86400.0
MAX_WINDOW_S = 366 * 86400.0
SSE_QUEUE = 1000
SSE_KEEPALIVE_S = 15.0
#: the longest ``GET /v1/export?wait=`` (below [api] idle_timeout's default 30 s)
EXPORT_WAIT_MAX_S = 25.0
STATIC = {"app.js": "application/javascript", "app.css": "text/css"}
#: no inline script or style, nothing from elsewhere, no framing
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

#: how a TCP request authenticated: ("bearer", "") or ("session", its CSRF token)
AUTH = "auth"
Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    """An error answered as ``{"error": ...}`` JSON with the given status."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.data = {"error": message, **extra}

    def response(self) -> Response:
        return json_response(self.data, status=self.status)


def _error(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status=status)


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return data


def _field(data: dict[str, Any], key: str, limit: int = MAX_SELECTOR) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"missing string field {key!r}")
    if len(value) > limit:
        raise ApiError(400, f"field {key!r} is longer than {limit} characters")
    return value


def _query_selector(request: Request, key: str) -> str | None:
    value = request.query.get(key)
    if value is None:
        return None
    if not value or len(value) > MAX_SELECTOR:
        raise ApiError(400, f"{key} must be 1 to {MAX_SELECTOR} characters")
    return value


def _query_number(request: Request, key: str, default: float, lo: float, hi: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{key} must be a number") from None
    if not lo <= value <= hi:  # NaN fails this too
        raise ApiError(400, f"{key} must be between {lo:g} and {hi:g}")
    return value


def _query_int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ApiError(400, f"{key} must be an integer between {lo} and {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be an integer between {lo} and {hi}")
    return value


def _asset(name: str) -> bytes:
    # importlib.resources (tempfile, shutil, bz2, lzma) on the web page's first
    # request, not at every daemon's start (issue 16: lab guest under TCG)
    from importlib import resources  # noqa: PLC0415

    return resources.files("vmplug.api").joinpath("static", name).read_bytes()


class Api:
    """The application; sites are added by :meth:`start_unix` and :meth:`start_tcp`."""

    def __init__(
        self, daemon: Daemon, *, metrics: bool = True, limits: Limits | None = None
    ) -> None:
        #: the commands (set a route, reload); everything read goes through ``view``
        self.daemon = daemon
        #: connection, stream and time bounds, one :class:`Gate` per listener
        self.limits = limits or Limits()
        self.gates: dict[str, Gate] = {}
        self._servers: list[asyncio.Server] = []
        self.view = daemon.view
        self.token: str | None = None
        self.sessions = security.Sessions()
        self.tcp_port: int | None = None
        self._streams: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._runner: web.AppRunner | None = None  # TCP only
        #: the unix socket's open connections (closed by :meth:`stop`)
        self._conns: set[Connection] = set()
        self._bad = BadRequests()
        self._openapi: bytes | None = None  # built on its first request
        self._assets: dict[str, bytes] = {}
        self._memo: dict[int, tuple[UsbDevice, dict[str, Any]]] = {}
        self.metrics: Any = None
        #: the device host's export side (``[export]``), None on a VM host
        self.exporter: DeviceHostExport | None = None
        #: certificate names that may read /v1/export (empty: any the CA signed)
        self.export_allow: frozenset[str] = frozenset()
        if metrics:
            from vmplug.api.metrics import Metrics  # noqa: PLC0415

            self.metrics = Metrics(self.view)
        self.view.subscribe(self._on_item)
        self.router = Router()
        r = self.router
        p = API_PREFIX
        r.add_get(f"{p}/status", self.status)
        r.add_get(f"{p}/devices", self.devices)
        r.add_get(f"{p}/devices/{{device}}", self.device)
        r.add_get(f"{p}/vms", self.vms)
        r.add_get(f"{p}/attachments", self.attachments)
        r.add_get(f"{p}/rules", self.rules)
        r.add_get(f"{p}/history", self.history)
        r.add_get(f"{p}/health", self.health)
        r.add_post(f"{p}/attach", self.attach)
        r.add_post(f"{p}/detach", self.detach)
        r.add_post(f"{p}/reload", self.reload)
        r.add_get(f"{p}/events", self.events)
        r.add_get(f"{p}/openapi.json", self.openapi)
        r.add_get(f"{p}/export", self.export_list)
        r.add_get("/metrics", self.metrics_page)
        r.add_get("/", self.page)
        r.add_post("/login", self.login)
        r.add_get("/static/{name}", self.static)

    # -- sites ----------------------------------------------------------------

    def _connection(self) -> Connection:
        return Connection(
            self.dispatch,
            idle_timeout=self.limits.idle_timeout,
            on_bad=self._bad.warn,
            live=self._conns,
        )

    async def start_unix(self, path: Path, mode: int = 0o600, group: str | None = None) -> None:
        """Listen on ``path``; ``group``: that group may connect too (mode 0660)."""
        gid = None
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise VmplugError(f"[api] group {group!r} does not exist") from None
            mode = 0o660
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a stale socket from a daemon that died
        gate = self.gates.setdefault("unix", Gate(self.limits, "unix socket"))
        old = os.umask(0o177)
        try:
            self._servers.append(await listen_unix(self._connection, gate, str(path)))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        path.chmod(mode)

    async def start_tcp(
        self, listen: str, token: str, *, tls: ssl.SSLContext | None = None, anywhere: bool = False
    ) -> int:
        """Listen on loopback ``HOST:PORT`` (port 0: any free one); returns the port.

        ``tls`` (a server context requiring client certificates): the device
        host's listener, which may listen anywhere; ``anywhere`` without it
        only for an ``[export]`` that says ``insecure = true``."""
        host, _, port_s = listen.rpartition(":")
        host = host.strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost") and tls is None and not anywhere:
            raise VmplugError(f"[api] listen {listen!r}: vmplug listens on loopback only")
        self.token = token
        if self._runner is None:
            from vmplug.api.aioweb import runner  # noqa: PLC0415 (aiohttp: TCP only)

            self._runner = await runner(self.dispatch, self.limits)
        gate = self.gates.setdefault("tcp", Gate(self.limits, "TCP"))
        assert self._runner.server is not None
        server = await listen_tcp(self._runner.server, gate, host, int(port_s), tls=tls)
        self._servers.append(server)
        sockets = server.sockets
        self.tcp_port = sockets[0].getsockname()[1] if sockets else int(port_s)
        return self.tcp_port

    async def stop(self) -> None:
        for q in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        if self.metrics is not None:
            self.metrics.close()
        self.view.unsubscribe(self._on_item)
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()  # no new connections; the open ones are closed below
        for conn in list(self._conns):
            conn.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for server in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    # -- the guard every request passes -----------------------------------------

    async def dispatch(self, request: Request) -> Response:
        """Every request on either listener: the TCP checks, the route, its handler;
        every error as JSON."""
        try:
            if _is_tcp(request):
                denied = self._check_tcp(request)
                if denied is not None:
                    return _headers(denied)
            handler, request.match_info = self.router.resolve(request.method, request.path)
            return _headers(await handler(request))
        except ApiError as exc:
            return _headers(exc.response())
        except HttpError as exc:  # 404, 405, 413
            extra = {}
            if "Allow" in exc.headers:
                extra["allowed"] = exc.headers["Allow"].split(",")
            resp = _error(exc.status, exc.reason.lower(), **extra)
            resp.headers.update(exc.headers)
            return _headers(resp)
        except Exception:
            log.exception("API: error handling %s %s", request.method, request.path[:200])
            return _headers(_error(500, "internal server error"))

    def _check_tcp(self, request: Request) -> Response | None:
        path = request.path
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        if self.exporter is not None and path == f"{API_PREFIX}/export":
            # the device host's export list: the client certificate (checked by
            # the handshake against the CA) is the credential
            if tls is None and self.exporter.tls is not None:
                return _error(403, "the export list is served over mutual TLS only")
            names = peer_names(tls)
            if tls is not None and self.export_allow and not set(names) & self.export_allow:
                return _error(
                    403,
                    f"client certificate for {', '.join(names) or '(no name)'} is not allowed "
                    f"(this host exports to {', '.join(sorted(self.export_allow))})",
                )
            return None
        if tls is None and not security.host_is_loopback(request.headers.get("Host")):
            return _error(421, "the Host header must name a loopback address")
        if path.startswith("/static/"):
            return None
        if path == "/login" and request.method == "POST":
            return None  # checks the token and the Origin itself
        auth = self._auth(request)
        if auth is None:
            if path == "/" and request.method in ("GET", "HEAD"):
                return None  # the login form, or ?token= trading
            resp = _error(401, "missing or wrong API token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="vmplug"'
            return resp
        request[AUTH] = auth
        if request.method not in ("GET", "HEAD", "OPTIONS") and auth[0] == "session":
            origin = request.headers.get("Origin") or request.headers.get("Referer")
            if not security.origin_matches(origin, request.headers.get("Host")):
                return _error(403, "cross-site request refused: Origin is not this page")
            sent = request.headers.get(security.CSRF_HEADER, "")
            if not sent or not security.same(sent, auth[1]):
                return _error(403, f"missing or wrong {security.CSRF_HEADER} header")
        return None

    def _auth(self, request: Request) -> tuple[str, str] | None:
        """("bearer", "") or ("session", csrf token) or None."""
        if self.token is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value and security.same(value.strip(), self.token):
            return ("bearer", "")
        csrf = self.sessions.csrf(request.cookies.get(security.SESSION_COOKIE))
        if csrf is not None:
            return ("session", csrf)
        return None

    # -- live events --------------------------------------------------------------

    def _on_item(self, item: dict[str, Any]) -> None:
        for q in list(self._streams):
            try:
                q.put_nowait(item)
            except asyncio.QueueFull:
                # a reader that cannot keep up starts over from a fresh picture
                while not q.empty():
                    q.get_nowait()
                q.put_nowait({"type": "resync"})

    async def events(self, request: Request) -> Response:
        gate = self.gates.get("tcp" if _is_tcp(request) else "unix")
        if gate is None or request.transport is None:
            return await self._events(request, None)
        with gate.stream(client_key(request.transport)) as admitted:
            if not admitted:
                resp = _error(503, "too many event streams; close one or try again")
                resp.headers["Retry-After"] = "5"
                return resp
            return await self._events(request, gate)

    async def _events(self, request: Request, gate: Gate | None) -> Response:
        resp = StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        _headers(resp)
        await resp.prepare(request)
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=SSE_QUEUE)
        self._streams.add(q)
        if gate is not None and request.transport is not None:
            # the reader went away: end the stream now, not at its next keep-alive write
            gate.when_lost(request.transport, lambda: _end_stream(q))
        try:
            await resp.write(b"retry: 1000\nevent: hello\ndata: {}\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), SSE_KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                kind = item.get("type", "event")
                data = json.dumps(item, default=str)
                await resp.write(f"event: {kind}\ndata: {data}\n\n".encode())
        except ConnectionError:
            pass  # the reader went away
        finally:
            self._streams.discard(q)
        return resp

    # -- views ----------------------------------------------------------------

    def _static_json(self, dev: UsbDevice) -> dict[str, Any]:
        """What never changes for this device object (identity, ids, names), memoised:
        ``identity`` and ``qemu_id`` are computed properties (a sha256 each)."""
        hit = self._memo.get(id(dev))
        if hit is not None and hit[0] is dev:
            return hit[1]
        data = {
            "port": dev.port,
            "identity": dev.identity,
            "qemu_id": dev.qemu_id,
            "busnum": dev.busnum,
            "devnum": dev.devnum,
            "vendor_id": None if dev.vendor_id is None else f"{dev.vendor_id:04x}",
            "product_id": None if dev.product_id is None else f"{dev.product_id:04x}",
            "manufacturer": dev.display_manufacturer,
            "product": dev.display_product,
            "name": dev.display_name or None,
            "serial": dev.serial,
            "speed_mbps": dev.speed_mbps,
            "is_hub": dev.is_hub,
            "host": dev.host,
        }
        if len(self._memo) > 4 * self.view.device_count() + 64:
            self._memo.clear()  # devices replaced by rescans and replugs
        self._memo[id(dev)] = (dev, data)
        return data

    def _device_json(
        self, dev: UsbDevice, held_by: dict[str, str], *, full: bool = False
    ) -> dict[str, Any]:
        """The device and where it is; ``full``: every attribute and interface too."""
        static = self._static_json(dev)
        data = dev.to_json() if full else dict(static)
        where = self.view.device_state(dev, held_by, qemu_id=static["qemu_id"])
        data.update(
            vm=where.vm,
            attached=where.attached,
            state=where.state,
            override=where.override,
            error=where.error,
        )
        return data

    async def status(self, request: Request) -> Response:
        return json_response(self.view.status())

    async def devices(self, request: Request) -> Response:
        held = self.view.held_by()
        devs = sorted(self.view.devices(), key=lambda d: (d.host or "", _port_key(d.port)))
        return json_response([self._device_json(d, held) for d in devs])

    async def device(self, request: Request) -> Response:
        selector = request.match_info["device"]
        if len(selector) > MAX_SELECTOR:
            raise ApiError(400, f"device must be at most {MAX_SELECTOR} characters")
        dev = self._select(selector)
        return json_response(self._device_json(dev, self.view.held_by(), full=True))

    async def vms(self, request: Request) -> Response:
        status = self.view.status()["vms"]
        out = []
        for name in self.view.vm_names():
            vm = status.get(name, {})
            out.append(
                {
                    "name": name,
                    "connected": bool(vm.get("connected")),
                    "state": vm.get("state"),
                    "qmp": vm.get("qmp"),
                    "kind": vm.get("kind"),
                    "where": vm.get("where"),
                    "devices": list(vm.get("devices", [])),
                }
            )
        return json_response(out)

    async def attachments(self, request: Request) -> Response:
        return json_response(self.view.status()["attachments"])

    async def rules(self, request: Request) -> Response:
        return json_response(
            [
                {
                    "index": rc.index,
                    "match": rc.rule.source,
                    "action": "block" if rc.block else "attach",
                    "vm": rc.attach,
                    "line": rc.line,
                }
                for rc in self.view.rules
            ]
        )

    def _identity(self, selector: str | None) -> str | None:
        """A present device's identity, else the text as a stored identity; else 404."""
        if not selector:
            return None
        with contextlib.suppress(VmplugError):
            return select_one(self.view.devices(), selector, exact=True).identity
        store = self.view.store
        if store is not None and store.known_device(selector) is not None:
            return selector
        raise ApiError(404, f"no device {selector!r}, present or in the history")

    async def history(self, request: Request) -> Response:
        store = self.view.store
        limit = _query_int(request, "limit", 100, 1, 10000)
        identity = self._identity(_query_selector(request, "device"))
        if store is None:
            return _error(503, "the daemon runs without a history database")
        entries = store.history(identity, limit=limit)
        return json_response([e.to_json() for e in entries])

    async def health(self, request: Request) -> Response:
        from vmplug.history.health import health_by_device, health_rows  # noqa: PLC0415

        store = self.view.store
        window = _query_number(request, "window", DEFAULT_WINDOW_S, 1, MAX_WINDOW_S)
        identity = self._identity(_query_selector(request, "device"))
        if store is None:
            return _error(503, "the daemon runs without a history database")
        end = time.time()
        start = end - window
        # one device: its entries and the global ones (VMs, daemon) are all it needs
        entries = store.history(identity, limit=None)
        only = [identity] if identity else None
        figures = health_by_device(entries, start, end, only)
        return json_response(health_rows(figures, store, self.view.devices()))

    # -- changes ----------------------------------------------------------------

    def _select(self, selector: str) -> UsbDevice:
        try:
            return select_one(self.view.devices(), selector, exact=True)
        except SelectorError as exc:
            raise ApiError(404, str(exc), candidates=list(exc.candidates)) from None
        except VmplugError as exc:
            raise ApiError(400, exc.render().removeprefix("vmplug: ")) from None

    async def attach(self, request: Request) -> Response:
        data = await _body(request, {"device", "vm"})
        selector = _field(data, "device")
        vm = _field(data, "vm", limit=128)
        dev = self._select(selector)
        running = self.view.running_vms()
        if vm not in running:
            return _error(404, f"no VM named {vm!r}", vms=running)
        if dev.is_hub:
            return _error(400, f"{dev.port} is a hub: QEMU cannot pass hubs through")
        self.daemon.override(dev.identity, vm)
        state = await self._settle(dev.qemu_id, vm, want=True)
        return json_response({"device": describe(dev, exact=True), "vm": vm, **state})

    async def detach(self, request: Request) -> Response:
        data = await _body(request, {"device"})
        dev = self._select(_field(data, "device"))
        self.daemon.override(dev.identity, None)
        held = self.view.holders(dev.qemu_id)
        results = {vm: await self._settle(dev.qemu_id, vm, want=False) for vm in held}
        return json_response({"device": describe(dev, exact=True), "vms": results})

    async def _settle(
        self, qemu_id: str, vm: str, *, want: bool, timeout: float = 10.0
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.view.holds(vm, qemu_id) == want:
                return {"state": "attached" if want else "detached"}
            retry = self.view.retry(vm, qemu_id)
            if retry is not None:
                return {"state": "retrying", "error": retry.error, "attempts": retry.attempt}
            await asyncio.sleep(0.01)
        return {"state": "pending", "error": f"not settled after {timeout:.0f}s"}

    async def reload(self, request: Request) -> Response:
        ok, message = await self.daemon.reload()
        return json_response({"ok": ok, "message": message}, status=200 if ok else 422)

    # -- documents, metrics, the page ------------------------------------------

    async def export_list(self, request: Request) -> Response:
        """``GET /v1/export``: the devices this device host lets go (see the module doc)."""
        if self.exporter is None:
            raise ApiError(404, "this host exports no devices (no [export] section)")
        wait = _query_number(request, "wait", 0.0, 0.0, EXPORT_WAIT_MAX_S)
        sent = request.headers.get("If-None-Match")
        listing, tag = await self.exporter.wait_change(sent, wait if sent else 0.0)
        if sent == tag:
            return Response(status=304, headers={"ETag": tag, "Cache-Control": "no-cache"})
        return json_response(listing, headers={"ETag": tag, "Cache-Control": "no-cache"})

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = json.dumps(document()).encode()
        return Response(body=self._openapi, content_type="application/json")

    async def metrics_page(self, request: Request) -> Response:
        if self.metrics is None:
            return _error(404, "metrics are off")
        body, ctype = self.metrics.render()
        return Response(body=body, headers={"Content-Type": ctype})

    async def static(self, request: Request) -> Response:
        name = request.match_info["name"]
        ctype = STATIC.get(name)
        if ctype is None:
            return _error(404, f"no asset {name[:64]!r}")
        if name not in self._assets:
            self._assets[name] = _asset(name)
        return Response(
            body=self._assets[name],
            headers={"Content-Type": f"{ctype}; charset=utf-8", "Cache-Control": "no-cache"},
        )

    async def page(self, request: Request) -> Response:
        token = request.query.get("token")
        auth = request.get(AUTH)
        if _is_tcp(request) and token is not None:
            if self.token is not None and security.same(token[:256], self.token):
                return self._new_session("/")
            return self._login_form("wrong token", status=401)
        if _is_tcp(request) and auth is None:
            return self._login_form()
        csrf = auth[1] if auth and auth[0] == "session" else ""
        html = _asset("index.html").decode().replace("{{CSRF}}", csrf)
        return Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def login(self, request: Request) -> Response:
        if _is_tcp(request):
            origin = request.headers.get("Origin") or request.headers.get("Referer")
            if not security.origin_matches(origin, request.headers.get("Host")):
                return _error(403, "cross-site request refused: Origin is not this page")
        try:
            form = await request.post()
        except ValueError:
            raise ApiError(400, "body must be a form with a token field") from None
        token = form.get("token")
        if (
            isinstance(token, str)
            and self.token is not None
            and security.same(token.strip()[:256], self.token)
        ):
            return self._new_session("/")
        return self._login_form("wrong token", status=401)

    def _new_session(self, location: str) -> Response:
        sid, _csrf = self.sessions.new()
        resp = Response(status=303, headers={"Location": location})
        resp.set_cookie(security.SESSION_COOKIE, sid, httponly=True, samesite="Strict", path="/")
        return resp

    def _login_form(self, message: str = "", status: int = 200) -> Response:
        note = f'<p class="error">{message}</p>' if message else ""
        html = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<title>vmplug: sign in</title><link rel="icon" href="data:,">'
            '<link rel="stylesheet" href="/static/app.css">'
            '</head><body class="login"><form method="post" action="/login">'
            "<h1>vmplug</h1>"
            f"{note}<label>API token (from the token file)"
            '<input name="token" type="password" autocomplete="current-password" required>'
            '</label><button type="submit">Sign in</button></form></body></html>'
        )
        return Response(text=html, content_type="text/html", status=status)


def _port_key(port: str) -> tuple[int, ...]:
    out = []
    for part in port.replace("-", ".").split("."):
        out.append(int(part) if part.isdigit() else -1)
    return tuple(out)


def _end_stream(q: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Make an event stream's loop end (``None``), even when its queue is full."""
    while q.full():
        q.get_nowait()
    q.put_nowait(None)


def _is_tcp(request: Request) -> bool:
    transport = request.transport
    if transport is None:
        return True
    sock = transport.get_extra_info("socket")
    return sock is None or sock.family != socket.AF_UNIX


def _headers(resp: Response) -> Response:
    h = resp.headers
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Content-Security-Policy", CSP)
    return resp
