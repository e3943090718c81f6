"""``vmplug health``: per-device health figures from the daemon's history."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmplug.cli.app import EPILOG_ENV, Context, emit_json, escape, pass_ctx
from vmplug.cli.daemon import daemon_settings, daemon_socket
from vmplug.errors import UsageError, VmplugError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` -> seconds (more than 0)."""
    m = _DURATION.match(text.lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--window {text!r}: expected a duration such as 3600, 15m, 24h or 7d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (local time unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(
            f"--until {text!r}: expected unix seconds or a date such as 2026-01-31T12:00"
        ) from None


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _database(obj: Context, explicit: str | None) -> Path:
    return Path(explicit) if explicit else Path(daemon_settings(obj, warn=False).database)


def _resolve(device: str, present: list[Any], known: list[dict[str, Any]]) -> str:
    """A stable identity for DEVICE: a present device, else one the history knows."""
    from vmplug.errors import SelectorError  # noqa: PLC0415
    from vmplug.host.select import select_one  # noqa: PLC0415

    if "/" in device or any(k["identity"] == device for k in known):
        return device
    try:
        return select_one(present, device).identity
    except SelectorError:
        pass
    hits = [
        k["identity"]
        for k in known
        if device in (k.get("port"), k.get("vidpid"), k.get("serial"), k.get("qemu_id"))
    ]
    if len(hits) == 1:
        return str(hits[0])
    if not hits:
        raise VmplugError(f"no device {device!r} present or in the history")
    raise SelectorError(
        f"{device!r} names {len(hits)} devices in the history; give an identity", tuple(hits)
    )


@click.command("health", epilog=EPILOG_ENV)
@click.argument("device", required=False)
@click.option(
    "--db", "db_path", metavar="PATH", help="History database (default: [daemon] database)."
)
@click.option(
    "--window",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help="How far back: seconds, or 15m, 24h, 7d, 2w.",
)
@click.option(
    "--until",
    "until",
    metavar="TIME",
    help="End of the window: unix seconds or ISO date/time (default: now).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def health(
    obj: Context,
    device: str | None,
    db_path: str | None,
    window: str,
    until: str | None,
    as_json: bool,
) -> None:
    """How well each device has been kept in its VM, from the daemon's history.

    For every device the history names (or only DEVICE: a port path, vid:pid
    or serial of a present device, a port or vid:pid it had, or its stable
    identity), over the window ending now (or at --until):

    \b
      UPTIME    share of the time the device was meant to be in a VM (it is
                present, its rules name a VM, that VM runs, the daemon runs)
                that it was attached to that VM
      FAILURES  times it fell out while up: unplugged, lost by the VM, or
                detached/moved by hand (not: VM stopped, rules changed)
      MTBF      meant-to-be-attached time / failures
      RECOVERY  median and worst time from the moment it could be attached
                again (replugged, VM back after a restart) to attached;
                the time it stayed unplugged or the VM was down is not
                counted, it is no fault of vmplug's
      ERRORS/H  failed attach/detach attempts per hour of the window

    Reads the database directly (no daemon needed); a user who cannot read
    it (a member of the [api] group) gets the figures from the running
    daemon instead.

    \b
    Examples:
      vmplug health                     every device, last 7 days
      vmplug health 2-2.4.2 --window 24h
      vmplug health 046d:c52b --json
    """
    from vmplug.history.health import health_by_device, health_rows  # noqa: PLC0415
    from vmplug.history.store import Store  # noqa: PLC0415

    span = parse_duration(window)
    end = parse_time(until) if until else dt.datetime.now().timestamp()
    start = end - span
    db = _database(obj, db_path)
    if not db_path and not until and not os.access(db, os.R_OK):
        # a member of the [api] group: the running daemon reads the database for us
        rows = _from_daemon(obj, device, span)
        if rows is not None:
            _print(obj, rows, as_json, window, start)
            return
    try:
        exists = db.exists()
    except PermissionError:
        exists = None
    if exists is None or (exists and not os.access(db, os.R_OK)):
        raise VmplugError(
            f"cannot read the history database {db} and no daemon answers "
            "(run as root, or join the [api] group while the daemon runs)"
        )
    if not exists:
        raise VmplugError(f"no history database at {db} (has the daemon run? --db PATH)")
    store = Store(db, readonly=not os.access(db, os.W_OK))
    try:
        present = obj.devices(include_root_hubs=False)
        identity = _resolve(device, present, store.known_devices()) if device else None
        entries = store.history(identity, limit=None)  # with the global entries
        figures = health_by_device(entries, start, end, [identity] if identity else None)
        rows = health_rows(figures, store, present)
    finally:
        store.close()
    _print(obj, rows, as_json, window, start)


def _from_daemon(obj: Context, device: str | None, span: float) -> list[dict[str, Any]] | None:
    """The figures from the daemon's API; ``None`` when no daemon answers."""
    from urllib.parse import urlencode  # noqa: PLC0415

    from vmplug.api.client import call, daemon_running  # noqa: PLC0415

    sock = daemon_socket(None, daemon_settings(obj, warn=False))
    if not daemon_running(sock):
        return None
    query = {"window": f"{span:g}", **({"device": device} if device else {})}
    rows: list[dict[str, Any]] = call(sock, "GET", f"/v1/health?{urlencode(query)}")
    return rows


def _print(
    obj: Context, rows: list[dict[str, Any]], as_json: bool, window: str, start: float
) -> None:
    if as_json:
        emit_json(rows)
        return
    if not rows:
        obj.err.print("the history names no device in this window")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PORT", "DEVICE", "UPTIME", "FAILURES", "MTBF", "MEDIAN REC", "WORST REC", "ERR/H"):
        table.add_column(col, overflow="fold")
    for r in rows:
        uptime = "-" if r["uptime"] is None else f"{r['uptime'] * 100:.2f}%"
        eph = "-" if r["errors_per_hour"] is None else f"{r['errors_per_hour']:.3g}"
        table.add_row(
            escape(r["port"] or "-") + ("" if r["present"] else " (gone)"),
            escape(r["name"] or r["identity"], 200),
            uptime,
            str(r["failures"]),
            _fmt_s(r["mtbf_s"]),
            _fmt_s(r["median_recovery_s"]),
            _fmt_s(r["worst_recovery_s"]),
            eph,
        )
    obj.console.print(table)
    when = dt.datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M")
    obj.console.print(f"window: {escape(window)} from {when}")
