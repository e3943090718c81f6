"""Text a device or a client chose, made safe to show a person.

A USB device picks its own manufacturer, product and serial strings, and a
BadUSB stick can say anything: ``X\\n\\x1b[2J\\x1b[31mRED`` clears and recolours
a terminal and fakes rows in a table, U+202E turns the rest of a line round,
a zero-width space makes two names look the same.  Every human-readable
surface (tables, trees, messages, reports, log lines, comments in generated
files) passes such text through :func:`printable`; ``--json`` and the API
keep the exact text.

:func:`printable` is pure and total: any ``str`` in, one line out, never
longer than ``limit``.
"""

from __future__ import annotations

import unicodedata

#: Long enough for any real USB string (a string descriptor holds at most 126
#: UTF-16 code units), short enough that one device stays one row.
DEFAULT_LIMIT = 128

#: What a cut string ends with.
ELLIPSIS = "…"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}

#: Unicode categories that are shown as escapes: controls (C0, DEL, C1),
#: format characters (bidi overrides and isolates U+202A-202E, U+2066-2069,
#: zero-width U+200B-200F, U+FEFF, soft hyphen, tag characters), lone
#: surrogates (undecodable bytes) and the line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(ch: str, backslash: bool) -> str | None:
    """The visible form of ``ch``, or ``None`` when it is shown as it is."""
    named = _NAMED.get(ch)
    if named is not None:
        return named if backslash or ch != "\\" else None
    if unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
        return None
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, limit: int | None = DEFAULT_LIMIT, *, backslash: bool = True) -> str:
    """``text`` as one line a terminal shows as it is.

    Control and invisible formatting characters become visible escapes
    (``\\x1b``, ``\\n``, ``\\u202e``; a backslash is doubled, so an escape
    in the output always means a character in the input); the result has
    no line break, and when it would be longer than ``limit`` characters it
    is cut, ending with ``…`` (``limit=None``: never cut).  ``backslash=False``
    leaves backslashes alone (vmplug's own messages, which quote paths and
    rules).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    if text.isprintable() and (not backslash or "\\" not in text):
        if limit is None or len(text) <= limit:
            return text
        return text[: limit - 1] + ELLIPSIS
    room = None if limit is None else limit - 1  # keeps one place for the ellipsis
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = _escape_char(ch, backslash) or ch
        if room is not None and size + len(piece) > room:
            rest_fits = limit is not None and size + len(piece) <= limit and i == len(text) - 1
            if rest_fits:  # the very last piece fits where the ellipsis would go
                out.append(piece)
                return "".join(out)
            out.append(ELLIPSIS)
            return "".join(out)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def printable_lines(text: str, limit: int | None = None) -> str:
    """Like :func:`printable` for each line of ``text``, the line breaks kept.

    For messages that vmplug itself writes over several lines (an error with
    its candidates, a config error with its caret), as a last safeguard at
    the terminal: the device text inside should already have been through
    :func:`printable`, which folds its own newlines.
    """
    return "\n".join(printable(line, limit, backslash=False) for line in text.split("\n"))


__all__ = ["DEFAULT_LIMIT", "ELLIPSIS", "printable", "printable_lines"]
