"""The TCP listener of ``[api] listen`` on aiohttp: the same handlers as the unix socket.

aiohttp parses, keeps connections alive and speaks TLS (a device host's mutual
TLS); every request goes to :meth:`vmplug.api.server.Api.dispatch` as a
:class:`vmplug.api.http.Request`, and its :class:`~vmplug.api.http.Response`
comes back as aiohttp's.  Imported only when the config has ``[api] listen``:
aiohttp costs the daemon about 13 MiB (``bench/bench_daemon.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from vmplug.api import http
from vmplug.api.limits import Limits


async def runner(
    dispatch: Callable[[http.Request], Awaitable[http.Response]], limits: Limits
) -> web.AppRunner:
    """An aiohttp runner (set up) whose one route hands every request to ``dispatch``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        native: list[web.StreamResponse] = []

        async def body() -> bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise http.HttpError(413, f"body larger than {http.MAX_BODY} bytes") from None

        async def open_stream(resp: http.StreamResponse) -> http.Writer:
            out = web.StreamResponse(status=resp.status, headers=_headers(resp))
            await out.prepare(request)
            native.append(out)
            return out.write

        query: dict[str, str] = {}
        for k, v in request.query.items():
            query.setdefault(k, v)
        headers = http.Headers()
        for k, v in request.headers.items():
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        ours = http.Request(
            request.method,
            request.path,
            query=query,
            headers=headers,
            cookies=dict(request.cookies),
            transport=request.transport,
            content_length=request.content_length,
            body=body,
            open_stream=open_stream,
        )
        resp = await dispatch(ours)
        if native:
            return native[0]
        return web.Response(status=resp.status, body=resp.body, headers=_headers(resp))

    app = web.Application(client_max_size=http.MAX_BODY)
    # every path, a decoded newline in it too (``.`` would stop there: aiohttp's plain 404)
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    run = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, **limits.runner_kwargs())
    await run.setup()
    return run


def _headers(resp: http.Response) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(resp.headers.items())
    for cookie in resp.cookies:
        out.add("Set-Cookie", cookie)
    return out
