"""Rules against devices read from real sysfs captures (tests/fixtures/sysfs/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmplug.host.sysfs import scan
from vmplug.model import UsbDevice
from vmplug.rules import first_match, parse_rule

CAPTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def _devices(name: str) -> list[UsbDevice]:
    root = CAPTURES / name
    if not root.is_dir():
        pytest.skip(f"no sysfs capture {name}")
    return scan(root)


@pytest.mark.parametrize(
    ("rule", "ports"),
    [
        # The audio device's list is 01:01:04 01:02:00 01:02:00 (alt 0 and 1 of
        # interface 1), so "is an audio device" needs one-of, not a bare value.
        ("with-interface one-of { 01:*:* }", ["2-2.1"]),
        ("with-interface 01:*:*", []),
        ("with-interface equals { 01:01:04 01:02:00 }", []),
        ("with-interface { 01:01:04 01:02:00 01:02:00 }", ["2-2.1"]),
        ("with-interface equals-ordered { 01:01:* 01:02:* 01:02:* }", ["2-2.1"]),
        # tablet and keyboard share 0627:0001; the interface tells them apart
        ("id 0627:0001", ["1-3", "2-2.4.1", "2-2.4.2"]),
        ("id 0627:0001 with-interface 03:01:01", ["2-2.4.2"]),
        ('name "QEMU USB Tablet" via-port one-of { "2-2.4.1" "9-9" }', ["2-2.4.1"]),
        ('serial "LABSTICK0001"', ["3-1"]),
        ("id 46f4:* with-interface 08:06:50", ["1-1", "3-1"]),
        ("with-interface 09:00:*", ["usb1", "2-2", "2-2.4", "usb2", "usb3"]),
        ('with-connect-type "unknown" with-interface none-of { 09:*:* 03:*:* }',
         ["1-1", "2-2.1", "3-1"]),
        ('hash "20rpHHbfiAbfWChjRGtGn0vH2kj6g7lw/TMax/YzlrM="', ["2-2.1"]),
    ],
)  # fmt: skip
def test_mixed_capture(rule: str, ports: list[str]) -> None:
    parsed = parse_rule(rule)
    assert sorted(d.port for d in _devices("mixed") if parsed.matches(d)) == sorted(ports)


def test_identical_devices_are_told_apart_by_port() -> None:
    devices = [d for d in _devices("identical") if not d.is_hub]
    rules = [parse_rule('id 0627:0001 via-port "2-3"'), parse_rule("id 0627:0001")]
    assert {d.port: first_match(rules, d) for d in devices} == {
        "1-1": None,
        "1-2": None,
        "2-1": 1,
        "2-3": 0,
    }
    # No serial at all: 'serial ""' is how usbguard says so.
    assert [d.port for d in devices if parse_rule('serial ""').matches(d)] == ["2-1", "2-3"]
