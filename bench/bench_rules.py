"""How fast the rule engine decides: 20 rules of every kind against 1,000 devices.

    .venv/bin/python bench/bench_rules.py

The devices are the captured ones (tests/fixtures/sysfs/{mixed,gadgets}),
copied with other ports and serials; the 20 rules match almost none of them,
so ``first_match`` looks at every rule: the worst case.  The alternative in
the same run parses the rule text again for every device, which is what a
tool that re-reads its rules per event would pay.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from vmplug.host.sysfs import scan
from vmplug.model import UsbDevice
from vmplug.rules import first_match, parse_rule

CAPTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sysfs"
RULES = [
    "id 1235:821b",
    "id 1c75:*",
    "id one-of { 0001:0002 0003:* 0005:0006 }",
    'serial "nope"',
    'name "nope"',
    'via-port "9-9"',
    'with-connect-type "hardwired"',
    "with-interface 0e:*:*",
    "with-interface one-of { 0e:*:* 0b:00:00 }",
    "with-interface all-of { 01:01:* 0e:*:* }",
    "with-interface none-of { 01:*:* 03:*:* 08:*:* 09:*:* fe:*:* 02:*:* 0a:*:* }",
    "with-interface equals { 03:01:01 03:00:00 }",
    "with-interface match-all { 0e:*:* }",
    'id 46f4:* serial "x"',
    'id 0627:0001 name "QEMU USB Mouse"',
    'hash "nope"',
    'serial none-of { "" } id 9999:*',
    "with-interface equals-ordered { 01:01:00 01:03:01 }",
    'name one-of { "a" "b" "c" }',
    'via-port one-of { "8-1" "8-2" }',
]


def devices(n: int) -> list[UsbDevice]:
    base = [d for cap in ("mixed", "gadgets") for d in scan(CAPTURES / cap) if not d.is_root_hub]
    return [
        dataclasses.replace(d, port=f"{i % 8 + 1}-{i % 4 + 1}.{i % 7 + 1}", serial=f"{d.serial}{i}")
        for i, d in ((i, base[i % len(base)]) for i in range(n))
    ]


def best_of(fn: object, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    devs = devices(1000)
    rules = [parse_rule(t) for t in RULES]
    matched = [first_match(rules, d) for d in devs]
    compiled = best_of(lambda: [first_match(rules, d) for d in devs])
    reparse = best_of(lambda: [first_match([parse_rule(t) for t in RULES], d) for d in devs], 3)
    print(f"{len(devs)} devices x {len(rules)} rules ({matched.count(None)} match none)")
    per_device_us = compiled / len(devs) * 1e6
    print(f"  parsed once        {compiled * 1000:8.1f} ms  ({per_device_us:.1f} us/device)")
    print(f"  parsed per device  {reparse * 1000:8.1f} ms  ({reparse / compiled:.0f}x slower)")


if __name__ == "__main__":
    main()
