"""Parser details: canonical text, strings and escapes, error positions and rendering."""

from __future__ import annotations

import pytest

from vmplug.cli.errors import exit_status
from vmplug.errors import UsageError
from vmplug.rules import (
    DeviceIdPattern,
    InterfacePattern,
    RuleSyntaxError,
    SetOperator,
    parse_rule,
)
from vmplug.rules.grammar import escape_string, parse


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("id 1235:821a", "id 1235:821a"),
        ("  id   1235:821A  ", "id 1235:821a"),
        ("1235:821a", "id 1235:821a"),
        ('match 1235:* serial "x"', 'id 1235:* serial "x"'),
        ("id *:*", "id *:*"),
        ("id {1235:821a}", "id 1235:821a"),
        ("id equals { 1235:821a }", "id 1235:821a"),
        ("id{ 1235:821a 1c75:02cb }", "id { 1235:821a 1c75:02cb }"),
        ("id one-of{1235:821a}", "id one-of { 1235:821a }"),
        ("with-interface 0E:01:*", "with-interface 0e:01:*"),
        (
            "with-interface equals-ordered { 01:*:* 03:00:00 }",
            "with-interface equals-ordered { 01:*:* 03:00:00 }",
        ),
        ("with-interface match-all { 03:*:* }", "with-interface match-all { 03:*:* }"),
        ('name "a b"\tserial "c"', 'name "a b" serial "c"'),
        ('via-port none-of { "1-1" "1-2" }', 'via-port none-of { "1-1" "1-2" }'),
        ('with-connect-type "not used"', 'with-connect-type "not used"'),
        ('hash "AbC+/=" label "x"', 'hash "AbC+/=" label "x"'),
        ("id 1235:821a # a comment", "id 1235:821a"),
        ('id 1235:821a\r\nname "x"\r\n', 'id 1235:821a name "x"'),
        ('name "a"# comment', 'name "a"'),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    rule = parse_rule(text)
    assert rule.to_text() == canonical
    assert rule.source == text
    assert parse_rule(canonical).attributes == rule.attributes


def test_ast() -> None:
    attrs = parse("id one-of { 1235:* *:* 1c75:02cb } with-interface 01:02:*")
    assert attrs[0].name == "id"
    assert attrs[0].operator is SetOperator.ONE_OF
    assert attrs[0].values == (
        DeviceIdPattern(0x1235, None),
        DeviceIdPattern(None, None),
        DeviceIdPattern(0x1C75, 0x02CB),
    )
    assert attrs[1].operator is SetOperator.EQUALS
    assert attrs[1].values == (InterfacePattern((1, 2)),)
    assert attrs[1].offset == 35


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r'""', ""),
        (r'"\""', '"'),
        (r'"\\"', "\\"),
        (r'"\x07\x0a\x09"', "\a\n\t"),
        (r'"\x41\x62"', "Ab"),
        (r'"\x4A\x4a"', "JJ"),
        (r'"caf\xc3\xa9"', "café"),  # \xHH are bytes; UTF-8 sequences decode
        ('"café"', "café"),
        (r'"\xff"', "\udcff"),  # a byte that is not UTF-8 stays one (surrogate escape)
        ('"a # not a comment {}"', "a # not a comment {}"),
        ('"it\'s"', "it's"),
    ],
)
def test_string_values(literal: str, value: str) -> None:
    (attr,) = parse(f"serial {literal}")
    assert attr.values == (value,)
    assert parse(f"serial {escape_string(value)}") == (attr,)


def test_escape_string() -> None:
    assert escape_string('a"b\\c') == r'"a\"b\\c"'
    assert escape_string("\n\x00\x7f") == r'"\x0a\x00\x7f"'
    assert escape_string("\udcff") == r'"\xff"'
    assert escape_string("Ünïcødé") == '"Ünïcødé"'


def test_error_is_a_usage_error() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("id 1235:821a name")
    err = info.value
    assert isinstance(err, UsageError)
    assert exit_status(err) == 2  # the CLI maps errors to exit codes
    assert err.message == "expected a value after 'name'"
    assert err.text == "id 1235:821a name"
    assert (err.line, err.column, err.length) == (1, 17, 1)
    assert str(err) == "1:18: expected a value after 'name'"


def test_render() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule('name "x" vendor 1235')
    assert info.value.render() == (
        "<rule>:1:10: error: unknown attribute 'vendor': expected an attribute: id, serial, "
        "name, hash, parent-hash, via-port, via-host, with-interface, with-connect-type, label\n"
        'name "x" vendor 1235\n'
        "         ^^^^^^"
    )
    assert info.value.render("vmplug.toml").startswith("vmplug.toml:1:10: error: ")


def test_render_second_line_and_crlf() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("id 1235:821a\r\n  serial x\r\n")
    err = info.value
    assert (err.line, err.column) == (2, 9)
    assert err.render().splitlines() == [
        "<rule>:2:10: error: expected a quoted string (\"...\"), got 'x'",
        "  serial x",
        "         ^",
    ]


def test_render_keeps_tabs_so_carets_line_up() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("id\t*:0001")
    assert info.value.render().splitlines()[1:] == ["id\t*:0001", "  \t^^^^^^"]


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 0, "empty rule"),
        ("   ", 3, "empty rule"),
        ("# just a comment", 16, "empty rule"),
        ("allow", 0, "target 'allow' does not belong"),
        ("block id 1235:821a", 0, "target 'block'"),
        ("reject", 0, "target 'reject'"),
        ("device id 1:2", 0, "target 'device'"),
        ("ID 1235:821a", 0, "unknown attribute 'ID'"),
        ("id 1235:821a reject", 13, "can only come first"),
        ("id 1235:821a match", 13, "can only come first"),
        ("id", 2, "expected a value after 'id'"),
        ("id 1235", 3, "bad device ID '1235'"),
        ("id 1235:821a:0", 3, "bad device ID"),
        ("id 12345:821a", 3, "bad device ID"),
        ("id 1235:**", 3, "bad device ID"),
        ("id -235:821a", 3, "bad device ID"),
        ("id *:0001", 3, "wildcard vendor"),
        ("id { 1235:* *:1 }", 12, "bad device ID '*:1'"),
        ("with-interface 1:2:3", 15, "bad interface type"),
        ("with-interface 01:02:03:04", 15, "bad interface type"),
        ("with-interface *:01:*", 15, "the class cannot be '*'"),
        ("with-interface 01:*:01", 15, "wildcard subclass"),
        ("with-interface one-of { 01:*:* name }", 31, "unclosed '{'"),
        ('serial "abc', 7, "unterminated string"),
        ('serial "abc\nname "x"', 7, "unterminated string"),
        ('serial "a\\', 7, "unterminated string"),
        ('serial "\\z"', 8, "unknown escape sequence '\\z'"),
        ('serial "\\n"', 8, "unknown escape sequence '\\n'"),  # as usbguard: not \a..\v
        ('serial "\\0"', 8, "unknown escape sequence"),
        ('serial "\\\'"', 8, "unknown escape sequence"),
        ('serial "\\x"', 8, "two hex digits"),
        ('serial "\\x1"', 8, "two hex digits"),
        ('serial { "a"', 7, "unclosed '{'"),
        ("serial one-of", 13, "expected '{' after 'one-of'"),
        ("serial one-of }", 14, "expected '{' after 'one-of'"),
        ("serial some {", 7, "unknown set operator 'some'"),
        ('serial match { "a" }', 7, "unknown set operator 'match'"),
        ("serial {}", 8, "empty set"),
        ('serial "a" }', 11, "got '}'"),
        ('serial "a" {', 11, "got '{'"),
        ("id 1235:821a 1c75:02cb", 13, "to match a device ID write"),
        ("id 1235:821a {", 13, "got '{'"),
        ('serial "a" serial "b"', 11, "duplicate attribute 'serial'"),
        ("1235:821a id 1235:821a", 10, "duplicate attribute 'id'"),
        ('label "a" label "b"', 10, "duplicate attribute 'label'"),
        ("if true", 0, "conditions"),
        ('serial"x"', 6, "expected a space"),
        ('serial "x""y"', 10, "expected a space after"),
    ],
)
def test_errors(text: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    err = info.value
    assert fragment in err.message
    assert err.column == column, err.render()
    assert err.text == text
