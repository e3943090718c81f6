"""Doctor checks of remote links (devices on a device host, VMs here).

What is read (:func:`gather`, once per run, through ``ctx.network``):

* the certificates of every ``[host.NAME]`` (this VM host's own, for the
  device host NAME) and of ``[export]`` (this device host's), and their CA;
* every remote endpoint this host uses: the static ``[host.NAME] devices``
  ports and every vmplug ``usb-redir`` chardev the running QEMUs hold.  Each
  is *probed*: a TCP connect (its time is one round trip), the mutual-TLS
  handshake with this host's certificate, then :data:`~vmplug.remote.export.PROBE`,
  to which the device host's endpoint answers with its state (who holds the
  device, streaming, the link's RTT and retransmits as its kernel sees them,
  links it declared dead);
* QEMU's side of each link: ``query-chardev`` (``frontend-open``; its
  ``filename`` is ``disconnected:…`` while there is no connection).

Checks: ``network.certs`` (valid, not expiring within 30 days, the CA too),
``network.reach`` (the endpoint answers over mutual TLS, with the reason when
not), ``network.stream`` (QEMU's view against the device host's: connected
on both, a half-open link, held by another VM host, the device not there),
``network.quality`` (round-trip time and drops), ``network.container``
(a dockurr/windows QEMU dials the device host from the container's network).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmplug.doctor.findings import CheckSpec, Finding, Severity

if TYPE_CHECKING:
    from vmplug.doctor.context import DoctorContext

LAYER = "network"
#: above this round-trip time a remote audio device's isochronous stream
#: suffers (QEMU already buffers ~60 ms per iso endpoint)
RTT_WARN_MS = 30.0
EXPIRY_WARN_DAYS = 30


@dataclass(frozen=True, slots=True)
class Creds:
    """One end's certificate files and the name they must carry."""

    role: str  # "[host.NAME]" or "[export]"
    name: str
    ca: Path
    cert: Path
    key: Path


@dataclass(slots=True)
class Probe:
    """One endpoint, as this host reached it."""

    host: str  # the [host.NAME] it belongs to ("?" when no table names the address)
    address: str
    port: int
    connect_ms: float | None = None
    handshake_ms: float | None = None
    error: str | None = None
    fix: str | None = None
    status: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class QemuLink:
    """A vmplug usb-redir chardev of a running QEMU."""

    vm: str
    label: str
    address: str | None
    port: int | None
    connected: bool
    frontend_open: bool | None
    filename: str


@dataclass(slots=True)
class NetworkScan:
    creds: list[Creds] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    links: list[QemuLink] = field(default_factory=list)
    qemu_errors: list[str] = field(default_factory=list)

    def probe_for(self, address: str | None, port: int | None) -> Probe | None:
        for p in self.probes:
            if p.address == address and p.port == port:
                return p
        return None


def issue_fix(name: str, directory: Path | str, address: str | None = None) -> str:
    """The command that issues a host certificate (on the host with the CA key)."""
    extra = f', addresses=["{address}"]' if address else ""
    return (
        "python3 -c 'from pathlib import Path as P; from vmplug.remote.certs import issue; "
        f'issue(P("CA_DIR"), "{name}", P("{directory}"){extra})\' '
        "(CA_DIR: the folder with ca-key.pem)"
    )


# ------------------------------------------------------------------ gathering


def _creds(ctx: DoctorContext) -> list[Creds]:
    out: list[Creds] = []
    cfg = ctx.config
    if cfg is None:
        return out
    for host in cfg.hosts.values():
        if host.certs is None:
            continue
        d = Path(host.certs)
        out.append(
            Creds(
                f"[host.{host.name}]",
                host.me,
                d / "ca-cert.pem",
                d / f"{host.me}-cert.pem",
                d / f"{host.me}-key.pem",
            )
        )
    export = cfg.export
    if export is not None and export.certs is not None:
        d = Path(export.certs)
        out.append(
            Creds(
                "[export]",
                export.name,
                d / "ca-cert.pem",
                d / f"{export.name}-cert.pem",
                d / f"{export.name}-key.pem",
            )
        )
    return out


_PEER = re.compile(r"<->\s*\[?([^\s\]]+?)\]?:(\d+)\s*$")
_DISCONNECTED = re.compile(r"^disconnected:tcp:\[?([^\s\]]+?)\]?:(\d+)")


def parse_chardev_filename(filename: str) -> tuple[str | None, int | None, bool]:
    """``(address, port, connected)`` of a socket chardev's ``filename`` as
    QEMU reports it (``tcp:LOCAL:P <-> PEER:P`` or ``disconnected:tcp:HOST:P``)."""
    if m := _DISCONNECTED.match(filename):
        return m.group(1), int(m.group(2)), False
    if m := _PEER.search(filename):
        return m.group(1), int(m.group(2)), True
    return None, None, not filename.startswith("disconnected:")


def qemu_links(ctx: DoctorContext) -> tuple[list[QemuLink], list[str]]:
    """The vmplug usb-redir chardevs of every QEMU the doctor found."""
    from vmplug.wire.errors import WireError  # noqa: PLC0415
    from vmplug.wire.qmp import SyncQmp  # noqa: PLC0415

    links: list[QemuLink] = []
    errors: list[str] = []
    for inst in ctx.qemus:
        if inst.qmp_used is None:
            continue
        try:
            with SyncQmp(inst.qmp_used, ctx.timeout, name="doctor") as client:
                chardevs = client.execute("query-chardev", timeout=ctx.timeout) or []
        except WireError as exc:
            errors.append(f"{inst.name}: {exc}")
            continue
        for c in chardevs:
            label = str(c.get("label", ""))
            if not (label.startswith("vmplug-") and label.endswith("-chr")):
                continue
            filename = str(c.get("filename", ""))
            address, port, connected = parse_chardev_filename(filename)
            links.append(
                QemuLink(
                    inst.name,
                    label,
                    address,
                    port,
                    connected,
                    c.get("frontend-open"),
                    filename,
                )
            )
    return links, errors


def probe(
    address: str, port: int, creds: Creds | None, *, host: str = "?", timeout: float = 3.0
) -> Probe:
    """Reach one export endpoint: TCP, mutual TLS, then ask for its state."""
    from vmplug.remote.export import PROBE  # noqa: PLC0415
    from vmplug.wire.tls import client_context, describe_tls_error  # noqa: PLC0415

    out = Probe(host, address, port)
    t0 = time.monotonic()
    try:
        raw = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            why = f"no answer in {timeout:g} s"
        out.error = f"cannot reach {address}:{port}: {why}"
        out.fix = (
            f"is the device host up and is vmplug run exporting there? from here: "
            f"nc -vz {address} {port}; on the device host: ss -ltn 'sport = {port}'"
        )
        return out
    out.connect_ms = (time.monotonic() - t0) * 1000
    try:
        if creds is None:
            out.error = "no certificates for this device host here ([host.NAME] certs)"
            out.fix = "give the [host.NAME] table certs = DIR (vmplug's CA and this host's files)"
            return out
        try:
            ctx = client_context(creds.ca, creds.cert, creds.key)
        except Exception as exc:  # unreadable files: the certs check says which
            out.error = f"cannot load this host's certificates: {exc}"
            return out
        t1 = time.monotonic()
        try:
            tls = ctx.wrap_socket(raw, server_hostname=address)
        except (ssl.SSLError, OSError) as exc:
            out.error = f"TLS handshake with {address}:{port} failed: {describe_tls_error(exc)}"
            out.fix = (
                f"the device host's certificate must be signed by this host's CA and carry "
                f"{address}: " + issue_fix(host, "DIR", address)
            )
            return out
        raw = tls
        out.handshake_ms = (time.monotonic() - t1) * 1000
        try:
            tls.sendall(PROBE)
            data = b""
            while not data.endswith(b"\n") and len(data) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ssl.SSLError, OSError) as exc:
            out.error = f"the device host refused this host: {describe_tls_error(exc)}"
            out.fix = (
                f"this host's certificate ({creds.cert}) must be signed by the device host's "
                f"CA, and its name {creds.name!r} in the device host's [export] allow"
            )
            return out
        if not data:
            out.error = (
                "the device host hung up after the handshake: this host's name "
                f"{creds.name!r} is not allowed there, or it is not a vmplug endpoint"
            )
            out.fix = f"add {creds.name!r} to the device host's [export] allow"
            return out
        try:
            status = json.loads(data)
        except ValueError:
            out.error = f"not a vmplug endpoint (it answered {data[:40]!r})"
            return out
        out.status = status if isinstance(status, dict) else None
        return out
    finally:
        raw.close()


def gather(ctx: DoctorContext) -> NetworkScan:
    scan = NetworkScan(creds=_creds(ctx))
    cfg = ctx.config
    hosts = list(cfg.hosts.values()) if cfg is not None else []
    try:
        scan.links, scan.qemu_errors = qemu_links(ctx)
    except Exception as exc:  # no QEMU to read: the other checks still run
        scan.qemu_errors = [f"{type(exc).__name__}: {exc}"]
    targets: dict[tuple[str, int], str] = {}
    for host in hosts:
        for port in host.devices.values():
            targets.setdefault((host.address, port), host.name)
    for link in scan.links:
        if link.address is not None and link.port is not None:
            owner = next((h.name for h in hosts if h.address == link.address), "?")
            targets.setdefault((link.address, link.port), owner)
    by_role = {c.role: c for c in scan.creds}
    for (address, port), name in sorted(targets.items()):
        creds = by_role.get(f"[host.{name}]")
        scan.probes.append(probe(address, port, creds, host=name, timeout=ctx.timeout))
    return scan


# ------------------------------------------------------------------ checks


def check_certs(ctx: DoctorContext) -> Iterator[Finding]:
    """Each end's certificate and key: valid, signed by the CA, not expiring soon."""
    from cryptography import x509  # noqa: PLC0415

    from vmplug.remote.certs import CertError, HostFiles, check  # noqa: PLC0415

    for c in ctx.network.creds:
        subject = f"{c.role} {c.name}"
        try:
            info = check(HostFiles(c.ca, c.cert, c.key), name=c.name)
        except (CertError, OSError, ValueError) as exc:
            yield Finding(
                LAYER,
                "network.certs",
                Severity.ERROR,
                f"{subject}: certificates unusable: {exc}",
                evidence=(f"ca {c.ca}", f"cert {c.cert}", f"key {c.key}"),
                fix=issue_fix(c.name, c.cert.parent),
                subject=subject,
            )
            continue
        evidence = (
            f"{c.cert}: {info.subject}, names {', '.join(info.names)}",
            f"valid {info.not_before:%Y-%m-%d} .. {info.not_after:%Y-%m-%d} "
            f"({info.days_left:.0f} days left)",
        )
        problems = list(info.problems)
        warnings = list(info.warnings)
        try:
            ca = x509.load_pem_x509_certificate(c.ca.read_bytes())
            ca_left = (ca.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
            if 0 <= ca_left < EXPIRY_WARN_DAYS:
                warnings.append(f"the CA {c.ca} expires in {ca_left} days")
        except (OSError, ValueError):
            problems.append(f"CA certificate {c.ca} unreadable")
        if problems:
            yield Finding(
                LAYER,
                "network.certs",
                Severity.ERROR,
                f"{subject}: " + "; ".join(problems),
                evidence=evidence,
                fix=issue_fix(c.name, c.cert.parent),
                subject=subject,
            )
        elif warnings:
            yield Finding(
                LAYER,
                "network.certs",
                Severity.WARNING,
                f"{subject}: " + "; ".join(warnings),
                evidence=evidence,
                fix="renew it before it expires: " + issue_fix(c.name, c.cert.parent),
                subject=subject,
            )
        else:
            yield Finding(
                LAYER,
                "network.certs",
                Severity.OK,
                f"{subject}: certificate valid for {info.days_left:.0f} more days",
                evidence=evidence,
                subject=subject,
            )


def check_reach(ctx: DoctorContext) -> Iterator[Finding]:
    """Every remote endpoint answers over mutual TLS."""
    for p in ctx.network.probes:
        subject = f"{p.host} {p.address}:{p.port}"
        if p.error is not None:
            yield Finding(
                LAYER,
                "network.reach",
                Severity.ERROR,
                f"device host {p.host}: {p.error}",
                evidence=(f"probe of {p.address}:{p.port}",),
                fix=p.fix,
                subject=subject,
            )
            continue
        name = (p.status or {}).get("name", "?")
        yield Finding(
            LAYER,
            "network.reach",
            Severity.OK,
            f"device host {p.host}: {p.address}:{p.port} ({name}) answers over mutual TLS",
            evidence=(f"TCP connect {p.connect_ms:.1f} ms, TLS handshake {p.handshake_ms:.1f} ms",),
            subject=subject,
        )


def check_stream(ctx: DoctorContext) -> Iterator[Finding]:
    """QEMU's side of each link against the device host's side."""
    scan = ctx.network
    for err in scan.qemu_errors:
        yield Finding(
            LAYER,
            "network.stream",
            Severity.WARNING,
            f"could not read QEMU's chardevs: {err}",
            subject=err.split(":", 1)[0],
        )
    for link in scan.links:
        subject = f"{link.vm} {link.label.removesuffix('-chr')}"
        p = scan.probe_for(link.address, link.port)
        st = p.status if p is not None else None
        qemu_says = (
            f"QEMU {link.vm}: chardev {link.label} {link.filename!r}, "
            f"frontend-open {link.frontend_open}"
        )
        evidence: tuple[str, ...] = (qemu_says,)
        if st is not None:
            evidence += (f"device host: {json.dumps(st, sort_keys=True)}",)
        me = st.get("you") if st else None
        holder = st.get("holder") if st else None
        if st is None:
            sev = Severity.ERROR if not link.connected else Severity.WARNING
            yield Finding(
                LAYER,
                "network.stream",
                sev,
                f"{subject}: QEMU is {'connected' if link.connected else 'not connected'}; "
                "the device host could not be asked (see network.reach)",
                evidence=evidence,
                subject=subject,
            )
        elif link.connected and holder == me and st.get("streaming"):
            yield Finding(
                LAYER,
                "network.stream",
                Severity.OK,
                f"{subject}: streaming ({st.get('name')} held by {me})",
                evidence=evidence,
                subject=subject,
            )
        elif link.connected and holder != me:
            yield Finding(
                LAYER,
                "network.stream",
                Severity.WARNING,
                f"{subject}: half-open link: QEMU holds a connection the device host has "
                f"let go (holder now {holder or 'nobody'})",
                evidence=evidence,
                fix="it ends by itself when the device host's FIN arrives; if it stays, "
                f"vmplug detach then attach {link.label.removesuffix('-chr')}",
                subject=subject,
            )
        elif holder is not None and holder != me:
            yield Finding(
                LAYER,
                "network.stream",
                Severity.ERROR,
                f"{subject}: the device is held by another VM host, {holder} (first come wins)",
                evidence=evidence,
                fix=f"detach it on {holder}, or route it to one VM host only",
                subject=subject,
            )
        elif st.get("present") is False:
            yield Finding(
                LAYER,
                "network.stream",
                Severity.WARNING,
                f"{subject}: the device is not plugged in on the device host",
                evidence=evidence,
                fix="plug it in: QEMU's reconnect streams it as soon as it is there",
                subject=subject,
            )
        else:
            last = st.get("last_refusal")
            yield Finding(
                LAYER,
                "network.stream",
                Severity.ERROR,
                f"{subject}: not streaming"
                + (f"; the device host last refused a link: {last}" if last else ""),
                evidence=evidence,
                subject=subject,
            )


def check_quality(ctx: DoctorContext) -> Iterator[Finding]:
    """Round-trip time and drops of each link."""
    for p in ctx.network.probes:
        st = p.status
        if st is None or p.connect_ms is None:
            continue
        subject = f"{p.host} {p.address}:{p.port}"
        rtt = st.get("rtt_ms") if st.get("streaming") else None
        rtt_ms = float(rtt) if isinstance(rtt, int | float) else p.connect_ms
        source = "the streaming link's kernel RTT" if rtt is not None else "TCP connect"
        dead = int(st.get("dead_links") or 0)
        retrans = int(st.get("retransmits") or 0)
        evidence = (
            f"RTT {rtt_ms:.1f} ms ({source}); retransmitted segments {retrans}; "
            f"links dropped by a silent network {dead}",
        )
        if dead:
            when = st.get("last_dead_at")
            at = (
                dt.datetime.fromtimestamp(float(when), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                if isinstance(when, int | float)
                else "?"
            )
            yield Finding(
                LAYER,
                "network.quality",
                Severity.WARNING,
                f"{subject}: the link was dropped {dead} time(s) by a network cut "
                f"(last {at}; no packet for {st.get('link_timeout')} s)",
                evidence=evidence,
                fix="check the network between the hosts (cable, Wi-Fi, firewall idle timeouts)",
                subject=subject,
            )
        elif rtt_ms > RTT_WARN_MS:
            yield Finding(
                LAYER,
                "network.quality",
                Severity.WARNING,
                f"{subject}: round-trip time {rtt_ms:.0f} ms (> {RTT_WARN_MS:g} ms): "
                "isochronous audio will drop out",
                evidence=evidence,
                fix="use a wired link; keep audio interfaces on the VM's own host",
                subject=subject,
            )
        else:
            yield Finding(
                LAYER,
                "network.quality",
                Severity.OK,
                f"{subject}: round-trip time {rtt_ms:.1f} ms, no drops",
                evidence=evidence,
                subject=subject,
            )


def _loopback(address: str) -> bool:
    import ipaddress  # noqa: PLC0415

    if address in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_container_network(ctx: DoctorContext) -> Iterator[Finding]:
    """A container VM's QEMU (dockurr/windows) dials the device host itself.

    In connect mode nothing needs publishing (``ports:``): Docker's and
    Podman's default bridge network NATs the container's outbound TCP to the
    LAN.  But the container's 127.0.0.1 is its own: a device host reached on
    the VM host's loopback (an SSH tunnel, a device host on the same
    machine) needs ``network_mode: host``.  QEMU opens the TLS folder
    itself, so it must be bind-mounted (read-only) at the path QEMU is given."""
    cfg = ctx.config
    if cfg is None or not cfg.hosts:
        return
    containers = [vm for vm in cfg.vms.values() if vm.container]
    for vm in containers:
        for host in cfg.hosts.values():
            subject = f"{vm.name} -> {host.name}"
            if _loopback(host.address):
                yield Finding(
                    LAYER,
                    "network.container",
                    Severity.ERROR,
                    f"{subject}: QEMU runs in container {vm.container}, whose "
                    f"{host.address} is the container's own loopback, not this host's",
                    evidence=(f"[host.{host.name}] address = {host.address!r}",),
                    fix=f"network_mode: host for {vm.container} (compose), or give "
                    f"[host.{host.name}] the device host's LAN address",
                    subject=subject,
                )
            else:
                yield Finding(
                    LAYER,
                    "network.container",
                    Severity.INFO,
                    f"{subject}: QEMU in container {vm.container} dials "
                    f"{host.address} itself (outbound TCP; the default bridge network "
                    "does, nothing to publish)",
                    evidence=(f"[host.{host.name}] address = {host.address!r}",),
                    fix=f"bind-mount the TLS folder into {vm.container} read-only at the "
                    "path vmplug gives QEMU, e.g. volumes: - /etc/vmplug/qemu-tls:"
                    "/etc/vmplug/qemu-tls:ro",
                    subject=subject,
                )


CHECKS = [
    CheckSpec(
        LAYER, "network.certs", check_certs, "remote-link certificates valid and not expiring"
    ),
    CheckSpec(LAYER, "network.reach", check_reach, "device hosts answer over mutual TLS"),
    CheckSpec(LAYER, "network.stream", check_stream, "QEMU's and the device host's view agree"),
    CheckSpec(LAYER, "network.quality", check_quality, "round-trip time and drops"),
    CheckSpec(LAYER, "network.container", check_container_network, "container QEMU's network"),
]

__all__ = [
    "CHECKS",
    "Creds",
    "NetworkScan",
    "Probe",
    "QemuLink",
    "gather",
    "parse_chardev_filename",
    "probe",
]
