"""The daemon's journal on a real SQLite store: typed kinds, held writes, listeners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmplug.daemon.journal import Journal
from vmplug.history.store import ActionKind, EventKind, Result, Store


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "vmplug.db")
    yield s
    s.close()


def test_held_writes_wait_for_release_and_keep_their_order(store: Store) -> None:
    journal = Journal(store)
    seen: list[dict[str, Any]] = []
    journal.listeners.append(seen.append)
    journal.hold()
    journal.event(EventKind.DEVICE_ADD, identity="1d6b:0104:x", port="2-1", vm="a")
    journal.action(
        ActionKind.ATTACH,
        identity="1d6b:0104:x",
        qemu_id="vmplug-0123456789ab",
        vm="a",
        result=Result.OK,
        duration_s=0.01,
        latency_s=0.2,
    )
    assert store.count() == 0, "nothing written while an attach is in progress"
    assert [(i["type"], i["kind"]) for i in seen] == [("event", "device-add"), ("action", "attach")]
    assert seen[1]["latency_s"] == 0.2, "listeners get the latency"
    journal.release()
    rows = store.history(None, limit=None)
    assert [(e.entry, e.kind) for e in rows] == [("event", "device-add"), ("action", "attach")]
    assert rows[1].vm == "a" and rows[1].result == "ok"
    journal.event(EventKind.DAEMON_STOP)
    assert store.count() == 3, "written at once after release"


def test_a_failing_listener_or_store_stops_nothing(store: Store) -> None:
    journal = Journal(store)
    seen: list[str] = []

    def broken(item: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    journal.listeners += [broken, lambda item: seen.append(item["kind"])]
    journal.event(EventKind.OVERFLOW)
    assert seen == ["overflow"] and broken in journal.listeners
    store.close()  # writes now fail: logged, not raised
    journal.event(EventKind.RESCAN, detail={"devices": 0})
    assert seen == ["overflow", "rescan"]


def test_without_a_store_only_listeners_hear() -> None:
    journal = Journal(None)
    seen: list[str] = []
    journal.listeners.append(lambda item: seen.append(item["kind"]))
    with journal.batch():
        journal.event(EventKind.VM_UP, vm="a")
    assert seen == ["vm-up"]
