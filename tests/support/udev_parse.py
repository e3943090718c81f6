"""A udev rules tokenizer that mirrors systemd-udevd's (v252 ``udev-rules.c``).

``rules_parse_file`` skips leading white space, ignores empty lines and lines
whose first non-blank is ``#``, and joins a line ending in ``\\`` with the
next.  ``parse_line`` then reads ``KEY[{ATTR}] OP "VALUE"`` tokens separated
by commas and/or white space.  ``parse_value``: an optional ``e`` (C escapes)
or ``i`` (case-insensitive) prefix, then a double-quoted string in which
``\\"`` is the only escape (other backslashes stay).  Match values are
``|``-separated lists of fnmatch(3) globs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass

_KEY = re.compile(r"[A-Za-z_]+(\{[^}]*\})?")
_OPS = ("==", "!=", "+=", "-=", ":=", "=")


class UdevParseError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    key: str
    op: str
    value: str


def logical_lines(text: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in text.split("\n"):
        line = raw.lstrip(" \t")
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        raise UdevParseError("file ends in a continuation")
    return out


def _parse_value(s: str, i: int) -> tuple[str, int]:
    escaped = case_insensitive = False
    while i < len(s) and s[i] in "ei" and s[i] != '"':
        if s[i] == "e" and not escaped:
            escaped = True
        elif s[i] == "i" and not case_insensitive:
            case_insensitive = True
        else:
            raise UdevParseError("bad value prefix")
        i += 1
    if i >= len(s) or s[i] != '"':
        raise UdevParseError(f"value must be double quoted at {i}: {s!r}")
    i += 1
    out: list[str] = []
    while True:
        if i >= len(s):
            raise UdevParseError("unterminated value")
        ch = s[i]
        if ch == '"':
            return "".join(out), i + 1
        if escaped and ch == "\\":
            raise UdevParseError("e-strings are not produced by vmplug")
        if ch == "\\" and i + 1 < len(s) and s[i + 1] == '"':
            out.append('"')
            i += 2
            continue
        out.append(ch)
        i += 1


def parse_line(line: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while True:
        while i < len(line) and line[i] in " \t,":
            i += 1
        if i >= len(line):
            return tokens
        m = _KEY.match(line, i)
        if not m:
            raise UdevParseError(f"invalid key at {i}: {line!r}")
        key = m.group()
        i = m.end()
        while i < len(line) and line[i] in " \t":
            i += 1
        op = next((o for o in _OPS if line.startswith(o, i)), None)
        if op is None:
            raise UdevParseError(f"invalid operator after {key}")
        i += len(op)
        while i < len(line) and line[i] in " \t":
            i += 1
        value, i = _parse_value(line, i)
        tokens.append(Token(key, op, value))
        if i < len(line) and line[i] not in " \t,":
            raise UdevParseError(f"garbage after value at {i}")


def parse_rules(text: str) -> list[list[Token]]:
    return [parse_line(line) for line in logical_lines(text)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_libc.fnmatch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
_libc.fnmatch.restype = ctypes.c_int


def udev_match(pattern: str, value: bytes) -> bool:
    """udev's ATTR match: trailing white space of the sysfs value is ignored unless
    the pattern ends in white space; ``|`` separates alternatives; fnmatch(3)."""
    if not pattern.endswith((" ", "\t", "\n")):
        value = value.rstrip(b" \t\n\r\f\v")
    return any(_libc.fnmatch(alt.encode(), value, 0) == 0 for alt in pattern.split("|"))
