"""A device host's export side as one process (``vmplug run`` with an
``[export]`` section starts the same endpoints itself, see
:mod:`vmplug.remote.devicehost`; this stays for the pinned form alone)::

    python -m vmplug.remote.serve --certs DIR --name devhost --allow vmhost \\
        --listen 0.0.0.0 --device kbd=2-1:7101 --device stick=3-2:7102

``DIR`` holds ``ca-cert.pem``, ``NAME-cert.pem`` and ``NAME-key.pem``
(:func:`vmplug.remote.certs.issue`).  Each ``--device NAME=PORTPATH:TCPPORT``
exports the device in sysfs port ``PORTPATH`` on ``TCPPORT``.  ``--insecure``
drops TLS (lab networks only).  ``--link-timeout S`` (default 10): a link
whose VM host sends nothing (not even a keepalive answer) for S seconds is
cut (see :mod:`vmplug.remote.export`).  With ``--status FILE`` the endpoints' state
is written there as JSON whenever it changes.  SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from vmplug.config import ExportConfig
from vmplug.errors import UsageError, VmplugError
from vmplug.remote.certs import CA_CERT, HostFiles, check
from vmplug.remote.devicehost import export_tls
from vmplug.remote.export import ExportEndpoint, Exporter, SysfsLocator, UsbredirectSource
from vmplug.wire.tls import server_context

log = logging.getLogger("vmplug.remote.serve")


def _device(text: str) -> tuple[str, str, int]:
    name, sep, rest = text.partition("=")
    port_path, sep2, tcp = rest.rpartition(":")
    if not sep or not sep2 or not name or not tcp.isdigit() or not 0 < int(tcp) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PORTPATH:TCPPORT (kbd=2-1:7101)")
    return name, port_path, int(tcp)


def build(args: argparse.Namespace) -> Exporter:
    tls = None
    if not args.insecure:
        if args.certs is None:
            raise UsageError("--certs DIR is needed (or --insecure, for lab networks only)")
        certs_dir = Path(args.certs)
        files = HostFiles(
            certs_dir / CA_CERT,
            certs_dir / f"{args.name}-cert.pem",
            certs_dir / f"{args.name}-key.pem",
        )
        info = check(files)
        if info.problems:
            raise UsageError("; ".join(info.problems))
        for warning in info.warnings:
            log.warning("%s", warning)
        tls = server_context(files.ca, files.cert, files.key)
    allow = frozenset(args.allow) if args.allow else None
    endpoints = [
        ExportEndpoint(
            name,
            UsbredirectSource(SysfsLocator(port_path, sysfs=Path(args.sysfs))),
            host=args.listen,
            port=port,
            tls=tls,
            allow=allow,
            insecure=args.insecure,
            link_timeout=args.link_timeout,
        )
        for name, port_path, port in args.device
    ]
    return Exporter(endpoints)


def exporter_from_config(export: ExportConfig, *, sysfs: Path = Path("/sys")) -> Exporter:
    """The endpoints of a config's ``[export]`` section (what ``vmplug run`` starts)."""
    tls = export_tls(export)
    return Exporter(
        [
            ExportEndpoint(
                dev.name,
                UsbredirectSource(
                    SysfsLocator(dev.port_path, vendor=dev.vendor, product=dev.product, sysfs=sysfs)
                ),
                host=export.listen,
                port=dev.port,
                tls=tls,
                allow=frozenset(export.allow) or None,
                insecure=export.insecure,
            )
            for dev in export.devices
        ]
    )


async def _serve(exporter: Exporter, status: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await exporter.start()

    def write_status() -> None:
        if status is not None:
            tmp = status.with_name(status.name + ".tmp")
            tmp.write_text(json.dumps(exporter.to_json()))
            tmp.replace(status)

    try:
        write_status()
        while not stop.is_set():
            changes = [asyncio.ensure_future(ep.changed.wait()) for ep in exporter.endpoints]
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([*changes, stopper], return_when=asyncio.FIRST_COMPLETED)
            for fut in [*changes, stopper]:
                fut.cancel()
            write_status()
    finally:
        await exporter.stop()
        with contextlib.suppress(OSError):
            write_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmplug.remote.serve", description=__doc__)
    parser.add_argument("--certs", help="directory with ca-cert.pem, NAME-cert.pem, NAME-key.pem")
    parser.add_argument("--name", default="devhost", help="this device host's name")
    parser.add_argument("--allow", action="append", help="a VM host name that may connect")
    parser.add_argument("--listen", default="0.0.0.0")  # noqa: S104 (a device host serves its LAN)
    parser.add_argument("--device", action="append", type=_device, required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--sysfs", default="/sys")
    parser.add_argument("--status", type=Path)
    parser.add_argument(
        "--link-timeout",
        type=float,
        default=10.0,
        help="seconds without a packet from the VM host before a link counts as cut (1..3600)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        exporter = build(args)
        asyncio.run(_serve(exporter, args.status))
    except UsageError as exc:
        print(f"vmplug: {exc.render()}", file=sys.stderr)
        return 2
    except VmplugError as exc:
        print(f"vmplug: {exc.render()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
