"""A pass's held journal and the pump's hold overlap (issue 16): nothing held is dropped,
and a batched release writes everything in order, on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

from vmplug.daemon.journal import Journal
from vmplug.history.store import ActionKind, EventKind, Result, Store


def test_a_second_hold_keeps_what_the_first_holds(tmp_path: Path) -> None:
    store = Store(tmp_path / "vmplug.db")
    try:
        journal = Journal(store)
        journal.hold()  # a reconcile pass of many actions
        journal.action(
            ActionKind.ATTACH, identity="a/port=1-1", qemu_id="vmplug-a", vm="v", result=Result.OK
        )
        journal.hold()  # the pump, on an event meanwhile
        journal.event(EventKind.DEVICE_ADD, identity="b/port=1-2", port="1-2")
        assert journal.holding
        assert store.history(None, limit=None) == []  # nothing written yet
        with journal.batch():
            journal.release()
        assert not journal.holding
        rows = store.history(None, limit=None)
        assert sorted(r.kind for r in rows) == ["attach", "device-add"]
    finally:
        store.close()
