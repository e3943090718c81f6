"""The API's request and response, its router, and a small HTTP/1.1 server on asyncio.

:class:`vmplug.api.server.Api`'s handlers take a :class:`Request` and answer a
:class:`Response` (or a :class:`StreamResponse`, the event stream), whatever
serves them: the unix socket is served by :class:`Connection` here (standard
library only), the TCP listener of ``[api] listen`` by aiohttp
(:mod:`vmplug.api.aioweb`, imported only then).  aiohttp and its client side
cost the daemon about 13 MiB of RSS (``bench/bench_daemon.py``); a daemon that
serves only its unix socket does not load it.

What :class:`Connection` takes, and what it refuses (``400`` and the
connection closed unless said otherwise), as aiohttp's server does:

* a request line or a header line over :data:`MAX_LINE` bytes
  (``LineTooLong``), a head over :data:`MAX_HEAD` bytes or with more than
  :data:`MAX_HEADERS` headers, a request line that is not
  ``METHOD TARGET HTTP/1.x``, a header line without a name;
* a body: ``Content-Length`` only, at most :data:`MAX_BODY` bytes (``413``);
  ``Transfer-Encoding`` is answered ``501`` (nothing of the API's clients
  sends one);
* keep-alive (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 with
  ``keep-alive``), one request after another; an idle connection is closed
  after ``idle_timeout`` (the first request's deadline is the
  :class:`vmplug.api.limits.Gate`'s ``header_timeout``; a later one's head
  and any body must come within ``idle_timeout``).

Every bad request is one throttled WARNING line
(:class:`vmplug.api.limits.BadRequests`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

log = logging.getLogger("vmplug.api")

#: aiohttp's own bounds: a request line or one header line
MAX_LINE = 8190
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024

Writer = Callable[[bytes], Awaitable[None]]


class HttpError(Exception):
    """Answered as ``{"error": reason}`` JSON (an unknown route, a wrong method, a bad body)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class Headers(MutableMapping[str, str]):
    """Header names matched without regard to case; the first spelling is kept."""

    def __init__(self, items: dict[str, str] | None = None) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for k, v in (items or {}).items():
            self[k] = v

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()][1]

    def __setitem__(self, key: str, value: str) -> None:
        old = self._items.get(key.lower())
        self._items[key.lower()] = (old[0] if old else key, value)

    def __delitem__(self, key: str) -> None:
        del self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items


class Request:
    """One request, as the handlers see it (on either listener)."""

    def __init__(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        headers: Headers | None = None,
        cookies: dict[str, str] | None = None,
        transport: asyncio.BaseTransport | None = None,
        content_length: int | None = None,
        body: Callable[[], Awaitable[bytes]] | None = None,
        open_stream: Callable[[StreamResponse], Awaitable[Writer]] | None = None,
    ) -> None:
        self.method = method
        #: the path, percent-decoded
        self.path = path
        #: the first value of each query parameter, decoded
        self.query = query or {}
        self.headers = headers if headers is not None else Headers()
        self.cookies = cookies or {}
        self.transport = transport
        self.content_length = content_length
        self.match_info: dict[str, str] = {}
        self._body = body
        self._open_stream = open_stream
        self._state: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self._state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    async def read(self) -> bytes:
        return b"" if self._body is None else await self._body()

    async def post(self) -> dict[str, str]:
        """A form (``application/x-www-form-urlencoded``); ValueError for anything else."""
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise ValueError("not a urlencoded form")
        text = (await self.read()).decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True))


class Response:
    """A whole answer: status, headers, body."""

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes | None = None,
        text: str | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.headers = Headers(headers)
        if text is not None:
            body = text.encode()
            content_type = f"{content_type or 'text/plain'}; charset=utf-8"
        self.body = body or b""
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        #: ``Set-Cookie`` values (a header that may come more than once)
        self.cookies: list[str] = []

    def set_cookie(
        self, name: str, value: str, *, httponly: bool, samesite: str, path: str
    ) -> None:
        cookie = f"{name}={value}; Path={path}; SameSite={samesite}"
        self.cookies.append(cookie + ("; HttpOnly" if httponly else ""))


class StreamResponse(Response):
    """An answer written while it lasts (``/v1/events``): :meth:`prepare`, then :meth:`write`."""

    def __init__(self, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(headers=headers)
        self._write: Writer | None = None

    async def prepare(self, request: Request) -> None:
        assert request._open_stream is not None, "this listener serves no streams"
        self._write = await request._open_stream(self)

    @property
    def prepared(self) -> bool:
        return self._write is not None

    async def write(self, data: bytes) -> None:
        assert self._write is not None, "prepare() first"
        await self._write(data)


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        status=status,
        text=json.dumps(data),
        content_type="application/json",
        headers=headers,
    )


Handler = Callable[[Request], Awaitable[Response]]
_PARAM = re.compile(r"\{(\w+)\}")


class Router:
    """Routes by method and path; ``{name}`` matches one path segment.  GET routes take HEAD."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, str, re.Pattern[str], Handler]] = []

    def add_get(self, path: str, handler: Handler) -> None:
        self._add("GET", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self._add("POST", path, handler)

    def _add(self, method: str, path: str, handler: Handler) -> None:
        pattern = re.compile(
            "".join(
                f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
                for i, part in enumerate(_PARAM.split(path))
            )
        )
        self._routes.append((method, path, pattern, handler))

    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every route."""
        return [(m, p) for m, p, _, _ in self._routes]

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and the path's parameters; :class:`HttpError` 404 or 405."""
        allowed: set[str] = set()
        for m, _, pattern, handler in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            if m == method or (m == "GET" and method == "HEAD"):
                return handler, found.groupdict()
            allowed |= {m, "HEAD"} if m == "GET" else {m}
        if allowed:
            raise HttpError(405, "Method Not Allowed", {"Allow": ",".join(sorted(allowed))})
        raise HttpError(404, "Not Found")


# -- the server -------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def head_bytes(status: int, headers: Headers, cookies: list[str], extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Set-Cookie: {c}" for c in cookies]
    text = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return text.encode("latin-1", "replace")


def parse_head(raw: bytes) -> tuple[str, str, str, Headers]:
    """Method, target, version and headers of a request head (without its blank line)."""
    lines = raw.split(b"\r\n")
    for line in lines:
        if len(line) > MAX_LINE:
            what = "Status line" if line is lines[0] else "Header line"
            raise BadRequest(
                400, "LineTooLong", f"Got more than {MAX_LINE} bytes when reading {what}"
            )
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(400, "BadHttpMessage", f"more than {MAX_HEADERS} headers")
    try:
        first = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "BadStatusLine", "the request line is not ASCII") from None
    parts = first.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise BadRequest(400, "BadStatusLine", f"Bad request line {first[:64]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
        raise BadRequest(400, "BadStatusLine", f"Bad request line {first[:64]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise BadRequest(400, "InvalidHeader", f"Invalid header {line[:40]!r}")
        key = name.decode("latin-1")
        text = value.strip().decode("latin-1")
        if key in headers:  # repeated: one value, as RFC 9110 joins them
            text = headers[key] + ("; " if key.lower() == "cookie" else ", ") + text
        headers[key] = text
    return method, target, version, headers


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip('"')
    return out


Dispatch = Callable[[Request], Awaitable[Response]]


class Connection(asyncio.Protocol):
    """One connection of the unix socket: requests read one after another and
    answered through ``dispatch``.  ``_request_count`` is what
    :class:`vmplug.api.limits.Gate` looks at for its header deadline."""

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        idle_timeout: float,
        on_bad: Callable[[str, int, str, str], None],
        live: set[Connection] | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.idle_timeout = idle_timeout
        self.on_bad = on_bad
        self.live = live
        self._request_count = 0
        self.transport: asyncio.Transport | None = None
        self.reader = asyncio.StreamReader(limit=MAX_HEAD)
        self.task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._lost = False

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.live is not None:
            self.live.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool | None:
        self.reader.feed_eof()
        return True  # keep the write side open to answer what was asked

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.reader.feed_eof()
        self.resume_writing()
        if self.live is not None:
            self.live.discard(self)

    # -- serving ----------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.task is not None:
            self.task.cancel()

    async def _send(self, data: bytes) -> None:
        if self._lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)
        if self._drain is not None:
            await self._drain

    def _peer(self) -> str:
        from vmplug.api.limits import client_key  # noqa: PLC0415 (limits imports nothing of this)

        return client_key(self.transport) if self.transport is not None else "?"

    async def _refuse(self, exc: BadRequest) -> None:
        self.on_bad(self._peer(), exc.status, exc.kind, str(exc))
        body = json.dumps({"error": str(exc)}).encode()
        headers = Headers({"Content-Type": "application/json; charset=utf-8"})
        headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        with contextlib.suppress(ConnectionError):
            await self._send(head_bytes(exc.status, headers, []) + body)

    async def _serve(self) -> None:
        try:
            while True:
                try:
                    keep = await self._one()
                except BadRequest as exc:
                    await self._refuse(exc)
                    return
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # dispatch answers its handlers' errors: this is a bug here
            log.exception("API: error serving a unix-socket connection")
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _read_head(self) -> bytes | None:
        """The next head, None at a clean end (EOF or idle between requests)."""
        timeout = self.idle_timeout if self._request_count and self.idle_timeout > 0 else None
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest(400, "BadHttpMessage", "the request ended early") from None
            return None
        except asyncio.LimitOverrunError:
            raise BadRequest(400, "LineTooLong", f"a request head over {MAX_HEAD} bytes") from None
        except TimeoutError:
            return None
        return head[:-4].lstrip(b"\r\n")  # a stray CRLF before a request is allowed

    async def _one(self) -> bool:
        raw = await self._read_head()
        if raw is None:
            return False
        method, target, version, headers = parse_head(raw)
        self._request_count += 1
        if "Transfer-Encoding" in headers:
            raise BadRequest(501, "BadHttpMessage", "Transfer-Encoding is not supported")
        length: int | None = None
        if "Content-Length" in headers:
            text = headers["Content-Length"]
            if not text.isascii() or not text.isdigit() or len(text) > 12:
                raise BadRequest(400, "InvalidHeader", f"Content-Length {text[:20]!r}")
            length = int(text)
            if length > MAX_BODY:
                raise BadRequest(413, "TooLarge", f"body larger than {MAX_BODY} bytes")
        conn = headers.get("Connection", "").lower()
        keep = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
        body = b""
        if length:
            try:
                body = await asyncio.wait_for(
                    self.reader.readexactly(length), self.idle_timeout or None
                )
            except (asyncio.IncompleteReadError, TimeoutError):
                raise BadRequest(400, "BadHttpMessage", "the body ended early") from None
        path, _, query = target.partition("?")

        async def read() -> bytes:
            return body

        stream: list[bool] = []

        async def open_stream(resp: StreamResponse) -> Writer:
            # chunked on HTTP/1.1; HTTP/1.0: until the connection closes
            stream.append(version == "HTTP/1.1")
            resp.headers.pop("Content-Length", None)
            extra = "Transfer-Encoding: chunked\r\n" if stream[0] else "Connection: close\r\n"
            await self._send(head_bytes(resp.status, resp.headers, resp.cookies, extra))

            async def write(data: bytes) -> None:
                if data:
                    await self._send(b"%x\r\n%s\r\n" % (len(data), data) if stream[0] else data)

            return write

        request = Request(
            method,
            unquote(path, errors="surrogateescape"),
            query=_first(query),
            headers=headers,
            cookies=_cookies(headers.get("Cookie")),
            transport=self.transport,
            content_length=length,
            body=read,
            open_stream=open_stream,
        )
        resp = await self.dispatch(request)
        if stream:
            if not stream[0]:
                return False
            await self._send(b"0\r\n\r\n")
            return keep
        resp.headers["Content-Length"] = str(len(resp.body))
        if not keep:
            resp.headers["Connection"] = "close"
        head = head_bytes(resp.status, resp.headers, resp.cookies)
        await self._send(head if method == "HEAD" else head + resp.body)
        return keep


def _first(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True, errors="surrogateescape"):
        out.setdefault(k, v)
    return out


__all__ = [
    "MAX_BODY",
    "Connection",
    "Headers",
    "HttpError",
    "Request",
    "Response",
    "Router",
    "StreamResponse",
    "json_response",
]
