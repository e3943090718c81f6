"""EarlyRules: what the rules decide from a uevent alone (vid:pid and port), checked
against Config.decide on full devices read from the captured tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmplug.config import parse_config
from vmplug.engine.desired import UNDECIDED, EarlyRules, target
from vmplug.host.inventory import read_devices

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs" / "mixed"

VMS = '[vm.a]\nqmp = "/tmp/a.sock"\n\n[vm.b]\nqmp = "/tmp/b.sock"\n\n'


def rules(*pairs: tuple[str, str]) -> EarlyRules:
    text = VMS + "".join(
        f"[[rule]]\n{'block = true' if t == 'block' else f'attach = {t!r}'}\nmatch = '{m}'\n\n"
        for t, m in pairs
    )
    return EarlyRules(parse_config(text))


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((("a", "id 0627:0001"),), "a"),
        ((("a", "id 0627:*"),), "a"),
        ((("a", 'via-port "2-2.4.2"'),), "a"),
        ((("a", 'id 0627:0001 via-port one-of { "1-1" "2-2.4.2" }'),), "a"),
        ((("a", 'id 0627:0001 label "kbd"'),), "a"),
        ((("block", "id 0627:0001"), ("a", "id 0627:0001")), None),
        ((("a", "id 1234:5678"),), None),
        # a rule that cannot match by id or port is passed over, whatever else it asks
        ((("b", 'id 1234:5678 serial "x"'), ("a", "id 0627:0001")), "a"),
        ((("b", 'via-port "9-9" with-interface 03:*:*'), ("a", "id 0627:0001")), "a"),
        # a rule that may match but asks for more: undecided
        ((("a", 'id 0627:0001 serial "68284-0000:00:0b.0-2.4.2"'),), UNDECIDED),
        ((("a", "with-interface 03:*:*"),), UNDECIDED),
        ((("b", 'name "QEMU USB Keyboard"'), ("a", "id 0627:0001")), UNDECIDED),
        ((("a", 'with-connect-type "hotplug"'),), UNDECIDED),
    ],
)
def test_decides_only_what_the_uevent_answers(
    pairs: tuple[tuple[str, str], ...], expected: object
) -> None:
    got = rules(*pairs).target(0x0627, 0x0001, "2-2.4.2")
    assert got is expected if expected is UNDECIDED else got == expected


def test_a_decision_agrees_with_the_rules_on_the_device_read() -> None:
    """Wherever EarlyRules decides, the full device read decides the same."""
    devices = [d for d in read_devices(FIXTURE) if not d.is_hub and not d.is_root_hub]
    assert devices
    cases = [
        (("a", "id 0627:0001"),),
        (("block", 'via-port "1-3"'), ("a", "id 0627:*")),
        (("b", 'id 0627:0001 via-port "2-2.4.2"'), ("a", 'via-port one-of { "1-3" "2-2.4.2" }')),
    ]
    decided = 0
    for pairs in cases:
        early = rules(*pairs)
        for dev in devices:
            assert dev.vendor_id is not None and dev.product_id is not None
            got = early.target(dev.vendor_id, dev.product_id, dev.port)
            if got is not UNDECIDED:
                decided += 1
                assert got == target(dev, early.config), (pairs, dev.port)
    assert decided == len(cases) * len(devices)


def test_answers_are_remembered_per_device_kind_and_port() -> None:
    """A replug asks again what it asked last time (the answer is kept); another
    port or another vid:pid is asked afresh."""
    r = rules(("a", 'id 0627:0001 via-port "2-2.4.2"'))
    assert r.target(0x0627, 0x0001, "2-2.4.2") == "a"
    assert r.target(0x0627, 0x0001, "1-1") is None
    assert r.target(0x0627, 0x0002, "2-2.4.2") is None
    assert r.target(0x0627, 0x0001, "2-2.4.2") == "a"
    assert r.target(0x0627, 0x0001, "1-1") is None
