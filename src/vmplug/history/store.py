"""SQLite store: the daemon's journal of events and actions, and the devices it has seen.

One file (default ``/var/lib/vmplug/vmplug.db``, chosen by the caller) in WAL
mode, written by the daemon and read by one-shot CLI processes at the same
time: in WAL a reader never blocks the writer and the writer never blocks
readers.  ``busy_timeout`` covers the rare writer/writer or checkpoint
contention (a CLI command that writes while no daemon runs).

Durability
----------
Every ``record_*`` call is one transaction, committed before it returns.  The
store runs ``journal_mode=WAL`` with ``synchronous=NORMAL`` by default:

* **Process kill (kill -9, OOM, crash):** nothing committed is lost.  A commit
  has been written to the WAL file (the OS page cache holds it) before the
  call returns; a dying process cannot take it back.  The database is never
  corrupted.
* **Power loss / kernel crash:** the database is still never corrupted (WAL is
  checksummed, a torn tail is discarded on recovery), but the transactions
  committed since the last checkpoint's fsync may be lost -- NORMAL does not
  fsync the WAL on each commit, only at checkpoints.
* ``synchronous="FULL"`` fsyncs the WAL on every commit and so survives power
  loss too, at the cost of one fsync per event (see ``bench/bench_store.py``).
  For a history of USB events that is rarely worth it; it is a constructor
  argument for those who disagree.

Ordering
--------
Events and actions live in one table, ``journal``, with one
``INTEGER PRIMARY KEY AUTOINCREMENT`` id: the id is the order in which things
were recorded, immune to wall-clock jumps (NTP, suspend, a wrong RTC at boot).
``ts`` is the wall-clock unix time for display and windows.  The views
``events`` and ``actions`` show each kind on its own for ad-hoc SQL.

Vocabulary
----------
:class:`EventKind`, :class:`ActionKind` and :class:`Result` are the words the
daemon writes and :mod:`vmplug.history.health` reads; their docstrings say what each
one means to the health figures.  Unknown event kinds (lowercase words joined
by ``-``) are stored as they are, so a newer daemon can add kinds without a
migration; health ignores them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmplug.errors import VmplugError
from vmplug.model import UsbDevice

DEFAULT_PATH = Path("/var/lib/vmplug/vmplug.db")

#: Default wait for a lock held by another connection.  A write normally takes
#: tens of microseconds; this only matters when a second writer or a checkpoint
#: holds the lock, and bounds how long the daemon's event loop can stall.
DEFAULT_BUSY_TIMEOUT_MS = 2000


class StoreError(VmplugError):
    """The database cannot be used: newer schema, not a vmplug store, locked."""


class EventKind(StrEnum):
    """Things that happened.  ``identity``/``port``/``vm`` columns as noted.

    Device events carry the device identity and port; their ``vm`` is the VM
    the rules name for the device *at that moment* (``None``: no rule sends it
    anywhere, or a rule blocks it).  Global events have no identity.
    """

    #: Kernel ``add`` uevent (or found by a rescan): the device is present.
    DEVICE_ADD = "device-add"
    #: Kernel ``bind`` uevent: the driver is bound, the device is ready.
    DEVICE_BIND = "device-bind"
    #: Kernel ``remove`` uevent (or gone at a rescan): the device is absent, and
    #: QEMU's ``usb-host`` lost it.
    DEVICE_REMOVE = "device-remove"
    #: The rules now send a present device to a different VM (``vm``) or
    #: nowhere (``vm=None``), typically after ``config-reload``.  Record it
    #: *before* the detach the change causes, so the detach is not a failure.
    DEVICE_ROUTE = "device-route"
    #: A VM lost one of vmplug's devices without vmplug asking: QMP
    #: ``DEVICE_DELETED`` for our id, or the reconciler found the id missing
    #: while the VM kept running.  ``vm`` is that VM.
    ATTACHMENT_LOST = "attachment-lost"
    #: The VM is running (QMP connected and ``query-status`` running, or
    #: ``RESUME``).  After it, the daemon records ``adopt`` for every one of
    #: our devices it finds already attached.
    VM_UP = "vm-up"
    #: The VM stopped: ``SHUTDOWN``, ``STOP``, QEMU exited, QMP socket gone.
    #: Every attachment to it ends.
    VM_DOWN = "vm-down"
    #: QMP ``RESET`` (guest reboot inside a running QEMU).  QEMU keeps
    #: ``usb-host`` devices across a system reset, so this alone ends no
    #: attachment; a device the reset does lose is an ``attachment-lost``.
    VM_RESET = "vm-reset"
    #: The kernel sent more uevents than the daemon's socket could hold
    #: (netlink ENOBUFS): some were lost, and a ``rescan`` follows.
    OVERFLOW = "overflow"
    #: Full rescan of the host (start, netlink ENOBUFS); the daemon records
    #: add/remove for whatever differs from what it knew.
    RESCAN = "rescan"
    #: The configuration was re-read; ``device-route`` events follow.
    CONFIG_RELOAD = "config-reload"
    #: The daemon started: everything it knew is forgotten, and a snapshot
    #: follows (``device-add`` for present devices, ``vm-up`` for running VMs,
    #: ``adopt`` for attachments already in place).
    DAEMON_START = "daemon-start"
    #: Orderly daemon stop: nothing is observed until the next ``daemon-start``.
    DAEMON_STOP = "daemon-stop"
    #: The kernel logged an error on a device's port (``port``; ``detail``:
    #: ``message``, ``pattern``): a trigger of the healing ladder.
    KERNEL_ERROR = "kernel-error"
    #: A rung of the healing ladder (:mod:`vmplug.daemon.heal`) was carried
    #: out (or, ``detail.dry_run``, only said); ``detail``: ``rung``, ``reason``.
    HEAL = "heal"
    #: A rung was tried and the kernel or QEMU refused it (``detail.error``).
    HEAL_FAILED = "heal-failed"
    #: An ``[[alert]]`` fired (``detail``: ``alert``, ``condition``, ``reason``).
    ALERT = "alert"
    #: The condition of a fired alert has been gone long enough: all clear.
    ALERT_CLEAR = "alert-clear"
    #: The guest says a device vmplug attached is not working there (``vm``,
    #: ``identity``; ``detail``: ``problem`` -- ``no-driver`` for a Linux guest
    #: whose driver did not bind, ``windows-code`` with ``code`` N --, and
    #: ``message``): written by the guest-agent probe, a healing trigger.
    GUEST_PROBLEM = "guest-problem"
    #: A device host (``[host.NAME]``, ``detail.host``) answered after it had
    #: not (or at start): its exported devices follow as ``device-add``.
    REMOTE_HOST_UP = "remote-host-up"
    #: A device host stopped answering (``detail``: ``host``, ``reason``): its
    #: devices are absent (``device-remove``) until it answers again.
    REMOTE_HOST_DOWN = "remote-host-down"
    #: A remote device the rules send here is held by another VM host
    #: (``detail``: ``host``, ``holder``, ``reason``); first come wins.
    DEVICE_HELD = "device-held"


class ActionKind(StrEnum):
    """What the reconciler did to a VM."""

    #: ``device_add usb-host`` with our id: on success the device is attached.
    ATTACH = "attach"
    #: ``device_del`` of our id: on success the device is no longer attached.
    DETACH = "detach"
    #: Found our id already in the VM (daemon restart, VM came up holding it):
    #: on success the device is attached, nothing was sent to QEMU.
    ADOPT = "adopt"


class Result(StrEnum):
    OK = "ok"
    ERROR = "error"


_KIND_RE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One journal row: an event or an action (``entry`` says which)."""

    id: int
    ts: float
    entry: str  # "event" | "action"
    kind: str
    identity: str | None = None
    vm: str | None = None
    port: str | None = None
    # Actions only:
    qemu_id: str | None = None
    result: str | None = None
    error_class: str | None = None
    error_message: str | None = None
    duration_s: float | None = None
    attempt: int | None = None
    # Events only:
    detail: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def is_action(self) -> bool:
        return self.entry == "action"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "ts": self.ts,
            "entry": self.entry,
            "kind": self.kind,
            "identity": self.identity,
            "vm": self.vm,
        }
        if self.is_action:
            out.update(
                qemu_id=self.qemu_id,
                result=self.result,
                error_class=self.error_class,
                error_message=self.error_message,
                duration_s=self.duration_s,
                attempt=self.attempt,
            )
        else:
            out.update(port=self.port, detail=dict(self.detail) if self.detail else None)
        return out


# Each step takes the schema from version N to N+1 (index N), run in one
# transaction with the ``user_version`` bump.  Never edit a released step: add one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE journal (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        ts            REAL    NOT NULL,
        entry         TEXT    NOT NULL CHECK (entry IN ('event', 'action')),
        kind          TEXT    NOT NULL,
        identity      TEXT,
        vm            TEXT,
        port          TEXT,
        qemu_id       TEXT,
        result        TEXT,
        error_class   TEXT,
        error_message TEXT,
        duration_s    REAL,
        attempt       INTEGER,
        detail        TEXT,
        CHECK (entry = 'event' OR (
            kind IN ('attach', 'detach', 'adopt') AND result IN ('ok', 'error')
        ))
    );
    CREATE INDEX journal_identity ON journal (identity, id);
    CREATE INDEX journal_ts ON journal (ts);
    CREATE VIEW events AS
        SELECT id, ts, kind, identity, port, vm, detail
        FROM journal WHERE entry = 'event';
    CREATE VIEW actions AS
        SELECT id, ts, kind, identity, qemu_id, vm, result, error_class,
               error_message, duration_s, attempt
        FROM journal WHERE entry = 'action';
    CREATE TABLE devices (
        identity   TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen  REAL NOT NULL,
        port       TEXT NOT NULL,
        vidpid     TEXT,
        qemu_id    TEXT NOT NULL,
        summary    TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "id, ts, entry, kind, identity, vm, port, qemu_id, result, "
    "error_class, error_message, duration_s, attempt, detail"
)


def _row_to_entry(row: tuple[Any, ...]) -> HistoryEntry:
    # Positional: the column list matches the field order, and keywords cost
    # measurably more when loading a long history.
    detail = row[13]
    i, ts, entry, kind, ident, vm, port, qemu_id, result, ecls, emsg, dur, attempt = row[:13]
    return HistoryEntry(
        i,
        ts,
        entry,
        kind,
        ident,
        vm,
        port,
        qemu_id,
        result,
        ecls,
        emsg,
        dur,
        attempt,
        json.loads(detail) if detail is not None else None,
    )


def device_summary(device: UsbDevice) -> dict[str, Any]:
    """What the store keeps of a device: enough to name it once sysfs is gone."""
    return {
        "identity": device.identity,
        "qemu_id": device.qemu_id,
        "port": device.port,
        "busnum": device.busnum,
        "devnum": device.devnum,
        "vidpid": device.vidpid,
        "manufacturer": device.display_manufacturer,
        "product": device.display_product,
        "serial": device.serial,
        "speed_mbps": device.speed_mbps,
        "usb_version": device.usb_version,
    }


class Store:
    """The daemon's SQLite journal.  Not thread-safe: one connection, one thread.

    ``Store(path)`` creates the parent directories and the schema (or migrates
    an older one).  ``synchronous`` is ``"NORMAL"`` (default) or ``"FULL"``;
    see the module docstring for what each survives.  ``readonly=True`` opens
    an existing store for reading only (a CLI without write access); it
    neither creates nor migrates.

    Write latency: a write is one small transaction, tens of microseconds.
    Every ~1000 WAL pages (a few hundred events) SQLite's automatic
    checkpoint runs inside the commit that crosses the mark and fsyncs the
    database: that one write takes 5-20 ms.  For a daemon writing a few
    events a minute that is one short stall an hour; moving checkpoints to a
    second connection in a thread was measured (GIL hand-offs made the
    typical write slower and, under a steady write stream, the WAL never
    restarted and grew without bound), so the default is kept on purpose.
    """

    def __init__(
        self,
        path: str | Path = DEFAULT_PATH,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        readonly: bool = False,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: autocommit, every statement outside an
                # explicit BEGIN is its own transaction; batch() opens one.
                self._db = sqlite3.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not readonly:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL (journal_mode={mode})")
            self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not a usable vmplug store: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        self._batch_depth = 0
        self._closed = False

    # -- schema -----------------------------------------------------------------

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this vmplug knows up to "
                f"{SCHEMA_VERSION} (written by a newer vmplug?)"
            )
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise StoreError(f"{self.path} needs a schema upgrade; open it read-write once")
        # BEGIN IMMEDIATE takes the write lock, then the version is read again:
        # two processes opening a fresh file at once migrate it exactly once.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(self._version(), SCHEMA_VERSION):
                for statement in _split_sql(_MIGRATIONS[step]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {step + 1}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return self._version()

    # -- writing ----------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group several writes into one transaction (one WAL commit).

        Use it for a rescan snapshot.  All or nothing: an exception rolls the
        whole batch back.  Nested ``batch()`` calls join the outer one.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._batch_depth = 1
        try:
            yield
        except BaseException:
            self._batch_depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._batch_depth = 0
        self._db.execute("COMMIT")

    def record_event(
        self,
        kind: str,
        *,
        identity: str | None = None,
        port: str | None = None,
        vm: str | None = None,
        detail: Mapping[str, Any] | None = None,
        ts: float | None = None,
    ) -> int:
        """Append an event; returns its id (the journal order)."""
        kind = self._event_kind(kind)
        detail_json = (
            json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), default=str)
            if detail
            else None
        )
        cur = self._db.execute(
            "INSERT INTO journal (ts, entry, kind, identity, vm, port, detail) "
            "VALUES (?, 'event', ?, ?, ?, ?, ?)",
            (time.time() if ts is None else ts, kind, identity, vm, port, detail_json),
        )
        return int(cur.lastrowid or 0)

    def record_action(
        self,
        kind: str,
        *,
        identity: str,
        qemu_id: str,
        vm: str,
        result: str,
        error_class: str | None = None,
        error_message: str | None = None,
        duration_s: float | None = None,
        attempt: int = 1,
        ts: float | None = None,
    ) -> int:
        """Append what the reconciler did and how it went; returns its id.

        ``error_class`` is the QMP error class (``GenericError``,
        ``DeviceNotFound``...) or the Python exception name for a transport
        failure; ``attempt`` counts from 1 for each retry series.
        """
        kind = ActionKind(kind).value
        result = Result(result).value
        if result == Result.OK and (error_class or error_message):
            raise ValueError("an ok action carries no error")
        cur = self._db.execute(
            "INSERT INTO journal (ts, entry, kind, identity, vm, qemu_id, result, "
            "error_class, error_message, duration_s, attempt) "
            "VALUES (?, 'action', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time() if ts is None else ts,
                kind,
                identity,
                vm,
                qemu_id,
                result,
                error_class,
                error_message,
                duration_s,
                int(attempt),
            ),
        )
        return int(cur.lastrowid or 0)

    def remember_device(self, device: UsbDevice, *, ts: float | None = None) -> None:
        """Keep the device's last known summary under its identity."""
        self.remember_devices((device,), ts=ts)

    def remember_devices(self, devices: Iterable[UsbDevice], *, ts: float | None = None) -> None:
        """:meth:`remember_device` for many devices in one statement (a rescan's
        500 devices: one ``executemany``, each summary built once)."""
        now = time.time() if ts is None else ts
        rows = []
        for device in devices:
            summary = device_summary(device)
            rows.append(
                (
                    summary["identity"],
                    now,
                    now,
                    device.port,
                    summary["vidpid"],
                    summary["qemu_id"],
                    json.dumps(summary, sort_keys=True, separators=(",", ":")),
                )
            )
        self._db.executemany(_REMEMBER, rows)

    def record_events(
        self,
        kind: str,
        rows: Iterable[tuple[str | None, str | None, str | None]],
        *,
        ts: float | None = None,
    ) -> None:
        """Append one event of ``kind`` per ``(identity, port, vm)``, in order,
        with no detail, in one statement (a rescan's ``device-add`` events)."""
        kind = self._event_kind(kind)
        now = time.time() if ts is None else ts
        self._db.executemany(
            "INSERT INTO journal (ts, entry, kind, identity, vm, port) "
            "VALUES (?, 'event', ?, ?, ?, ?)",
            [(now, kind, identity, vm, port) for identity, port, vm in rows],
        )

    @staticmethod
    def _event_kind(kind: str) -> str:
        kind = str(kind)
        if not _KIND_RE.match(kind):
            raise ValueError(f"bad event kind {kind!r}: lowercase words joined by '-'")
        if kind in _ACTION_KINDS:
            raise ValueError(f"{kind!r} is an action kind: use record_action")
        return kind

    def prune(self, before: float) -> int:
        """Delete journal rows older than ``before`` (unix time); returns how many.

        Ids are never reused (AUTOINCREMENT), so order stays intact.
        """
        cur = self._db.execute("DELETE FROM journal WHERE ts < ?", (before,))
        return cur.rowcount

    # -- reading ----------------------------------------------------------------

    def known_device(self, identity: str) -> dict[str, Any] | None:
        """The last summary stored for ``identity`` plus first/last seen, or None."""
        row = self._db.execute(
            "SELECT summary, first_seen, last_seen FROM devices WHERE identity = ?",
            (identity,),
        ).fetchone()
        if row is None:
            return None
        out: dict[str, Any] = json.loads(row[0])
        out["first_seen"] = row[1]
        out["last_seen"] = row[2]
        return out

    def known_devices(self) -> list[dict[str, Any]]:
        """Every device ever remembered, most recently seen first."""
        rows = self._db.execute(
            "SELECT summary, first_seen, last_seen FROM devices ORDER BY last_seen DESC"
        ).fetchall()
        out: list[dict[str, Any]] = []
        for summary, first_seen, last_seen in rows:
            item: dict[str, Any] = json.loads(summary)
            item["first_seen"] = first_seen
            item["last_seen"] = last_seen
            out.append(item)
        return out

    def history(
        self,
        identity: str | None = None,
        limit: int | None = 100,
        since: float | None = None,
        *,
        include_global: bool = True,
    ) -> list[HistoryEntry]:
        """Events and actions merged, oldest first, in journal (id) order.

        ``identity``: only that device's entries, plus -- unless
        ``include_global=False`` -- the entries that name no device (VM up/down,
        daemon start/stop, rescans), which health needs and a reader wants
        for context.  ``limit``: the newest ``limit`` entries (``None``: all).
        ``since``: only entries with ``ts >= since``.
        """
        where: list[str] = []
        params: list[Any] = []
        if identity is not None:
            if include_global:
                where.append("(identity = ? OR identity IS NULL)")
            else:
                where.append("identity = ?")
            params.append(identity)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        # Only constant column lists and "?" placeholders are pasted in.
        sql = f"SELECT {_COLUMNS} FROM journal"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        if limit is None:
            sql += " ORDER BY id"
            rows = self._db.execute(sql, params).fetchall()
        else:
            sql += " ORDER BY id DESC LIMIT ?"
            params.append(max(0, int(limit)))
            rows = self._db.execute(sql, params).fetchall()
            rows.reverse()
        return [_row_to_entry(r) for r in rows]

    def count(self) -> int:
        """Number of journal rows."""
        return int(self._db.execute("SELECT count(*) FROM journal").fetchone()[0])

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent).  Committed data is already safe."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly:
                self._db.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        finally:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ACTION_KINDS = frozenset(k.value for k in ActionKind)
_REMEMBER = (
    "INSERT INTO devices (identity, first_seen, last_seen, port, vidpid, qemu_id, summary) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (identity) DO UPDATE SET last_seen = excluded.last_seen, "
    "port = excluded.port, vidpid = excluded.vidpid, qemu_id = excluded.qemu_id, "
    "summary = excluded.summary"
)


def _split_sql(script: str) -> list[str]:
    """Statements of a migration step (none of ours has ';' inside a literal)."""
    return [s.strip() for s in script.split(";") if s.strip()]
