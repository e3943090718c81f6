"""A rescan's snapshot written in bulk (Journal.seen: two statements instead
of two per device) keeps what the per-device writes kept: the same rows in
the same order, the same device summaries, the same listener items; and it is
held and released like any write.  Real SQLite store, real captured devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmplug.daemon.journal import Journal
from vmplug.history.store import EventKind, Store
from vmplug.host.inventory import read_devices

MIXED = Path(__file__).parent.parent / "fixtures" / "sysfs" / "mixed"


def _rows(store: Store) -> list[tuple[Any, ...]]:
    return [
        (e.entry, e.kind, e.identity, e.port, e.vm, e.detail)
        for e in store.history(None, limit=None)
    ]


def _devices(store: Store) -> list[dict[str, Any]]:
    out = []
    for d in store.known_devices():
        out.append({k: v for k, v in d.items() if k not in ("first_seen", "last_seen")})
    return sorted(out, key=lambda d: d["identity"])


def test_bulk_snapshot_writes_what_the_per_device_writes_wrote(tmp_path: Path) -> None:
    devices = [d for d in read_devices(MIXED) if not d.is_root_hub]
    assert len(devices) > 3
    vm_of = {d.port: ("a" if i % 2 else None) for i, d in enumerate(devices)}
    one, bulk = Store(tmp_path / "one.db"), Store(tmp_path / "bulk.db")
    try:
        seen_one: list[dict[str, Any]] = []
        seen_bulk: list[dict[str, Any]] = []
        j1, j2 = Journal(one), Journal(bulk)
        j1.listeners.append(seen_one.append)
        j2.listeners.append(seen_bulk.append)
        with j1.batch():
            for dev in devices:
                j1.remember(dev)
                j1.event(
                    EventKind.DEVICE_ADD,
                    identity=dev.identity,
                    port=dev.port,
                    vm=vm_of[dev.port],
                    detail=None,
                )
        with j2.batch():
            j2.seen(EventKind.DEVICE_ADD, [(dev, vm_of[dev.port]) for dev in devices])
        assert _rows(bulk) == _rows(one)
        assert [r[3] for r in _rows(bulk)] == [d.port for d in devices]  # in order
        assert _devices(bulk) == _devices(one)

        def strip(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in i.items() if k != "ts"} for i in items]

        assert strip(seen_bulk) == strip(seen_one)
    finally:
        one.close()
        bulk.close()


def test_bulk_snapshot_is_held_and_released_in_order(tmp_path: Path) -> None:
    devices = [d for d in read_devices(MIXED) if not d.is_root_hub]
    store = Store(tmp_path / "vmplug.db")
    try:
        journal = Journal(store)
        journal.hold()
        journal.event(EventKind.RESCAN, detail={"devices": len(devices)})
        journal.seen(EventKind.DEVICE_ADD, [(dev, None) for dev in devices])
        journal.event(EventKind.VM_UP, vm="a")
        assert store.history(None, limit=None) == []
        assert store.known_devices() == []
        with journal.batch():
            journal.release()
        kinds = [e.kind for e in store.history(None, limit=None)]
        assert kinds == ["rescan", *["device-add"] * len(devices), "vm-up"]
        assert len(store.known_devices()) == len({d.identity for d in devices})
    finally:
        store.close()


def test_a_bad_kind_is_refused_in_bulk_too(tmp_path: Path) -> None:
    store = Store(tmp_path / "vmplug.db")
    try:
        for kind in ("Not A Kind", "attach"):
            try:
                store.record_events(kind, [("x", "1-1", None)])
            except ValueError:
                continue
            raise AssertionError(f"{kind!r} was accepted")
        assert store.history(None, limit=None) == []
    finally:
        store.close()
