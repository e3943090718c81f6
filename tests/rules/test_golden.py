"""Golden files: tests/golden/rules/good/*.rule -> *.matches, bad/*.rule -> *.err.

A ``.rule`` file holds one rule (its final newline is not part of it).  For a good
rule, ``.matches`` lists the fixture devices (rule_devices.DEVICES) it matches,
one per line; for a bad rule, ``.err`` is the rendered error, carets included.
Run with ``VMPLUG_UPDATE_GOLDEN=1`` to rewrite the expected files, then review
the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.devices import DEVICES
from vmplug.rules import RuleSyntaxError, parse_rule

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "rules"
UPDATE = os.environ.get("VMPLUG_UPDATE_GOLDEN") == "1"


def _rule_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").removesuffix("\n")


def _check(expected_path: Path, actual: str) -> None:
    if UPDATE:
        expected_path.write_text(actual, encoding="utf-8")
        return
    assert expected_path.exists(), f"{expected_path} is missing: run with VMPLUG_UPDATE_GOLDEN=1"
    assert actual == expected_path.read_text(encoding="utf-8")


GOOD = sorted((GOLDEN / "good").glob("*.rule"))
BAD = sorted((GOLDEN / "bad").glob("*.rule"))


def test_there_are_goldens() -> None:
    assert len(GOOD) >= 20
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good(path: Path) -> None:
    rule = parse_rule(_rule_text(path))
    matched = [name for name, device in DEVICES.items() if rule.matches(device)]
    _check(path.with_suffix(".matches"), "".join(f"{name}\n" for name in matched))
    # The canonical text means the same thing.
    again = parse_rule(rule.to_text())
    assert again.attributes == rule.attributes
    assert [n for n, d in DEVICES.items() if again.matches(d)] == matched


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad(path: Path) -> None:
    text = _rule_text(path)
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    rendered = info.value.render(f"{path.parent.name}/{path.name}")
    _check(path.with_suffix(".err"), rendered + "\n")
