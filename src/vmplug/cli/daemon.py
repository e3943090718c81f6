"""The daemon and its clients: ``vmplug run``, ``status``, ``history``, ``attach``,
``detach`` and ``reload``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from vmplug.api.client import ApiError, call, daemon_running
from vmplug.cli.app import EPILOG_ENV, Context, emit_json, escape, pass_ctx
from vmplug.config import ConfigError, DaemonConfig, config_path, load_config
from vmplug.errors import UsageError, VmplugError
from vmplug.host.select import describe, select_one
from vmplug.model import UsbDevice
from vmplug.textsafe import printable, printable_lines

SOCKET_HELP = "Daemon API socket (default: [daemon] socket in the config, /run/vmplug/vmplug.sock)."


def markup_escape(text: str) -> str:
    """Rich's markup escape, Rich imported only here: ``vmplug run`` never
    loads it (issue 16: ~200 files, start-up and RSS)."""
    from rich.markup import escape as rich_escape  # noqa: PLC0415

    return rich_escape(text)


class ReloadRefused(UsageError):
    """The daemon refused a config: bad input (exit status 2), like any bad config."""

    def __init__(self, message: str, refused: str) -> None:
        super().__init__(message)
        #: the daemon's own words: file:line:col, the error, a caret
        self.refused = refused


def daemon_socket(explicit: str | None, daemon: DaemonConfig) -> Path:
    """The daemon's API socket: ``--socket``, else ``VMPLUG_SOCKET``, else ``[daemon] socket``."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("VMPLUG_SOCKET"):
        return Path(env)
    return Path(daemon.socket)


def daemon_settings(obj: Context, *, warn: bool = True) -> DaemonConfig:
    """The ``[daemon]`` settings, even from a config with errors elsewhere.

    ``status``, ``history`` and ``reload`` must work while the file is being
    edited: the daemon keeps running the config it loaded, and these commands
    only need to know where its socket and database are.
    """
    path = config_path(obj.config)
    if not path.exists():
        return DaemonConfig()
    try:
        return load_config(path).daemon
    except ConfigError as exc:
        if warn:
            obj.err.print(
                f"warning: {markup_escape(printable_lines(exc.render()))}\n"
                "(a running daemon keeps the config it loaded)"
            )
    defaults = DaemonConfig()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("daemon", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return defaults
    if not isinstance(table, dict):
        return defaults
    socket, database = table.get("socket"), table.get("database")
    return DaemonConfig(
        socket=socket if isinstance(socket, str) and socket else defaults.socket,
        database=database if isinstance(database, str) and database else defaults.database,
    )


#: How much of one argument of a log message is shown (a device's string, a path, an error).
LOG_ARG_LIMIT = 300


def safe_message(record: logging.LogRecord) -> str:
    """A record's message as one line: every ``str`` argument through
    :func:`~vmplug.textsafe.printable` (cut at :data:`LOG_ARG_LIMIT`), then the
    whole message, so that nothing a device or a client chose (a newline, an
    escape sequence) can forge another log line or recolour a terminal."""
    args = record.args
    if isinstance(args, tuple):
        args = tuple(printable(a, LOG_ARG_LIMIT) if isinstance(a, str) else a for a in args)
    elif isinstance(args, dict):
        args = {
            k: printable(v, LOG_ARG_LIMIT) if isinstance(v, str) else v for k, v in args.items()
        }
    msg = str(record.msg)
    if args:
        try:
            msg = msg % args
        except (TypeError, ValueError, KeyError):
            msg = record.getMessage()  # let logging's own handling say what is wrong
    return printable(msg, None, backslash=False)


class _JournalFormatter(logging.Formatter):
    """``<N>message`` lines that journald turns into priorities; plain text on a tty.

    One record is one line (:func:`safe_message`); a traceback, which only
    vmplug's own code raises, follows it on lines of its own."""

    PRIORITY = {  # noqa: RUF012
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self, journal: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = safe_message(record), None
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{safe.msg}"
        return super().format(safe)


class _MessageFormatter(logging.Formatter):
    """journald's ``MESSAGE=``: the one safe line, then a traceback if any (the
    native protocol carries newlines; the other fields are the record's own)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = safe_message(record)
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def setup_logging(level: str) -> None:
    """Structured records to journald when stderr really is the journal's stream
    (``$JOURNAL_STREAM`` names fd 2's dev:ino), else plain lines on stderr."""
    from vmplug.wire.systemd import JournalHandler, journal_is_stderr  # noqa: PLC0415

    stream = logging.StreamHandler(sys.stderr)
    handler: logging.Handler = stream
    if journal_is_stderr():
        # a record journald refuses still reaches it through the stream, as <N>line
        stream.setFormatter(_JournalFormatter(journal=True))
        handler = JournalHandler(fallback=stream.handle)
        handler.setFormatter(_MessageFormatter())
    else:
        stream.setFormatter(_JournalFormatter(journal=False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("qemu").setLevel(logging.WARNING)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------
# vmplug run


@click.command("run", epilog=EPILOG_ENV)
@click.option("--socket", "socket_path", metavar="PATH", help=SOCKET_HELP)
@click.option(
    "--db", "db_path", metavar="PATH", help="History database (default: [daemon] database)."
)
@click.option(
    "--events",
    default="auto",
    show_default=True,
    metavar="SOURCE",
    help="auto (udev if udevd runs, else kernel), kernel, udev, or replay:PATH (recorded events).",
)
@click.option("--detach-on-exit", is_flag=True, help="Detach vmplug's devices when stopping.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@pass_ctx
def run_cmd(
    obj: Context,
    socket_path: str | None,
    db_path: str | None,
    events: str,
    detach_on_exit: bool,
    log_level: str,
) -> None:
    """Keep every device in the VM its rules name, now and always.

    The daemon reads the config (--config), rescans the USB tree, connects to
    every VM's QMP socket, attaches what the rules ask for, and from then on
    follows uevents: a device that is plugged in, replugged (new device
    number), or whose VM restarts is attached again; an unplugged device is
    detached.  Failed actions are retried with backoff until the VM holds
    what the rules say.

    \b
    Signals: SIGHUP re-reads the config (an invalid one is refused and the
    running one stays); SIGTERM/SIGINT stop cleanly, leaving attached
    devices attached unless --detach-on-exit.
    """
    from vmplug.api.limits import Limits  # noqa: PLC0415
    from vmplug.api.server import Api  # noqa: PLC0415
    from vmplug.daemon.notify import ServiceNotifier  # noqa: PLC0415
    from vmplug.daemon.reconciler import Daemon  # noqa: PLC0415
    from vmplug.history.store import Store  # noqa: PLC0415
    from vmplug.host.events import make_source  # noqa: PLC0415
    from vmplug.wire.systemd import Notifier  # noqa: PLC0415

    setup_logging(log_level)
    path = config_path(obj.config)
    config = load_config(path)
    sock = daemon_socket(socket_path, config.daemon)
    if daemon_running(sock):
        raise VmplugError(f"a vmplug daemon already answers on {sock}")
    db = Path(db_path or config.daemon.database)
    try:
        store = Store(db)
    except OSError as exc:
        raise VmplugError(f"cannot open the history database {db}: {exc}") from None
    daemon = Daemon(
        config,
        sysfs_root=obj.sysfs_root,
        source=make_source(events),
        store=store,
        detach_on_exit=detach_on_exit,
        config_path=path,
    )
    exporter = _remote_sides(daemon, config, obj.sysfs_root, db)

    async def main() -> None:
        # READY=1 after the first pass, WATCHDOG=1, STATUS=, RELOADING=1, STOPPING=1
        service = ServiceNotifier(daemon, Notifier.from_env())
        service.install()
        # /metrics is for Prometheus, which scrapes [api] listen: without that
        # listener no registry is kept (prometheus_client stays unloaded)
        api = Api(daemon, metrics=bool(config.api.listen), limits=Limits.from_config(config.api))
        api.exporter = exporter
        if config.api.listen:
            # aiohttp (~0.3 s of imports) before the unix socket appears: clients
            # (and tests) take the socket as "up" and then reach for the TCP port
            import vmplug.api.aioweb  # noqa: F401, PLC0415
        try:
            await api.start_unix(sock, group=config.api.group)
        except OSError as exc:
            raise VmplugError(f"cannot listen on {sock}: {exc.strerror or exc}") from None
        logging.getLogger("vmplug").info("API on %s", sock)
        try:
            if exporter is not None:
                api.export_allow = frozenset(exporter.export.allow)
                daemon.listeners.append(exporter.on_journal)
                await exporter.start()
            if config.api.listen:
                await _start_tcp(api, config, exporter)
            await daemon.run_forever()
        finally:
            await service.close()
            await api.stop()
            if exporter is not None:
                await exporter.stop()
            sock.unlink(missing_ok=True)

    try:
        asyncio.run(main())
    finally:
        store.close()


def _remote_sides(daemon: Any, config: Any, sysfs_root: Path, db: Path) -> Any:
    """A VM host's device hosts (``[host.NAME]``: a second device source) and a
    device host's export side (``[export]``, returned; None when there is none)."""
    if config.hosts:
        from vmplug.remote.inventory import RemoteInventory  # noqa: PLC0415

        def journal(kind: Any, detail: dict[str, Any], identity: str | None) -> None:
            daemon.journal.event(kind, identity=identity, detail=detail)

        daemon.sources.append(
            RemoteInventory(
                config.hosts,
                tls_root=db.parent / "tls",
                on_change=daemon.devices_changed,
                journal=journal,
            )
        )
    if config.export is None:
        return None
    from vmplug.remote.devicehost import DeviceHostExport  # noqa: PLC0415

    # a lambda: a rescan replaces daemon.inventory
    devices = lambda: daemon.inventory.values()  # noqa: E731, PLW0108
    return DeviceHostExport(config.export, devices, sysfs=sysfs_root)


async def _start_tcp(api: Any, config: Any, exporter: Any = None) -> None:
    """The TCP listener of ``[api] listen``, with its bearer token: on loopback,
    or on a device host (``[export]``) anywhere, taking mutual TLS."""
    from vmplug.api.security import load_or_create_token  # noqa: PLC0415

    assert config.api.listen is not None
    token_file = Path(config.api.token_file or Path(config.daemon.database).parent / "api-token")
    token = load_or_create_token(token_file)
    tls = None if exporter is None else exporter.tls
    try:
        port = await api.start_tcp(config.api.listen, token, tls=tls, anywhere=exporter is not None)
    except OSError as exc:
        raise VmplugError(f"cannot listen on {config.api.listen}: {exc.strerror or exc}") from None
    host = config.api.listen.rpartition(":")[0]
    scheme = "https (mutual TLS)" if tls is not None else "http"
    logging.getLogger("vmplug").info(
        "API and web page on %s://%s:%d/ (token in %s)", scheme, host, port, token_file
    )


# ---------------------------------------------------------------------------
# vmplug status


@click.command("status", epilog=EPILOG_ENV)
@click.option("--socket", "socket_path", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status_cmd(obj: Context, socket_path: str | None, as_json: bool) -> None:
    """Show the daemon, its VMs and their connections, and every attachment.

    Exit status 1 when no daemon runs (the message says so).
    """
    sock = daemon_socket(socket_path, daemon_settings(obj))
    if not daemon_running(sock):
        if as_json:
            emit_json({"daemon": None, "socket": str(sock)})
        else:
            obj.err.print(f"no vmplug daemon answers on {escape(str(sock))} (start: vmplug run)")
        raise SystemExit(1)
    data = call(sock, "GET", "/v1/status")
    if as_json:
        emit_json(data)
        return
    d = data["daemon"]
    obj.console.print(
        f"daemon pid {d['pid']}, up {d['uptime_s']:.0f}s, {d['devices']} devices, "
        f"{escape(d['events'], None)}, config {escape(d['config'], None)}"
    )
    from rich.table import Table  # noqa: PLC0415 - see markup_escape

    vms = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    for col in ("VM", "CONNECTED", "STATE", "WHERE", "DEVICES"):
        vms.add_column(col)
    for name, vm in data["vms"].items():
        vms.add_row(
            escape(name),
            "yes" if vm["connected"] else "[red]no[/]",
            escape(vm["state"] or "-"),
            escape(vm.get("where") or vm["qmp"] or "-", None),
            str(len(vm["devices"])),
        )
    obj.console.print(vms)
    atts = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PORT", "DEVICE", "VM", "QEMU ID", "STATE", "ERROR"):
        atts.add_column(col, overflow="fold")
    for a in data["attachments"]:
        atts.add_row(
            escape(a["port"]),
            escape(a["identity"], 200),
            escape(a["vm"]),
            escape(a["qemu_id"]),
            escape(a["state"]),
            escape(a["error"] or "", LOG_ARG_LIMIT),
        )
    for h in data.get("held", []):  # remote devices another VM host holds
        atts.add_row(
            escape(f"{h['host']}:?"),
            escape(h["identity"], 200),
            escape(h["vm"]),
            "-",
            "held",
            escape(f"held by {h['holder']}"),
        )
    obj.console.print(atts)
    hosts = data.get("remote_hosts", [])
    if hosts:
        remote = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("DEVICE HOST", "ADDRESS", "STATE", "DEVICES", "RTT", "ERROR"):
            remote.add_column(col, overflow="fold")
        for h in hosts:
            rtt = h.get("rtt_ms")
            remote.add_row(
                escape(h["name"]),
                escape(f"{h['address']}:{h['api_port']}"),
                "up" if h["state"] == "up" else f"[red]{escape(h['state'])}[/]",
                str(h["devices"]),
                "-" if rtt is None else f"{rtt:.1f} ms",
                escape(h.get("error") or "", LOG_ARG_LIMIT),
            )
        obj.console.print(remote)


# ---------------------------------------------------------------------------
# vmplug history


@click.command("history", epilog=EPILOG_ENV)
@click.argument("device", required=False)
@click.option(
    "--db", "db_path", metavar="PATH", help="History database (default: [daemon] database)."
)
@click.option("-n", "--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def history_cmd(
    obj: Context, device: str | None, db_path: str | None, limit: int, as_json: bool
) -> None:
    """Show what happened: events and actions, newest last.

    DEVICE (port path, vid:pid or serial of a present device, or a stable
    identity such as 1235:821a/serial=X) limits it to one device.  Reads the
    database directly: no daemon needed.
    """
    from vmplug.history.store import Store  # noqa: PLC0415

    db = Path(db_path or daemon_settings(obj).database)
    if not db.exists():
        raise VmplugError(f"no history database at {db} (has the daemon run? --db PATH)")
    identity = None
    if device:
        identity = device
        if "/" not in device:
            identity = select_one(obj.devices(include_root_hubs=False), device).identity
    store = Store(db)
    try:
        entries = [e.to_json() for e in store.history(identity, limit=limit)]
    finally:
        store.close()
    if as_json:
        emit_json(entries)
        return
    from rich.table import Table  # noqa: PLC0415 - see markup_escape

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("TIME", "WHAT", "DEVICE", "VM", "RESULT"):
        table.add_column(col, overflow="fold")
    import datetime as dt  # noqa: PLC0415

    for e in entries:
        when = dt.datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        result = e.get("result") or ""
        if e.get("error_message"):
            result = f"{result}: {e['error_class']}: {e['error_message']}"
        table.add_row(
            when,
            escape(e["kind"]),
            escape(e.get("identity") or e.get("port") or "-", 200),
            escape(e.get("vm") or "-"),
            escape(result, LOG_ARG_LIMIT),
        )
    obj.console.print(table)


# ---------------------------------------------------------------------------
# vmplug attach / detach / reload


def _persist(config_file: Path, vm: str | None, device: UsbDevice) -> str:
    """Put a rule for this very device first in the config (comments kept)."""
    from vmplug.config_write import NewRule, add_rule, match_for  # noqa: PLC0415

    match = match_for(device, "this")
    add_rule(config_file, NewRule(vm=vm, match=match, note="added by vmplug --persist"))
    return match


async def _direct(vmc: Any, op: str, qemu_id: str, spec: Any = None) -> None:
    """One attach or detach straight to the VM, whatever its kind, no daemon."""
    from vmplug.vms.factory import one_shot  # noqa: PLC0415

    async with one_shot(vmc) as vm:
        if op == "attach":
            await vm.attach(qemu_id, spec)
        else:
            await vm.detach(qemu_id)


@click.command("attach", epilog=EPILOG_ENV)
@click.argument("device")
@click.option("--vm", required=True, help="The VM (a [vm.NAME] of the config).")
@click.option("--persist", is_flag=True, help="Also write a rule for it, first, into the config.")
@click.option("--socket", "socket_path", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def attach_cmd(
    obj: Context, device: str, vm: str, persist: bool, socket_path: str | None, as_json: bool
) -> None:
    """Attach DEVICE to a VM now.

    DEVICE is a port path (3-1.2), vid:pid (1235:821a) or a serial; when it
    names more than one device, the error lists them.  With a running daemon
    the request goes through it (and holds until the daemon stops; add
    --persist to keep it in the config); without one, vmplug talks to the
    VM's QMP socket directly, once.
    """
    _one_shot(obj, "attach", device, vm, persist, socket_path, as_json)


@click.command("detach", epilog=EPILOG_ENV)
@click.argument("device")
@click.option("--persist", is_flag=True, help="Also write a block rule for it into the config.")
@click.option("--socket", "socket_path", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def detach_cmd(
    obj: Context, device: str, persist: bool, socket_path: str | None, as_json: bool
) -> None:
    """Give DEVICE back to the host (detach it from whatever VM holds it)."""
    _one_shot(obj, "detach", device, None, persist, socket_path, as_json)


def _one_shot(
    obj: Context,
    op: str,
    selector: str,
    vm: str | None,
    persist: bool,
    socket_path: str | None,
    as_json: bool,
) -> None:
    path = config_path(obj.config)
    config = load_config(path)
    if vm is not None and vm not in config.vms:
        raise UsageError(
            f"no VM named {vm!r} in {path} (VMs: {', '.join(sorted(config.vms)) or 'none'})"
        )
    sock = daemon_socket(socket_path, config.daemon)
    devices = obj.devices(include_root_hubs=False)
    dev = select_one(devices, selector)
    if dev.is_hub:
        raise UsageError(f"{dev.port} is a hub: QEMU cannot pass hubs through")
    result: dict[str, Any] = {"device": describe(dev, exact=True), "op": op}
    if persist:
        result["rule"] = _persist(path, vm, dev)
    if daemon_running(sock):
        if persist:
            call(sock, "POST", "/v1/reload")
        body = {"device": dev.port} | ({"vm": vm} if vm else {})
        result |= {"via": "daemon"} | call(sock, "POST", f"/v1/{op}", body)
    else:
        from vmplug.engine.desired import host_port  # noqa: PLC0415
        from vmplug.vms.base import UsbHostSpec  # noqa: PLC0415

        if dev.busnum is None:
            raise VmplugError(f"{dev.port} has no bus number in sysfs")
        targets = [config.vms[vm]] if vm else list(config.vms.values())
        spec = UsbHostSpec(
            hostbus=dev.busnum,
            hostaddr=None,
            hostport=host_port(dev.port),
            vendorid=None,
            productid=None,
        )
        for vmc in targets:
            asyncio.run(_direct(vmc, op, dev.qemu_id, spec))
        result |= {"via": "direct", "state": "attached" if op == "attach" else "detached"}
        if op == "attach" and not persist:
            result["note"] = (
                "no daemon runs: QEMU itself re-grabs a device replugged into the same "
                "socket, nothing more (run `vmplug run`; --persist keeps this in the config)"
            )
    if as_json:
        emit_json(result)
        return
    obj.console.print(f"{op}: {escape(describe(dev), None)}" + (f" -> {escape(vm)}" if vm else ""))
    for key in ("via", "state", "rule", "error", "note"):
        if result.get(key):
            obj.console.print(f"  {key}: {escape(str(result[key]), None)}")
    if result.get("state") in ("retrying", "pending"):
        raise SystemExit(1)


@click.command("reload", epilog=EPILOG_ENV)
@click.option("--socket", "socket_path", metavar="PATH", help=SOCKET_HELP)
@pass_ctx
def reload_cmd(obj: Context, socket_path: str | None) -> None:
    """Make the running daemon re-read its config (like SIGHUP).

    An invalid config is refused with its error, and the daemon keeps the
    one it runs (exit status 2).
    """
    # the daemon itself reports what is wrong with the file: no warning twice
    sock = daemon_socket(socket_path, daemon_settings(obj, warn=False))
    if not daemon_running(sock):
        raise VmplugError(f"no vmplug daemon answers on {sock}")
    try:
        data = call(sock, "POST", "/v1/reload")
    except ApiError as exc:
        refused = exc.data.get("message") if isinstance(exc.data, dict) else None
        if refused:  # the daemon's own words: file:line:col, the error, a caret
            raise ReloadRefused(
                f"{refused}\nreload refused: the daemon keeps its running config", refused
            ) from None
        raise
    obj.console.print(markup_escape(printable_lines(data["message"])))
