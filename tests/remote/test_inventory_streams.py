"""A VM host reads its guest's losses of a remote device from the device
host's export list (``sessions``, ``dead_links``: what
:class:`vmplug.remote.devicehost.DeviceHostExport` serves), one row per loss
and one return, whatever answers it missed in between.  The same path with
the real daemons and a real cut: tests/remote/test_remote_faults_daemon.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmplug.config import RemoteHostConfig
from vmplug.history.store import EventKind
from vmplug.remote.inventory import RemoteInventory

IDENT = "0627:0001/serial=42"
ME = "vmhost-a"


def _listing(holder: str | None, sessions: int, dead: int = 0) -> dict[str, Any]:
    device = {"port": "2-1", "vendor_id": "0627", "product_id": "0001", "serial": "42"}
    return {
        "host": "devhost",
        "devices": [
            {
                "name": IDENT,
                "identity": IDENT,
                "endpoint_port": 7300,
                "present": True,
                "holder": holder,
                "streaming": holder is not None,
                "sessions": sessions,
                "dead_links": dead,
                "refusals": [],
                "device": device | {"identity": IDENT},
            }
        ],
    }


class Seen:
    def __init__(self) -> None:
        self.rows: list[str] = []

    def journal(self, kind: EventKind, detail: dict[str, Any], identity: str | None) -> None:
        assert identity == f"{IDENT}@devhost"
        self.rows.append(kind.value)

    def changes(self, changes: list[tuple[EventKind, Any]]) -> None:
        self.rows += [f"change:{kind.value}" for kind, _dev in changes]


def _inventory(seen: Seen) -> RemoteInventory:
    cfg = RemoteHostConfig(name="devhost", address="127.0.0.1", certs=None, me=ME, insecure=True)
    # insecure: no certificates, so nothing is written under tls_root
    return RemoteInventory(
        {"devhost": cfg},
        tls_root=Path("/nonexistent"),
        on_change=seen.changes,
        journal=seen.journal,
    )


def test_a_dead_link_is_one_loss_and_its_reconnect_one_return() -> None:
    seen = Seen()
    inv = _inventory(seen)
    link = inv.links["devhost"]
    inv._apply(link, _listing(ME, 1))
    assert seen.rows == ["change:device-add"]  # the device, first heard of
    inv._apply(link, _listing(None, 1, dead=1))  # the device host ended our link: a cut
    inv._apply(link, _listing(None, 1, dead=1))  # the same, answered again
    assert seen.rows[1:] == ["attachment-lost"]
    inv._apply(link, _listing(ME, 2, dead=1))  # QEMU's reconnect streams it again
    assert seen.rows[2:] == ["change:device-add"]  # the reconciler journals it adopted


def test_renewals_seen_only_by_their_count_are_each_a_loss_and_a_return() -> None:
    seen = Seen()
    inv = _inventory(seen)
    link = inv.links["devhost"]
    inv._apply(link, _listing(ME, 1))
    # two sessions began and ended between two answers (usbredirect died twice)
    inv._apply(link, _listing(ME, 3))
    assert seen.rows[1:] == ["attachment-lost", "attachment-lost", "change:device-add"]
    # one vmplug began itself (its own usb-redir attach): no loss
    [dev] = inv.devices()
    assert inv.attach_spec(dev.qemu_id) is not None
    before = len(seen.rows)
    inv._apply(link, _listing(ME, 4))
    assert seen.rows[before:] == []


def test_another_hosts_dead_link_is_not_ours() -> None:
    seen = Seen()
    inv = _inventory(seen)
    link = inv.links["devhost"]
    inv._apply(link, _listing(ME, 1))
    inv._apply(link, _listing("vmhost-b", 2))  # it went to vmhost-b (vmplug detached it here)
    inv._apply(link, _listing(None, 2, dead=1))  # vmhost-b's link was cut
    assert "attachment-lost" not in seen.rows
