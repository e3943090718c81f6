"""The CA and host certificates vmplug makes (remote/certs.py), checked with
the same library and with OpenSSL itself (Python's ssl) on a real handshake."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest

from tests.remote.conftest import Pki, expired
from vmplug.errors import UsageError
from vmplug.remote import certs
from vmplug.wire.tls import client_context, peer_names, server_context


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_0600_and_never_overwritten(pki: Pki) -> None:
    assert _mode(pki.root / "ca" / certs.CA_KEY) == 0o600
    assert _mode(pki.devhost.key) == 0o600
    assert _mode(pki.devhost.cert) == 0o644
    with pytest.raises(certs.CertError, match="refusing to overwrite"):
        pki.issue("devhost")
    with pytest.raises(certs.CertError, match="refusing to overwrite"):
        certs.make_ca(pki.root / "ca")
    qemu = pki.qemu_dir(pki.vmhost, "vmhost")
    assert sorted(p.name for p in qemu.iterdir()) == [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
    ]
    assert _mode(qemu / "client-key.pem") == 0o600


def test_check_accepts_a_good_certificate(pki: Pki) -> None:
    info = certs.check(pki.devhost, name="127.0.0.1")
    assert info.problems == ()
    assert info.names == ("devhost", "127.0.0.1")
    assert 800 < info.days_left <= 825


def test_check_names_every_problem(pki: Pki) -> None:
    old = expired(pki, "oldhost")
    info = certs.check(old)
    assert any("expired on" in p for p in info.problems), info.problems
    stranger = certs.issue(pki.other_ca(), "stranger", pki.root / "stranger")
    mixed = certs.HostFiles(pki.ca.cert, stranger.cert, stranger.key)
    assert any("not signed by the CA" in p for p in certs.check(mixed).problems)
    wrong_key = certs.HostFiles(pki.ca.cert, pki.devhost.cert, pki.vmhost.key)
    assert any("does not belong" in p for p in certs.check(wrong_key).problems)
    assert any("not otherhost" in p for p in certs.check(pki.devhost, name="otherhost").problems)
    pki.vmhost.key.chmod(0o644)
    assert any("chmod 600" in p for p in certs.check(pki.vmhost).problems)


def test_soon_expiring_is_a_warning(pki: Pki) -> None:
    soon = pki.issue("soonhost", days=10)
    info = certs.check(soon)
    assert info.problems == ()
    assert any("expires in" in w for w in info.warnings)


def test_bad_input_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(UsageError, match="invalid host name"):
        pki.issue("bad/name")
    with pytest.raises(certs.CertError, match="cannot read certificate"):
        certs.issue(tmp_path / "nowhere", "x")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(certs.CertError, match="not a PEM certificate"):
        certs.check(certs.HostFiles(junk, junk, junk))


async def test_openssl_accepts_them_for_mutual_tls(pki: Pki) -> None:
    """Python's ssl (OpenSSL) does a mutual handshake with the certificates:
    the server sees the client's name, the client checks the server's IP SAN."""
    seen: list[tuple[str, ...]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_names(writer.get_extra_info("ssl_object")))
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    srv_ctx = server_context(pki.devhost.ca, pki.devhost.cert, pki.devhost.key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=srv_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        cli_ctx = client_context(pki.vmhost.ca, pki.vmhost.cert, pki.vmhost.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cli_ctx)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        assert seen == [("vmhost",)]
        # the VM host's certificate carries no 127.0.0.1: as a server it is refused
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=client_context(pki.devhost.ca, pki.devhost.cert, pki.devhost.key),
                server_hostname="127.0.0.2",
            )
    finally:
        server.close()
