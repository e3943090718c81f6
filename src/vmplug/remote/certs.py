"""Certificates for remote links: a small CA and one certificate per host.

Every host of a vmplug installation (device hosts and VM hosts alike) gets
one key and one certificate, signed by the installation's CA.  The same
certificate serves both ends of a link: it carries ``serverAuth`` (a device
host's export endpoint shows it) and ``clientAuth`` (a VM host's QEMU shows
it when it connects).  Its names are the host's name (CN and a DNS SAN) and
every address it is reached by (DNS or IP SANs): QEMU checks the address it
connects to against them, the export side checks the client's name.

Files (PEM): ``ca-cert.pem`` / ``ca-key.pem`` for the CA, ``NAME-cert.pem`` /
``NAME-key.pem`` for a host.  Keys are written 0600 and never overwritten by
accident.  :func:`qemu_client_dir` lays a host's files out as QEMU's
``tls-creds-x509`` reads them (``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``).

Keys are ECDSA P-256 (GnuTLS in QEMU and OpenSSL in Python both take them).
Existing certificates from another CA work too: :func:`check` validates
whatever files it is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmplug.errors import UsageError, VmplugError

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
#: below this many days left, :func:`check` warns
EXPIRY_WARN_DAYS = 30


class CertError(VmplugError):
    """A certificate or key is missing, unreadable, invalid or does not fit."""


@dataclass(frozen=True, slots=True)
class HostFiles:
    """The three files a host needs for a link: CA certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def to_json(self) -> dict[str, str]:
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What :func:`check` found: names, validity, and any problems (empty: fine)."""

    subject: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def days_left(self) -> float:
        return (self.not_after - _now()).total_seconds() / 86400

    def to_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "names": list(self.names),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "days_left": round(self.days_left, 1),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
        }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertError(f"{path} exists; refusing to overwrite a key (remove it first)") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_name(name: str) -> None:
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-._" for c in name):
        raise UsageError(
            f"invalid host name {name!r} for a certificate (letters, digits, '-', '.', '_')"
        )


def make_ca(directory: Path, *, name: str = "vmplug CA", days: int = 3650) -> HostFiles:
    """Create a CA (key and self-signed certificate) in ``directory``.

    Returns the CA's files as a :class:`HostFiles` (``cert`` is the CA
    certificate itself).  An existing CA key is never overwritten.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / CA_KEY, _key_pem(key), overwrite=False)
    _write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return HostFiles(directory / CA_CERT, directory / CA_CERT, directory / CA_KEY)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertError(f"{path} is not a PEM certificate: {exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: vmplug signs with an EC CA key, this is {type(key).__name__}")
    return key


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for item in names:
        if item in seen:
            continue
        seen.add(item)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            out.append(x509.DNSName(item))
    return out


def issue(
    ca_dir: Path,
    name: str,
    out_dir: Path | None = None,
    *,
    addresses: Sequence[str] = (),
    days: int = 825,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    overwrite: bool = False,
) -> HostFiles:
    """Issue a certificate for host ``name`` signed by the CA in ``ca_dir``.

    ``addresses`` are the DNS names and IP addresses the host is reached by
    (its ``name`` is always one).  ``not_before`` / ``not_after`` override
    the validity (tests make expired certificates with them).
    """
    _check_name(name)
    out = ca_dir if out_dir is None else out_dir
    out.mkdir(parents=True, exist_ok=True)
    ca_cert = _load_cert(ca_dir / CA_CERT)
    ca_key = _load_key(ca_dir / CA_KEY)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san([name, *addresses])), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = HostFiles(ca_dir / CA_CERT, out / f"{name}-cert.pem", out / f"{name}-key.pem")
    _write_private(files.key, _key_pem(key), overwrite=overwrite)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    if out != ca_dir:
        _write_public(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
        files = HostFiles(out / CA_CERT, files.cert, files.key)
    return files


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's CN and SAN entries (DNS names and IP addresses), CN first."""
    names: list[str] = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(names)
    names.extend(str(n) for n in san.get_values_for_type(x509.DNSName))
    names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return tuple(dict.fromkeys(names))


def check(files: HostFiles, *, name: str | None = None, now: dt.datetime | None = None) -> CertInfo:
    """Validate a host's files: readable, key 0600 and matching, signed by the
    CA, valid now, carrying ``name`` when given.  Problems are reported, not raised."""
    cert = _load_cert(files.cert)
    ca = _load_cert(files.ca)
    at = now or _now()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        problems.append(f"key {files.key} unreadable: {exc}")
    else:
        mine = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != theirs:
            problems.append(f"key {files.key} does not belong to certificate {files.cert}")
        mode = files.key.stat().st_mode & 0o777
        if mode & 0o077:
            problems.append(f"key {files.key} has mode {mode:o}; run chmod 600 {files.key}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"{files.cert} is not signed by the CA in {files.ca}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at < start:
        problems.append(f"{files.cert} is not valid before {start:%Y-%m-%d %H:%M} UTC")
    if at > end:
        problems.append(f"{files.cert} expired on {end:%Y-%m-%d %H:%M} UTC")
    elif (end - at).days < EXPIRY_WARN_DAYS:
        warnings.append(f"{files.cert} expires in {(end - at).days} days ({end:%Y-%m-%d})")
    if at > ca.not_valid_after_utc:
        problems.append(f"CA certificate {files.ca} expired on {ca.not_valid_after_utc:%Y-%m-%d}")
    names = cert_names(cert)
    if name is not None and name not in names:
        problems.append(f"{files.cert} is for {', '.join(names)}, not {name}")
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        names=names,
        not_before=start,
        not_after=end,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def qemu_client_dir(files: HostFiles, directory: Path) -> Path:
    """Copy a host's files into ``directory`` under the names QEMU's
    ``tls-creds-x509`` (endpoint=client) reads; the key stays 0600."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copyfile(files.ca, directory / "ca-cert.pem")
    shutil.copyfile(files.cert, directory / "client-cert.pem")
    _write_private(directory / "client-key.pem", files.key.read_bytes(), overwrite=True)
    return directory


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CertError",
    "CertInfo",
    "HostFiles",
    "cert_names",
    "check",
    "issue",
    "make_ca",
    "qemu_client_dir",
]
