"""Matching semantics: usbguard's set operators, attribute by attribute."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support.devices import DEVICES
from vmplug.model import Interface, UsbDevice
from vmplug.rules import Rule, first_match, parse_rule

AUDIO = DEVICES["qemu-audio"]  # with-interface values: 01:01:04 01:02:00 01:02:00
SCARLETT = DEVICES["scarlett-4i4"]  # 1235:821a
KEYLAB = DEVICES["keylab-mkii"]  # no serial
UNREADABLE = DEVICES["unreadable"]  # no IDs, no strings, no interfaces
# usbguard's hash of this capture's 5-1: what `usbguard generate-policy` printed
# with the capture bind-mounted on /sys (its hash covers the strings, not just descriptors)
KEYLAB_SHA256 = "dSGthNp3CpTyX7fsXDWBqPAnPSJxnm/SDCy2spv/wJc="


def test_audio_fixture_lists_alternate_settings() -> None:
    # usbguard's DevicePrivate::loadInterfaceDescriptor appends every interface
    # descriptor, so alternate setting 1 of interface 1 counts as a value.
    assert AUDIO.interface_triples == ((1, 1, 4), (1, 2, 0), (1, 2, 0))


# fmt: off
INTERFACE_TABLE = [
    # one-of: some listed value matches some device value
    ("one-of { 01:*:* }", True),
    ("one-of { 03:*:* }", False),
    ("one-of { 03:*:* 01:02:* }", True),
    # all-of: every listed value matches some device value (duplicates fine)
    ("all-of { 01:01:* 01:02:* }", True),
    ("all-of { 01:01:* 03:*:* }", False),
    ("all-of { 01:02:00 01:02:00 }", True),
    # none-of: no listed value matches any device value
    ("none-of { 03:*:* }", True),
    ("none-of { 03:*:* 01:01:04 }", False),
    # equals: same count (alternate settings count), each listed value matched
    ("equals { 01:01:04 01:02:00 }", False),
    ("equals { 01:01:04 01:02:00 01:02:00 }", True),
    ("{ 01:01:04 01:02:00 01:02:00 }", True),
    ("equals { 01:02:00 01:01:04 01:02:00 }", True),
    # usbguard counts values, not distinct matches: three copies of one value
    ("equals { 01:01:04 01:01:04 01:01:04 }", True),
    ("equals { 01:*:* 01:*:* 01:*:* }", True),
    ("equals { 01:*:* }", False),
    ("01:*:*", False),  # a single value without operator is equals
    ("01:01:04", False),
    # equals-ordered: position by position
    ("equals-ordered { 01:01:04 01:02:00 01:02:00 }", True),
    ("equals-ordered { 01:02:00 01:01:04 01:02:00 }", False),
    ("equals-ordered { 01:*:* 01:02:* 01:02:00 }", True),
    ("equals-ordered { 01:01:04 01:02:00 }", False),
    # match-all: every device value is matched by a listed value
    ("match-all { 01:*:* }", True),
    ("match-all { 01:01:* 01:02:* }", True),
    ("match-all { 01:01:* }", False),
    ("match-all { 01:01:04 01:02:00 03:*:* }", True),
]
# fmt: on


@pytest.mark.parametrize(("values", "expected"), INTERFACE_TABLE)
def test_with_interface_operators(values: str, expected: bool) -> None:
    assert parse_rule(f"with-interface {values}").matches(AUDIO) is expected


# fmt: off
ID_TABLE = [
    ("1235:821a", True),
    ("1235:821A", True),  # hex is case-insensitive here (usbguard compares strings)
    ("1235:*", True),
    ("*:*", True),
    ("1235:821b", False),
    ("1236:*", False),
    ("one-of { 1c75:* 1235:821a }", True),
    ("one-of { 1c75:* 46f4:0001 }", False),
    ("all-of { 1235:* 1235:821a *:* }", True),
    ("all-of { 1235:* 1c75:* }", False),
    ("none-of { 1c75:* 0627:0001 }", True),
    ("none-of { 1c75:* 1235:* }", False),
    ("equals { 1235:821a }", True),
    ("equals { 1235:821a 1235:821a }", False),  # two values vs the device's one
    ("{ 1235:* 1c75:02cb }", False),
    ("equals-ordered { 1235:* }", True),
    ("match-all { 1c75:* 1235:* }", True),
    ("match-all { 1c75:* }", False),
]
# fmt: on


@pytest.mark.parametrize(("values", "expected"), ID_TABLE)
def test_id_operators(values: str, expected: bool) -> None:
    assert parse_rule(f"id {values}").matches(SCARLETT) is expected


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # A device without IDs has no id value: only none-of and match-all hold.
        ("id *:*", False),
        ("id one-of { *:* }", False),
        ("id all-of { *:* }", False),
        ("id none-of { *:* }", True),
        ("id match-all { 1235:* }", True),
        # ...and no interfaces: one-of fails, none-of and match-all hold vacuously.
        ("with-interface one-of { 01:*:* }", False),
        ("with-interface none-of { 01:*:* }", True),
        ("with-interface match-all { 03:*:* }", True),
        ("with-interface all-of { 03:*:* }", False),
        # Strings it does not report are "" (usbguard reads missing sysfs files so).
        ('serial ""', True),
        ('name ""', True),
        ('hash ""', True),
        ('with-connect-type ""', True),
        ('via-port "2-4"', True),
    ],
)
def test_unreadable_device(rule: str, expected: bool) -> None:
    assert parse_rule(rule).matches(UNREADABLE) is expected


# fmt: off
STRING_TABLE = [
    ('serial ""', True),
    ('serial "x"', False),
    ('serial one-of { "" "x" }', True),
    ('serial none-of { "" }', False),
    ('serial none-of { "x" "y" }', True),
    ('serial all-of { "" "" }', True),
    ('serial all-of { "" "x" }', False),
    ('serial { "" "" }', False),  # two values vs one
    ('serial equals-ordered { "" }', True),
    ('serial match-all { "x" "" }', True),
    ('serial match-all { "x" }', False),
    ('name "KeyLab mkII 61"', True),
    ('name "keylab mkii 61"', False),  # strings are exact
    ('name "KeyLab mkII"', False),  # and whole
    ('via-port "5-1"', True),
    ('via-port "5"', False),
    ('via-port "5-1.1"', False),
    # the kernel's port/connect_type of dummy_hcd's root port (no ACPI data)
    ('with-connect-type "unknown"', True),
    ('with-connect-type one-of { "hardwired" "hotplug" "not used" }', False),
    (f'hash "{KEYLAB_SHA256}"', True),
    ('hash "Ab3De5Gh7Jk9Lm1Np3Qr5St7Uv9Wx1Yz3Bc5Df7Gh9I="', False),
    ('label "anything"', True),  # labels do not take part in matching
]
# fmt: on


@pytest.mark.parametrize(("rule", "expected"), STRING_TABLE)
def test_string_attributes(rule: str, expected: bool) -> None:
    assert parse_rule(rule).matches(KEYLAB) is expected


def test_name_is_the_product_string_not_the_usb_ids_name() -> None:
    dev = UsbDevice(port="1-1", vendor_id=1, product_id=2, product=None, product_name="From ids")
    assert parse_rule('name ""').matches(dev)
    assert not parse_rule('name "From ids"').matches(dev)


def test_attributes_are_anded() -> None:
    rule = parse_rule("id 0627:0001 with-interface 03:01:01")
    assert [n for n, d in DEVICES.items() if rule.matches(d)] == ["qemu-kbd"]


def test_interface_without_alt_settings_uses_its_own_triple() -> None:
    dev = UsbDevice(port="1-2", interfaces=(Interface(0, 3, 1, 1), Interface(1, 3, 0, 0)))
    assert parse_rule("with-interface { 03:00:00 03:01:01 }").matches(dev)


def test_first_match() -> None:
    rules = [
        parse_rule("with-interface one-of { 03:01:01 }"),
        parse_rule("id 0627:*"),
        parse_rule("with-interface one-of { 01:*:* }"),
    ]
    assert first_match(rules, DEVICES["qemu-kbd"]) == 0
    assert first_match(rules, DEVICES["qemu-tablet"]) == 1
    assert first_match(rules, AUDIO) == 2
    assert first_match(rules, DEVICES["qemu-storage"]) is None
    assert first_match([], AUDIO) is None
    for device in DEVICES.values():
        expected = next((i for i, r in enumerate(rules) if r.matches(device)), None)
        assert first_match(rules, device) == expected


def test_rule_value_semantics() -> None:
    a = parse_rule("id 1235:821a")
    assert Rule("id 1235:821a") == a
    assert hash(Rule("id 1235:821a")) == hash(a)
    assert a.source == "id 1235:821a"
    assert parse_rule("id 1235:821A").attributes == a.attributes
    assert parse_rule("1235:821a").to_text() == "id 1235:821a"
    assert {a, Rule("id 1235:821a")} == {a}


# A remote device is the same capture with its device host set (what the VM
# host's inventory makes of a device host's export list).
REMOTE_SCARLETT = dataclasses.replace(SCARLETT, host="studio")


@pytest.mark.parametrize(
    ("rule", "local", "remote"),
    [
        ('via-host "studio"', False, True),
        ('via-host "other"', False, False),
        ('via-host ""', True, False),  # a device of this host has no device host
        ('via-host one-of { "a" "studio" }', False, True),
        ('via-host none-of { "studio" }', True, False),
        ('id 1235:821a via-host "studio"', False, True),
        ("id 1235:821a", True, True),  # a rule without via-host takes either
    ],
)
def test_via_host(rule: str, local: bool, remote: bool) -> None:
    r = parse_rule(rule)
    assert (r.matches(SCARLETT), r.matches(REMOTE_SCARLETT)) == (local, remote)


def test_remote_identity_names_its_host() -> None:
    assert REMOTE_SCARLETT.identity == SCARLETT.identity + "@studio"
    assert REMOTE_SCARLETT.qemu_id != SCARLETT.qemu_id
    assert REMOTE_SCARLETT.to_json()["host"] == "studio"
    assert SCARLETT.to_json()["host"] is None
