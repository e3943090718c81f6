"""The SQLite store: schema, journal order, device memory, concurrency, latency."""

from __future__ import annotations

import dataclasses
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug.history.store import (
    SCHEMA_VERSION,
    ActionKind,
    EventKind,
    HistoryEntry,
    Store,
    StoreError,
)
from vmplug.host.sysfs import scan

# devices captured from the lab kernel (tests/fixtures/sysfs/gadgets): the
# Scarlett 4i4 identity with a serial, the KeyLab identity without one
_CAPTURED = {d.port: d for d in scan(Path(__file__).parents[1] / "fixtures/sysfs/gadgets")}
SCARLETT = _CAPTURED["4-1"]
KEYLAB = _CAPTURED["5-1"]
SERIAL = "P9EDDN6231A8D1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "vmplug.db")
    yield s
    s.close()


def test_creates_parent_dirs_wal_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "vmplug" / "vmplug.db"
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"journal", "devices", "events", "actions"} <= tables
    db.close()


def test_reopen_keeps_data_and_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    with Store(path) as s:
        s.record_event(EventKind.DAEMON_START)
    with Store(path) as s:
        assert s.count() == 1 and s.schema_version == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer vmplug"):
        Store(path)


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable vmplug store"):
        Store(path)


def test_synchronous_setting_applies(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as s:
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with Store(tmp_path / "b.db", synchronous="FULL") as s:
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(ValueError, match="NORMAL or FULL"):
        Store(tmp_path / "c.db", synchronous="OFF")


def test_events_and_actions_merge_in_journal_order(store: Store) -> None:
    ident = SCARLETT.identity
    a = store.record_event(
        EventKind.DEVICE_ADD,
        identity=ident,
        port=SCARLETT.port,
        vm="windows",
        detail={"busnum": 3, "devnum": 7},
        ts=100.0,
    )
    b = store.record_action(
        ActionKind.ATTACH,
        identity=ident,
        qemu_id=SCARLETT.qemu_id,
        vm="windows",
        result="error",
        error_class="GenericError",
        error_message="failed to find host usb device 3:7",
        duration_s=0.012,
        attempt=1,
        ts=100.5,
    )
    # A wall clock stepping back does not reorder the journal.
    c = store.record_event(EventKind.VM_UP, vm="windows", ts=99.0)
    d = store.record_action(
        "attach",
        identity=ident,
        qemu_id=SCARLETT.qemu_id,
        vm="windows",
        result="ok",
        attempt=2,
        ts=101.0,
    )
    assert a < b < c < d
    hist = store.history()
    assert [e.id for e in hist] == [a, b, c, d]
    assert [(e.entry, e.kind) for e in hist] == [
        ("event", "device-add"),
        ("action", "attach"),
        ("event", "vm-up"),
        ("action", "attach"),
    ]
    assert hist[0].detail == {"busnum": 3, "devnum": 7}
    assert hist[0].port == SCARLETT.port
    assert hist[1] == HistoryEntry(
        id=b,
        ts=100.5,
        entry="action",
        kind="attach",
        identity=ident,
        vm="windows",
        qemu_id=SCARLETT.qemu_id,
        result="error",
        error_class="GenericError",
        error_message="failed to find host usb device 3:7",
        duration_s=0.012,
        attempt=1,
    )
    assert hist[3].attempt == 2 and hist[3].error_class is None
    assert hist[1].to_json()["error_class"] == "GenericError"
    assert hist[0].to_json()["detail"] == {"busnum": 3, "devnum": 7}


def test_history_filters(store: Store) -> None:
    s, k = SCARLETT.identity, KEYLAB.identity
    store.record_event("daemon-start", ts=1.0)
    store.record_event("device-add", identity=s, ts=2.0)
    store.record_event("device-add", identity=k, ts=3.0)
    store.record_event("vm-up", vm="w", ts=4.0)
    store.record_event("device-remove", identity=s, ts=5.0)
    kinds = [e.kind for e in store.history(s)]
    assert kinds == ["daemon-start", "device-add", "vm-up", "device-remove"]
    assert [e.kind for e in store.history(s, include_global=False)] == [
        "device-add",
        "device-remove",
    ]
    # limit keeps the newest, still oldest first
    assert [e.ts for e in store.history(limit=2)] == [4.0, 5.0]
    assert [e.ts for e in store.history(since=3.0)] == [3.0, 4.0, 5.0]
    assert [e.ts for e in store.history(k, since=2.5)] == [3.0, 4.0]
    assert len(store.history(limit=None)) == 5
    assert store.history(limit=0) == []
    assert store.history("nobody", include_global=False) == []


def test_unknown_event_kinds_are_kept_bad_ones_refused(store: Store) -> None:
    store.record_event("usbredir-connect", identity="x")
    assert store.history()[-1].kind == "usbredir-connect"
    for bad in ("Device Add", "", "attach", "-x", "a--b"):
        with pytest.raises(ValueError):
            store.record_event(bad)


def test_action_vocabulary_is_enforced(store: Store) -> None:
    kw: dict[str, Any] = {"identity": "i", "qemu_id": "vmplug-1", "vm": "w"}
    with pytest.raises(ValueError):
        store.record_action("plug", result="ok", **kw)
    with pytest.raises(ValueError):
        store.record_action("attach", result="maybe", **kw)
    with pytest.raises(ValueError, match="ok action"):
        store.record_action("attach", result="ok", error_class="GenericError", **kw)
    # The schema refuses what the API would, for writers that bypass it.
    with pytest.raises(sqlite3.IntegrityError):
        store._db.execute(
            "INSERT INTO journal (ts, entry, kind, result) VALUES (0, 'action', 'plug', 'ok')"
        )
    assert store.count() == 0


def test_remember_device_and_known_device(store: Store) -> None:
    assert store.known_device(SCARLETT.identity) is None
    store.remember_device(SCARLETT, ts=10.0)
    moved = dataclasses.replace(SCARLETT, port="1-4", busnum=1, devnum=2)  # replugged elsewhere
    assert moved.identity == SCARLETT.identity
    store.remember_device(moved, ts=20.0)
    known = store.known_device(SCARLETT.identity)
    assert known is not None
    assert known["port"] == "1-4" and known["devnum"] == 2
    assert known["vidpid"] == "1235:821a"
    assert known["product"] == "Scarlett 4i4 USB" and known["serial"] == SERIAL
    assert known["qemu_id"] == SCARLETT.qemu_id
    assert known["first_seen"] == 10.0 and known["last_seen"] == 20.0
    store.remember_device(KEYLAB, ts=30.0)
    assert [d["identity"] for d in store.known_devices()] == [
        KEYLAB.identity,
        SCARLETT.identity,
    ]


def test_known_device_survives_reopen(tmp_path: Path) -> None:
    with Store(tmp_path / "v.db") as s:
        s.remember_device(KEYLAB)
    with Store(tmp_path / "v.db") as s:
        known = s.known_device(KEYLAB.identity)
        assert known is not None and known["port"] == "5-1"


def test_batch_is_one_transaction_and_rolls_back(store: Store) -> None:
    with store.batch():
        store.record_event("rescan")
        with store.batch():
            store.record_event("device-add", identity="a")
        store.remember_device(KEYLAB)
    assert store.count() == 2
    with pytest.raises(RuntimeError), store.batch():
        store.record_event("device-add", identity="b")
        store.remember_device(SCARLETT)
        raise RuntimeError("boom")
    assert store.count() == 2
    assert store.known_device(SCARLETT.identity) is None
    store.record_event("rescan")  # usable after a rollback
    assert store.count() == 3


def test_prune_keeps_ids_increasing(store: Store) -> None:
    for ts in (1.0, 2.0, 3.0):
        store.record_event("rescan", ts=ts)
    assert store.prune(before=2.5) == 2
    last = store.record_event("rescan", ts=4.0)
    assert last == 4
    assert [e.id for e in store.history()] == [3, 4]


def test_reader_in_another_connection_while_writer_holds_a_transaction(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    with Store(path) as writer:
        writer.record_event("daemon-start", ts=1.0)
        reader = Store(path)
        with writer.batch():
            writer.record_event("rescan", ts=2.0)
            # WAL: the reader sees the last commit and is not blocked.
            t0 = time.perf_counter()
            assert [e.kind for e in reader.history()] == ["daemon-start"]
            assert time.perf_counter() - t0 < 0.5
        assert [e.kind for e in reader.history()] == ["daemon-start", "rescan"]
        reader.close()


def test_second_writer_waits_for_busy_timeout_then_fails(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    with Store(path) as a, Store(path, busy_timeout_ms=100) as b, a.batch():
        a.record_event("rescan")
        t0 = time.perf_counter()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            b.record_event("rescan")
        assert 0.05 < time.perf_counter() - t0 < 2.0


def test_readonly_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    with Store(path) as s:
        s.record_event("daemon-start")
        ro = Store(path, readonly=True)
        assert [e.kind for e in ro.history()] == ["daemon-start"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.record_event("rescan")
        ro.close()
    with pytest.raises(StoreError):
        Store(tmp_path / "missing.db", readonly=True)


def test_close_is_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path / "v.db")
    s.close()
    s.close()
    with pytest.raises(sqlite3.ProgrammingError):
        s.record_event("rescan")


def test_record_event_is_well_under_a_millisecond(store: Store) -> None:
    # The daemon writes from its event loop: a write must not stall it.
    for _ in range(50):  # warm up page cache and statement cache
        store.record_event("rescan")
    times = []
    for i in range(1000):
        t0 = time.perf_counter()
        store.record_event(
            "device-add", identity=f"1235:821a/serial={i}", port="3-1", vm="w", detail={"n": i}
        )
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 1e-3, statistics.median(times)
