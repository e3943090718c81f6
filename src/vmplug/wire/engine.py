"""The Docker/Podman Engine API over aiohttp: one client for the backend and the doctor.

* :func:`candidates`: where the API is -- the address given, else
  ``$DOCKER_HOST``, else Docker's socket, rootful Podman's and the user's
  rootless Podman's (``$XDG_RUNTIME_DIR/podman/podman.sock``);
* :class:`Engine`: JSON ``GET``/``POST`` and the ``/events`` stream over a
  unix socket (aiohttp's ``UnixConnector``) or TCP (``tcp://HOST:PORT``).

The API version is negotiated, never assumed, and kept per engine address
for the process's life (:func:`forget_version` drops it): the first call to
an address asks ``GET /_ping`` and reads its ``Api-Version`` header, as the
docker CLI does (Docker and Podman both send it); only an engine whose ping
names no version is asked ``GET /version`` for its ``ApiVersion``.  Every
later path is prefixed with that version (Debian's Docker 20.10 answers 1.41
and refuses newer prefixes with HTTP 400; Podman 4.3 answers 1.41 for its
Docker-compatible API).  ``/version`` is not the first choice because
Podman's handler runs ``dpkg-query --search`` for conmon, crun and
slirp4netns on every call: 2.4 s on this machine, minutes in the lab guest
under TCG, where a client retrying it piled up dozens of ``dpkg-query``
processes, while ``/_ping`` answered in 11 ms.  An engine that names no
version at all is spoken to without a prefix (served at its own version).
A cached version is forgotten when the engine cannot be reached (it may come
back another version) or answers HTTP 400 "too new".

Every failure is an :class:`~vmplug.wire.errors.EngineError` with
``address``, ``path`` and, when the engine answered, ``status``.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from vmplug.wire._sync import run_sync
from vmplug.wire.errors import EngineError

#: Where the Docker and Podman API sockets usually are.
DEFAULT_SOCKETS = (
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
)


def rootless_podman() -> str | None:
    """The user's rootless Podman socket (``$XDG_RUNTIME_DIR/podman/podman.sock``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return posixpath.join(runtime, "podman", "podman.sock") if runtime else None


def candidates(address: str | None = None) -> list[str]:
    """Candidate API addresses, in order: ``address``; else ``$DOCKER_HOST``
    alone (as the docker CLI does); else the usual sockets.  Unix sockets are
    given as paths (``unix://`` removed), TCP ones as ``tcp://HOST:PORT``."""
    if address:
        return [address.removeprefix("unix://")]
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith(("unix://", "tcp://", "http://")):
        return [host.removeprefix("unix://")]
    found = list(DEFAULT_SOCKETS)
    rootless = rootless_podman()
    if rootless:
        found.append(rootless)
    return list(dict.fromkeys(found))


def is_unix(address: str) -> bool:
    return not address.startswith(("tcp://", "http://"))


def exists(address: str) -> bool:
    """A unix socket's file is there (a TCP address is always worth a try)."""
    return not is_unix(address) or os.path.exists(address)  # noqa: PTH110


#: Negotiated API versions by engine address (None: the engine names none).
_VERSIONS: dict[str, str | None] = {}


def forget_version(address: str | None = None) -> None:
    """Drop the cached API version of ``address`` (all of them when None)."""
    if address is None:
        _VERSIONS.clear()
    else:
        _VERSIONS.pop(address.removeprefix("unix://"), None)


def cached_version(address: str) -> tuple[bool, str | None]:
    """(known, version) of ``address`` in the cache."""
    key = address.removeprefix("unix://")
    return key in _VERSIONS, _VERSIONS.get(key)


def _message(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return str(body)[:200]


class Engine:
    """The Engine API at ``address`` (a socket path, ``unix://PATH`` or
    ``tcp://HOST:PORT``).  Each request has its own connection, bounded by
    ``timeout`` seconds; the negotiated version is kept for the object's life."""

    def __init__(
        self, address: str, timeout: float = 5.0, *, api_version: str | None = None
    ) -> None:
        self.address = address.removeprefix("unix://")
        self.timeout = timeout
        #: the version every path is prefixed with; None until negotiated
        #: (and when the engine names none: then paths go unprefixed)
        self.api_version = api_version
        self._negotiated = api_version is not None
        #: how the version was learned: "given", "cache", "_ping", "/version" or "none"
        self.negotiated_by: str | None = "given" if api_version is not None else None
        if is_unix(self.address):
            self._base = "http://docker"
        else:
            self._base = "http://" + self.address.split("://", 1)[1].rstrip("/")

    def __repr__(self) -> str:
        return f"<Engine {self.address} v{self.api_version or '?'}>"

    def _session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector
        if is_unix(self.address):
            connector = aiohttp.UnixConnector(path=self.address)
        else:
            connector = aiohttp.TCPConnector()
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    def _fail(self, method: str, path: str, why: str, status: int | None = None) -> EngineError:
        return EngineError(
            f"{self.address}: {method} {path}: {why}",
            address=self.address,
            path=path,
            status=status,
        )

    async def _raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
    ) -> tuple[int, Any]:
        """One request; (status, decoded JSON body or text)."""
        status, answer, _headers = await self._raw_headers(method, path, params=params, body=body)
        return status, answer

    async def _raw_headers(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """One request; (status, decoded JSON body or text, headers lower-cased)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with (
                self._session(aiohttp.ClientTimeout(total=self.timeout)) as session,
                session.request(
                    method, self._base + path, params=params, data=data, headers=headers
                ) as resp,
            ):
                raw = await resp.read()
                status = resp.status
                headers = {k.lower(): v for k, v in resp.headers.items()}
        except TimeoutError:
            raise self._fail(method, path, f"timed out after {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            forget_version(self.address)
            why = exc.os_error.strerror or str(exc.os_error)
            raise EngineError(
                f"cannot reach the API at {self.address}: {why}", address=self.address, path=path
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._fail(method, path, str(exc) or type(exc).__name__) from exc
        if not raw.strip():
            return status, None, headers
        try:
            return status, json.loads(raw), headers
        except ValueError:
            return status, raw.decode("utf-8", "replace"), headers

    async def negotiate(self) -> str | None:
        """The version every later path uses: the address's cached one, else
        ``GET /_ping``'s ``Api-Version`` header, else ``GET /version``'s
        ``ApiVersion`` (see the module's note on Podman's ``/version``)."""
        if self._negotiated:
            return self.api_version
        known, version = cached_version(self.address)
        how = "cache"
        if not known:
            status, _body, headers = await self._raw_headers("GET", "/_ping")
            version, how = headers.get("api-version") if status == 200 else None, "_ping"
            if not version:
                status, body = await self._raw("GET", "/version")
                named = body.get("ApiVersion") if isinstance(body, dict) else None
                ok = status == 200 and isinstance(named, str) and named
                version, how = (str(named) if ok else None), ("/version" if ok else "none")
            version = version.strip().removeprefix("v") if version else None
            _VERSIONS[self.address] = version
        self.api_version, self.negotiated_by, self._negotiated = version, how, True
        return self.api_version

    async def _path(self, path: str) -> str:
        version = await self.negotiate()
        return f"/v{version}{path}" if version else path

    async def version(self) -> dict[str, Any]:
        """``docker version``'s server half (``Version``, ``ApiVersion``, ``Os``...)."""
        status, body = await self._raw("GET", "/version")
        if status != 200 or not isinstance(body, dict):
            raise self._fail("GET", "/version", f"HTTP {status}: {_message(body)}", status)
        return body

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        missing_ok: bool = False,
    ) -> Any:
        """``method path`` (versioned); the JSON answer.  A 2xx is success; a 404
        is None with ``missing_ok``; anything else raises :class:`EngineError`."""
        full = await self._path(path)
        status, answer = await self._raw(method, full, params=params, body=body)
        if status == 400 and "too new" in _message(answer) and self.negotiated_by == "cache":
            # the engine behind the address changed (downgraded): negotiate again
            forget_version(self.address)
            self._negotiated = False
            full = await self._path(path)
            status, answer = await self._raw(method, full, params=params, body=body)
        if 200 <= status < 300:
            return answer
        if status == 404 and missing_ok:
            return None
        raise self._fail(method, full, f"HTTP {status}: {_message(answer)}", status)

    async def get_json(self, path: str, *, params: Mapping[str, str] | None = None) -> Any:
        return await self.request("GET", path, params=params)

    async def post_json(
        self, path: str, body: object = None, *, params: Mapping[str, str] | None = None
    ) -> Any:
        return await self.request("POST", path, params=params, body=body)

    async def containers(self, *, all_: bool = True) -> list[dict[str, Any]]:
        """``docker ps [-a]``: summaries (Id, Names, Image, State)."""
        body = await self.get_json("/containers/json", params={"all": "1"} if all_ else None)
        if not isinstance(body, list):
            raise self._fail("GET", "/containers/json", "not a list of containers")
        return [c for c in body if isinstance(c, dict)]

    async def inspect(self, ref: str) -> dict[str, Any] | None:
        """``docker inspect REF`` (name or id); None when there is no such container."""
        path = f"/containers/{quote(ref, safe='')}/json"
        body = await self.request("GET", path, missing_ok=True)
        if body is not None and not isinstance(body, dict):
            raise self._fail("GET", path, "not a container document")
        return body

    async def events(
        self, filters: Mapping[str, list[str]] | None = None, *, since: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """``docker events``: one dict per event for as long as the caller reads
        (the stream is line-delimited JSON; connecting is bounded by ``timeout``)."""
        params: dict[str, str] = {}
        if filters:
            params["filters"] = json.dumps({k: list(v) for k, v in filters.items()})
        if since is not None:
            params["since"] = since
        full = await self._path("/events")
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        try:
            async with (
                self._session(timeout) as session,
                session.get(self._base + full, params=params) as resp,
            ):
                if resp.status != 200:
                    answer = await resp.text()
                    raise self._fail(
                        "GET", full, f"HTTP {resp.status}: {answer[:200]}", resp.status
                    )
                async for line in resp.content:
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
        except TimeoutError:
            raise self._fail("GET", full, f"timed out after {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            forget_version(self.address)
            raise EngineError(
                f"cannot reach the API at {self.address}: {exc.os_error.strerror or exc}",
                address=self.address,
                path=full,
            ) from exc
        except aiohttp.ClientError as exc:
            raise self._fail("GET", full, str(exc) or type(exc).__name__) from exc


def find_engine(address: str | None = None, timeout: float = 5.0) -> Engine | None:
    """An :class:`Engine` on the first candidate that exists (None: no Docker or Podman here)."""
    for where in candidates(address):
        if exists(where):
            return Engine(where, timeout)
    return None


def get_json_sync(address: str, path: str, timeout: float) -> Any:
    """Blocking ``GET path`` (versioned) for the doctor; raises :class:`EngineError`."""
    engine = Engine(address, timeout)
    try:
        return run_sync(lambda: engine.get_json(path), timeout * 3)
    except TimeoutError:
        raise EngineError(
            f"{address}: GET {path}: timed out after {timeout * 3:g} s", address=address, path=path
        ) from None


__all__ = [
    "DEFAULT_SOCKETS",
    "Engine",
    "cached_version",
    "candidates",
    "exists",
    "find_engine",
    "forget_version",
    "get_json_sync",
    "rootless_podman",
]
