"""TLS for remote links: the contexts both ends use, and a byte relay.

A device host's export endpoint is a TLS *server* that demands a client
certificate signed by the installation's CA (mutual TLS) and then checks the
client's name against the VM hosts it exports to (:func:`peer_names`).  A
VM host's QEMU is the TLS client (``tls-creds-x509``, ``verify-peer=on``);
vmplug's own client side (:func:`client_context`) checks the server's name
as QEMU does.  TLS 1.2 is the floor on both sides.

:func:`relay` copies bytes both ways between two asyncio streams until
either side closes, and counts them (:class:`RelayStats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.errors import VmplugError

#: one read; TLS records are at most 16 KiB, usbredir bulk packets up to 64 KiB
CHUNK = 256 * 1024


class TlsSetupError(VmplugError):
    """A TLS context could not be built from the given files."""


def _context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load CA certificate {ca}: {exc}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load certificate {cert} with key {key}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``ca``."""
    ctx = _context(ssl.Purpose.CLIENT_AUTH, ca, cert, key)
    ctx.check_hostname = False  # a server has no name to expect; peer_names() is checked
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` and its name."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, ca, cert, key)
    ctx.check_hostname = True
    return ctx


def peer_names(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, ...]:
    """The verified peer certificate's CN and subjectAltName DNS/IP entries."""
    if ssl_object is None:
        return ()
    cert = ssl_object.getpeercert()
    if not cert:
        return ()
    names: list[str] = []
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
    san: Any = cert.get("subjectAltName", ())
    for kind, value in san:
        if kind in ("DNS", "IP Address"):
            names.append(str(value))
    return tuple(dict.fromkeys(names))


def describe_tls_error(exc: BaseException) -> str:
    """A short, user-facing reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "WRONG_VERSION_NUMBER": "the peer does not speak TLS (plaintext client?)",
            "HTTP_REQUEST": "the peer does not speak TLS (an HTTP request)",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate",
            "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our CA",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
            "TLSV1_ALERT_DECRYPT_ERROR": "the peer rejected our certificate",
        }
        hint = hints.get(reason)
        return f"{reason}: {hint}" if hint else f"TLS error: {reason}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError | EOFError | asyncio.IncompleteReadError):
        return f"the peer closed the connection during the handshake ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class RelayStats:
    """Bytes relayed in each direction, and when the relay began."""

    up: int = 0  # from the first stream to the second
    down: int = 0  # from the second to the first
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    #: which side closed first: "a", "b", or None while running
    closed_by: str | None = None


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stats: RelayStats,
    attr: str,
) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        setattr(stats, attr, getattr(stats, attr) + len(data))
        await writer.drain()


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    stats: RelayStats | None = None,
) -> RelayStats:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until one side ends; close both.

    usbredir has no half-close: when one direction ends the link is over, so
    the other direction is cancelled and both writers are closed (bounded).
    """
    st = stats if stats is not None else RelayStats()
    up = asyncio.create_task(_pump(a[0], b[1], st, "up"))
    down = asyncio.create_task(_pump(b[0], a[1], st, "down"))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        st.closed_by = "a" if up in done else "b"
    finally:
        for task in (up, down):
            task.cancel()
        for task in (up, down):
            with contextlib.suppress(BaseException):
                await task
        await close_writer(a[1])
        await close_writer(b[1])
        st.ended = time.monotonic()
    return st


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 2.0) -> None:
    """Close a stream, waiting at most ``timeout`` seconds (a TLS close_notify may
    stall on a peer that went away): then the transport is aborted."""
    with contextlib.suppress(Exception):
        writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (TimeoutError, OSError, ssl.SSLError):
        _abort(writer)
    except asyncio.CancelledError:
        _abort(writer)
        raise


def _abort(writer: asyncio.StreamWriter) -> None:
    # asyncio's SSL transport whose protocol is already torn down (the peer's
    # reset seen while closing) raises AttributeError from abort(): the link is
    # gone either way, and a traceback in the daemon's log would say otherwise
    with contextlib.suppress(Exception):
        writer.transport.abort()


__all__ = [
    "CHUNK",
    "RelayStats",
    "TlsSetupError",
    "client_context",
    "close_writer",
    "describe_tls_error",
    "peer_names",
    "relay",
    "server_context",
]
