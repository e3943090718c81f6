"""vmplug's rule parser against usbguard's own (``usbguard-rule-parser``, from the
Debian package ``usbguard``): what one accepts the other accepts, with the same
meaning, over the rule goldens (tests/golden/rules); and usbguard reads every
rule ``vmplug list --rules`` makes as its own canonical text.  (That vmplug
reads every rule usbguard generates is test_usbguard_policy's.)

A vmplug rule is usbguard's rule without its target: usbguard reads it as
``allow RULE`` (or as written, when it starts with usbguard's ``match``).  The
exceptions are in EXCEPTIONS, each documented in :mod:`vmplug.rules.grammar`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmplug.host.sysfs import scan
from vmplug.rules import Attribute, RuleSyntaxError, parse_rule
from vmplug.rules.device_rule import device_rule, usbguard_quote

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "rules"
RULES = sorted([*(GOLDEN / "good").glob("*.rule"), *(GOLDEN / "bad").glob("*.rule")])
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PARSER = shutil.which("usbguard-rule-parser")

#: Goldens only one side accepts, and why (see vmplug.rules.grammar's docstring).
EXCEPTIONS = {
    # usbguard: a line that is only a comment is no rule, and `allow` alone is a
    # catch-all; vmplug: a config rule that matches everything is a slip.
    "bad/comment-only": "an empty rule is an error in vmplug",
    "bad/match-only": "an empty rule is an error in vmplug",
    # vmplug has no daemon state for `if` conditions to test.
    "bad/condition": "rule conditions are not supported",
    # usbguard's rules are one line each; a vmplug rule is a TOML string, which
    # may span lines.
    "good/multi-line": "vmplug lets newlines separate tokens",
    # vmplug's own attribute: the device host of a remote device (usbguard has none).
    "good/via-host-local": "via-host is vmplug's, not usbguard's",
    "good/via-host-set": "via-host is vmplug's, not usbguard's",
    "good/via-host-studio": "via-host is vmplug's, not usbguard's",
}

needs_parser = pytest.mark.skipif(
    PARSER is None, reason="usbguard-rule-parser not found: apt-get install usbguard"
)


def usbguard_parse(rule: str) -> str | None:
    """usbguard's canonical text for ``rule`` (a vmplug rule), or None if it refuses it."""
    assert PARSER is not None
    text = rule if rule.lstrip().startswith("match") else f"allow {rule}"
    done = subprocess.run([PARSER, text], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return None
    out = [ln for ln in done.stdout.splitlines() if ln.startswith("OUTPUT: ")]
    assert len(out) == 1, done.stdout
    return out[0].removeprefix("OUTPUT: ")


def vmplug_accepts(rule: str) -> bool:
    try:
        parse_rule(rule)
    except RuleSyntaxError:
        return False
    return True


def _target_stripped(canonical: str) -> str:
    for target in ("allow ", "match "):
        if canonical.startswith(target):
            return canonical.removeprefix(target)
    raise AssertionError(canonical)


def test_there_are_goldens_and_the_exceptions_exist() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in RULES}
    assert len(names) >= 60
    assert set(EXCEPTIONS) <= names


@needs_parser
@pytest.mark.parametrize("path", RULES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_both_parsers_agree_on_the_golden(path: Path) -> None:
    name = f"{path.parent.name}/{path.stem}"
    rule = path.read_text(encoding="utf-8").removesuffix("\n")
    ours = vmplug_accepts(rule)
    theirs = usbguard_parse(rule)
    assert ours == (path.parent.name == "good")  # the goldens' own verdict
    if name in EXCEPTIONS:
        assert ours != (theirs is not None), f"{name} is no exception any more: drop it"
        return
    assert ours == (theirs is not None), f"vmplug {ours}, usbguard {theirs is not None}: {rule!r}"
    if theirs is not None:
        # Same meaning: usbguard's canonical form (its attribute order) reads as the
        # same attributes.
        def key(a: Attribute) -> str:
            return a.name

        again = sorted(parse_rule(_target_stripped(theirs)).attributes, key=key)
        assert again == sorted(parse_rule(rule).attributes, key=key), theirs


#: More rules the goldens do not spell out: escapes, wildcards, sets, spacing.
PROBES = [
    "id 1235:821A", 'serial "\\a"', 'serial "\\n"', 'serial "\\q"', 'serial "\\101"',
    "with-interface {03:00:00}", "with-interface { 03:00:00}", "with-interface 03:*:01",
    "with-interface *:*:*", "id *:821a", "id 1235:*", "id *:*", 'serial ""',
    'with-connect-type ""', 'parent-hash ""', 'hash "x" hash "y"', "id 1235:821a id 1235:821a",
    "with-interface equals-ordered { 03:00:00 }", "with-interface match-all { 03:00:00 }",
    'serial one-of { "a" "b" }', 'serial {"a"}', 'name "a\\x41"', 'name "\\xc3\\xa9"', 'name "é"',
    "id 1235:821a # c", 'id 1235:821a\tserial "x"', "with-interface { }", 'serial all-of { "a" }',
    'serial none-of { "a" }', "with-interface 3:0:0", "id 12345:1", 'serial "\\x4"',
    'serial "a\\\\"', " id 1235:821a", "ID 1235:821a", 'name "x" 1235:821a', "1235:821a",
    '1235:821a serial "x"', "with-interface one-of { 03:00:00 08:*:* }",
    'via-port one-of { "1-1" "1-2" }', "with-interface 03:00:00 03:01:01",
    'label "a" label "b"', "id 1235:821a ", "match id 1235:821a",
]  # fmt: skip
PROBE_EXCEPTIONS = {
    # usbguard's parser checks the wrong keyword for a repeated label and merges
    # them; vmplug holds every attribute to once per rule.
    'label "a" label "b"': "a repeated attribute is an error in vmplug",
    # usbguard-rule-parser refuses a rule ending in a space (its rules files trim
    # their lines); vmplug's rules come from TOML strings, where it is harmless.
    "id 1235:821a ": "trailing whitespace is fine in vmplug",
}


@needs_parser
@pytest.mark.parametrize("rule", PROBES)
def test_both_parsers_agree_on_the_probe(rule: str) -> None:
    ours = vmplug_accepts(rule)
    theirs = usbguard_parse(rule)
    if rule in PROBE_EXCEPTIONS:
        assert ours != (theirs is not None), f"{rule!r} is no exception any more: drop it"
        return
    assert ours == (theirs is not None), f"vmplug {ours}, usbguard {theirs}: {rule!r}"


def _generated_rules() -> list[str]:
    """The rules vmplug makes for the lab captures and recording trees."""
    out: list[str] = []
    for capture in sorted((FIXTURES / "sysfs").iterdir()):
        if (capture / "bus").is_dir():
            out += [r.text for r in map(device_rule, scan(capture)) if r.text]
    return out


@needs_parser
def test_usbguard_reads_vmplug_list_rules_as_written() -> None:
    """Each `vmplug list --rules` line is what usbguard prints back for it: usbguard's
    own canonical form (order, quoting, set syntax)."""
    rules = _generated_rules()
    assert len(rules) >= 30
    for rule in rules:
        assert usbguard_parse(rule) == f"allow {rule}"


@needs_parser
@pytest.mark.parametrize(
    "value", ["", 'say "hi"', "back\\slash", "tab\there", "\x01\x7f", "café", "Ünïcødé ✓", "a#b{}"]
)
def test_strings_are_quoted_as_usbguard_quotes_them(value: str) -> None:
    quoted = usbguard_quote(value)
    assert usbguard_parse(f"name {quoted}") == f"allow name {quoted}"  # its canonical form
    (attr,) = parse_rule(f"name {quoted}").attributes
    assert attr.values == (value,)
