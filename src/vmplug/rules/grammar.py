r"""Rule text -> attribute list: a hand-written tokenizer and recursive-descent parser.

The language is the attribute part of a usbguard rule (``usbguard-rules.conf(5)``);
the target (allow/block/reject) lives in vmplug's config, not in the text::

    rule       := [ "match" ] [ device-id ] attribute*  [ "#" comment ]
    attribute  := NAME value | NAME [ OPERATOR ] "{" value+ "}"
    NAME       := id | serial | name | hash | parent-hash | via-port | via-host
                | with-interface | with-connect-type | label
    OPERATOR   := all-of | one-of | none-of | equals | equals-ordered | match-all

What usbguard's PEGTL grammar (``src/Library/RuleParser/Grammar.hpp``) and its
value checks (``USBDeviceID::checkDeviceID``, ``USBInterfaceType(string)`` in
``src/Library/public/usbguard/USB.cpp``) accept is accepted here with the same
meaning, except:

* a target (allow, block, reject, device) is an error: the config holds it;
  ``match``, usbguard's neutral target for partial rules, may lead;
* ``if`` conditions are errors: they test the daemon's state (time, what it
  allowed before), not the device, and vmplug has no such state;
* a rule with no attribute (``match`` alone, or only a comment) is an error:
  in a config it is more likely a slip than a wish to take every device;
* hex digits are case-insensitive (usbguard compares the ID strings as written,
  so its ``id 1235:821A`` never matches);
* a string's escapes are usbguard's working ones, ``\" \\ \xHH``: its grammar
  admits ``\a \n \101``... too, but ``Utility::unescapeString`` then refuses
  them ("Unknown escape sequence"), so vmplug refuses them as well;
* trailing whitespace is fine (``usbguard-rule-parser`` refuses a rule that
  ends in a space; usbguard's rules files trim their lines);
* any whitespace, newlines included, separates tokens, and braces need none;
* ``label`` may appear once, like every other attribute (usbguard's parser
  checks the wrong keyword for it);
* ``via-host "NAME"`` is vmplug's own: the device host (``[host.NAME]``) a
  remote device is plugged into; a device of this host has none, so
  ``via-host ""`` selects local devices only (usbguard has no such attribute).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from vmplug.errors import UsageError

__all__ = [
    "ATTRIBUTE_NAMES",
    "Attribute",
    "DeviceIdPattern",
    "InterfacePattern",
    "RuleSyntaxError",
    "SetOperator",
    "Value",
    "escape_string",
    "format_attributes",
    "parse",
]


class RuleSyntaxError(UsageError):
    """A rule's text is not valid.  ``column`` is 0-based within ``line`` (1-based)."""

    def __init__(
        self, message: str, text: str, column: int, line: int = 1, *, length: int = 1
    ) -> None:
        super().__init__(f"{line}:{column + 1}: {message}")
        self.message = message
        self.text = text
        self.column = column
        self.line = line
        #: How many characters the bad token spans (the number of carets).
        self.length = max(1, length)

    @classmethod
    def at(cls, message: str, text: str, offset: int, length: int = 1) -> RuleSyntaxError:
        """An error at ``offset`` (0-based, into the whole ``text``)."""
        line = text.count("\n", 0, offset) + 1
        start = text.rfind("\n", 0, offset) + 1
        return cls(message, text, offset - start, line, length=length)

    def render(self, source: str | None = None) -> str:
        """``source:line:col: error: message``, the line, and carets under the bad token."""
        lines = self.text.split("\n")
        raw_line = lines[self.line - 1] if 0 < self.line <= len(lines) else ""
        text_line = raw_line.removesuffix("\r")  # a CR would send the carets home
        col = self.column
        # Keep tabs so the carets line up with the text above them.
        pad = "".join("\t" if c == "\t" else " " for c in raw_line[:col].ljust(col))
        carets = "^" * max(1, min(self.length, len(text_line) - col))
        where = f"{source or '<rule>'}:{self.line}:{col + 1}"
        return f"{where}: error: {self.message}\n{text_line}\n{pad}{carets}"


class SetOperator(enum.Enum):
    """usbguard's multiset operators (``Rule::SetOperator``), by their rule keyword."""

    ALL_OF = "all-of"
    ONE_OF = "one-of"
    NONE_OF = "none-of"
    EQUALS = "equals"
    EQUALS_ORDERED = "equals-ordered"
    MATCH_ALL = "match-all"


@dataclass(frozen=True, slots=True)
class DeviceIdPattern:
    """``vvvv:pppp``; ``None`` is usbguard's ``*``.  Only ``*:*`` and ``vvvv:*`` wildcard."""

    vendor: int | None
    product: int | None

    def __str__(self) -> str:
        vendor = "*" if self.vendor is None else f"{self.vendor:04x}"
        product = "*" if self.product is None else f"{self.product:04x}"
        return f"{vendor}:{product}"


@dataclass(frozen=True, slots=True)
class InterfacePattern:
    """``cc:ss:pp`` as a prefix: ``(cc,)`` is ``cc:*:*``, ``(cc, ss)`` is ``cc:ss:*``."""

    prefix: tuple[int, ...]

    def __str__(self) -> str:
        parts = [f"{b:02x}" for b in self.prefix] + ["*"] * (3 - len(self.prefix))
        return ":".join(parts)


Value = str | DeviceIdPattern | InterfacePattern


@dataclass(frozen=True, slots=True)
class Attribute:
    """One ``name [operator] values`` clause."""

    name: str
    operator: SetOperator
    values: tuple[Value, ...]
    #: Where the attribute's name stands in the parsed text (not part of equality).
    offset: int = field(default=0, compare=False)

    def to_text(self) -> str:
        # usbguard's Attribute::toRuleString: the set form when there is more than
        # one value or the operator is not the default ``equals``.
        vals = [escape_string(v) if isinstance(v, str) else str(v) for v in self.values]
        if len(vals) == 1 and self.operator is SetOperator.EQUALS:
            return f"{self.name} {vals[0]}"
        op = "" if self.operator is SetOperator.EQUALS else f"{self.operator.value} "
        return f"{self.name} {op}{{ {' '.join(vals)} }}"


#: value kind of each attribute: "id", "interface" or "string".
_KINDS = {
    "id": "id",
    "serial": "string",
    "name": "string",
    "hash": "string",
    "parent-hash": "string",
    "via-port": "string",
    "via-host": "string",
    "with-interface": "interface",
    "with-connect-type": "string",
    "label": "string",
}
ATTRIBUTE_NAMES = tuple(_KINDS)
_EXPECT_ATTR = "expected an attribute: " + ", ".join(ATTRIBUTE_NAMES)
_OPERATORS = {op.value: op for op in SetOperator}
_EXPECT_OP = ", ".join(_OPERATORS)
_TARGETS = ("allow", "block", "reject", "device")

# --------------------------------------------------------------------------- strings

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\"}
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPE_LIST = '\\" \\\\ \\xHH'


def escape_string(value: str) -> str:
    r"""``value`` as a quoted rule string that parses back to ``value``.

    Like usbguard's ``Utility::escapeString``: ``"`` and ``\`` get a backslash,
    control characters become ``\xHH``.  Bytes that were not UTF-8 (held as
    surrogate escapes U+DC80..U+DCFF) go back to ``\xHH`` too; other printable
    characters stay as they are.
    """
    out = ['"']
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        elif "\udc80" <= c <= "\udcff":
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


# --------------------------------------------------------------------------- tokens

_WORD = "word"
_STRING = "string"
_LBRACE = "{"
_RBRACE = "}"
_EOF = "end"

_WORD_RE = re.compile(r'[^\s{}"#]+')


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str  # the source text of the token
    offset: int
    value: str = ""  # a string token's unescaped value

    def describe(self) -> str:
        if self.kind == _EOF:
            return "the end of the rule"
        if self.kind == _STRING:
            return f"the string {self.text}"
        return f"'{self.text}'"


def _string(text: str, start: int) -> _Token:
    """The quoted string that starts at ``text[start] == '"'``."""
    out: list[str] = []
    raw = bytearray()  # a run of \xHH bytes, decoded together (UTF-8 sequences)
    i = start + 1
    n = len(text)
    while True:
        if i >= n or text[i] in "\r\n":
            raise RuleSyntaxError.at(
                "unterminated string: expected a closing '\"' on the same line", text, start
            )
        c = text[i]
        if c == '"':
            break
        if c != "\\":
            if raw:
                out.append(raw.decode("utf-8", "surrogateescape"))
                raw.clear()
            out.append(c)
            i += 1
            continue
        esc = text[i + 1] if i + 1 < n else ""
        if esc in ("", "\r", "\n"):
            raise RuleSyntaxError.at(
                "unterminated string: expected a closing '\"' after the final '\\'",
                text,
                start,
            )
        if esc == "x":
            digits = text[i + 2 : i + 4]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise RuleSyntaxError.at(
                    "bad escape sequence: expected two hex digits after \\x",
                    text,
                    i,
                    2 + len(digits),
                )
            raw.append(int(digits, 16))
            i += 4
            continue
        if esc not in _SIMPLE_ESCAPES:
            raise RuleSyntaxError.at(
                f"unknown escape sequence '\\{esc}': expected one of {_ESCAPE_LIST}", text, i, 2
            )
        if raw:
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()
        out.append(_SIMPLE_ESCAPES[esc])
        i += 2
    if raw:
        out.append(raw.decode("utf-8", "surrogateescape"))
    end = i + 1
    if end < n and not (text[end].isspace() or text[end] in "{}#"):
        raise RuleSyntaxError.at("expected a space after the closing '\"'", text, end)
    return _Token(_STRING, text[start:end], start, "".join(out))


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":  # a comment runs to the end of the line
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
        elif c in "{}":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c == '"':
            tok = _string(text, i)
            tokens.append(tok)
            i += len(tok.text)
        else:
            m = _WORD_RE.match(text, i)
            assert m is not None  # c is none of the characters the pattern excludes
            tokens.append(_Token(_WORD, m.group(), i))
            i = m.end()
            if i < n and text[i] == '"':
                raise RuleSyntaxError.at(
                    f"expected a space between '{m.group()}' and the string", text, i
                )
    tokens.append(_Token(_EOF, "", n))
    return tokens


# --------------------------------------------------------------------------- values

_ID_PART = re.compile(r"[0-9a-fA-F]{4}|\*")
_IF_PART = re.compile(r"[0-9a-fA-F]{2}|\*")


def _device_id(tok: _Token, text: str) -> DeviceIdPattern:
    def bad(why: str) -> RuleSyntaxError:
        return RuleSyntaxError.at(
            f"bad device ID '{tok.text}': {why}", text, tok.offset, len(tok.text)
        )

    if tok.kind != _WORD:
        raise RuleSyntaxError.at(
            f"expected a device ID (vvvv:pppp, e.g. 1235:821a or 1235:*), got {tok.describe()}",
            text,
            tok.offset,
            len(tok.text),
        )
    parts = tok.text.split(":")
    if len(parts) != 2 or not all(_ID_PART.fullmatch(p) for p in parts):
        raise bad("expected vvvv:pppp, 4 hex digits or '*' each")
    vendor, product = parts
    if vendor == "*" and product != "*":  # usbguard's USBDeviceID::checkDeviceID
        raise bad("a wildcard vendor needs a wildcard product: write *:*")
    return DeviceIdPattern(
        None if vendor == "*" else int(vendor, 16),
        None if product == "*" else int(product, 16),
    )


def _interface(tok: _Token, text: str) -> InterfacePattern:
    def bad(why: str) -> RuleSyntaxError:
        return RuleSyntaxError.at(
            f"bad interface type '{tok.text}': {why}", text, tok.offset, len(tok.text)
        )

    if tok.kind != _WORD:
        raise RuleSyntaxError.at(
            f"expected an interface type (cc:ss:pp, e.g. 01:*:* or 03:01:01), got {tok.describe()}",
            text,
            tok.offset,
            len(tok.text),
        )
    parts = tok.text.split(":")
    if len(parts) != 3 or not all(_IF_PART.fullmatch(p) for p in parts):
        raise bad("expected cc:ss:pp, 2 hex digits or '*' each")
    if parts[0] == "*":  # usbguard's interface_value: the class is always hex2
        raise bad("the class cannot be '*' (usbguard matches at least the class)")
    if parts[1] == "*" and parts[2] != "*":  # USBInterfaceType's mask check
        raise bad("a wildcard subclass needs a wildcard protocol: write cc:*:*")
    return InterfacePattern(tuple(int(p, 16) for p in parts if p != "*"))


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def next(self) -> _Token:
        tok = self.tokens[self.pos]
        if tok.kind != _EOF:
            self.pos += 1
        return tok

    def error(self, message: str, tok: _Token) -> RuleSyntaxError:
        return RuleSyntaxError.at(message, self.text, tok.offset, len(tok.text))

    def value(self, kind: str, tok: _Token) -> Value:
        if kind == "id":
            return _device_id(tok, self.text)
        if kind == "interface":
            return _interface(tok, self.text)
        if tok.kind != _STRING:
            raise self.error(f'expected a quoted string ("..."), got {tok.describe()}', tok)
        return tok.value

    def attribute(self, name_tok: _Token) -> Attribute:
        name = name_tok.text
        kind = _KINDS[name]
        tok = self.next()
        operator = SetOperator.EQUALS
        brace = tok if tok.kind == _LBRACE else None
        if (
            brace is None
            and tok.kind == _WORD
            and self.peek().kind == _LBRACE
            and (tok.text in _OPERATORS or ":" not in tok.text)
        ):
            # ``name OPERATOR {``: a word (not a value) right before a brace is an operator.
            if tok.text not in _OPERATORS:
                raise self.error(f"unknown set operator '{tok.text}': expected {_EXPECT_OP}", tok)
            operator = _OPERATORS[tok.text]
            brace = self.next()
        elif brace is None and tok.kind == _WORD and tok.text in _OPERATORS:
            raise self.error(f"expected '{{' after '{tok.text}'", self.peek())
        if brace is None:
            if tok.kind == _EOF:
                raise self.error(f"expected a value after '{name}'", tok)
            return Attribute(name, operator, (self.value(kind, tok),), name_tok.offset)
        values: list[Value] = []
        while True:
            tok = self.next()
            if tok.kind == _RBRACE:
                if not values:
                    raise self.error("empty set: expected at least one value before '}'", tok)
                return Attribute(name, operator, tuple(values), name_tok.offset)
            if tok.kind == _EOF:
                raise self.error("unclosed '{': expected '}' before the end of the rule", brace)
            if tok.kind == _LBRACE:
                raise self.error("unexpected '{': sets do not nest", tok)
            if tok.kind == _WORD and tok.text in _KINDS:
                raise self.error(f"unclosed '{{': expected '}}' before '{tok.text}'", tok)
            values.append(self.value(kind, tok))

    def rule(self) -> tuple[Attribute, ...]:
        first = self.peek()
        if first.kind == _EOF:
            raise self.error("empty rule: expected an attribute such as id 1235:821a", first)
        if first.kind == _WORD and first.text in _TARGETS:
            raise self.error(
                f"the rule target '{first.text}' does not belong in the match text: "
                'the config sets it (attach = "VM" or block = true)',
                first,
            )
        if first.kind == _WORD and first.text == "match":  # usbguard's partial-rule target
            self.next()
        attrs: list[Attribute] = []
        seen: dict[str, Attribute] = {}
        tok = self.peek()
        if tok.kind == _WORD and ":" in tok.text:
            # usbguard allows a bare device ID right after the target.
            self.next()
            attrs.append(
                Attribute("id", SetOperator.EQUALS, (_device_id(tok, self.text),), tok.offset)
            )
            seen["id"] = attrs[-1]
        while True:
            tok = self.next()
            if tok.kind == _EOF:
                if not attrs:
                    raise self.error("empty rule: expected an attribute after 'match'", tok)
                return tuple(attrs)
            if tok.kind != _WORD:
                raise self.error(f"{_EXPECT_ATTR}; got {tok.describe()}", tok)
            name = tok.text
            if name == "if":
                raise self.error("rule conditions ('if ...') are not supported", tok)
            if name in _TARGETS or name == "match":
                raise self.error(f"a rule target ('{name}') can only come first", tok)
            if name not in _KINDS:
                hint = f" (to match a device ID write: id {name})" if ":" in name else ""
                raise self.error(f"unknown attribute '{name}': {_EXPECT_ATTR}{hint}", tok)
            if name in seen:
                prev = RuleSyntaxError.at("", self.text, seen[name].offset)
                raise self.error(
                    f"duplicate attribute '{name}' (first at {prev.line}:{prev.column + 1}): "
                    f"each attribute may appear once per rule; use a set: {name} one-of {{ ... }}",
                    tok,
                )
            attr = self.attribute(tok)
            seen[name] = attr
            attrs.append(attr)


def parse(text: str) -> tuple[Attribute, ...]:
    """Parse rule text into its attributes, or raise :class:`RuleSyntaxError`."""
    return _Parser(text).rule()


def format_attributes(attrs: tuple[Attribute, ...]) -> str:
    """The canonical text of a rule: what :func:`parse` reads back to the same attributes."""
    return " ".join(a.to_text() for a in attrs)
