"""Readers that mirror how the real consumers read vmplug's output.

Each follows the consumer's source, cited in its docstring; the property
tests feed generated text through them, and example tests feed the same kind
of text to the real tool where one can parse it.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# QEMU -readconfig: util/qemu-config.c, qemu_config_foreach()

_SECTION = re.compile(r'\[(\S{1,63})\s*"([^"]{1,63})"\]')
_SECTION_NO_ID = re.compile(r"\[([^\]]{1,63})\]")
_KEYVAL = re.compile(r'\s*(\S{1,63})\s*=\s*"([^"]{0,1023})"')


class ReadconfigError(ValueError):
    pass


def _fgets_lines(data: bytes, size: int = 1024) -> list[bytes]:
    """fgets(line, 1024, fp): at most 1023 bytes per read; a longer line is split."""
    out: list[bytes] = []
    for raw in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        line = raw + b"\n"
        while len(line) > size - 1:
            out.append(line[: size - 1])
            line = line[size - 1 :]
        out.append(line)
    return out


def parse_readconfig(text: str) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """Groups as QEMU reads them: (group, id, [(key, value), ...])."""
    groups: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for n, raw in enumerate(_fgets_lines(text.encode()), start=1):
        line = raw.decode()
        if line == "\n" or line.startswith("#"):
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if m:
                groups.append((m.group(1), m.group(2), []))
                continue
            m2 = _SECTION_NO_ID.match(line)
            if m2:
                groups.append((m2.group(1), None, []))
                continue
        m3 = _KEYVAL.match(line)
        if m3:
            if not groups:
                raise ReadconfigError(f"line {n}: no group defined")
            groups[-1][2].append((m3.group(1), m3.group(2)))
            continue
        raise ReadconfigError(f"line {n}: parse error: {line!r}")
    return groups


# ---------------------------------------------------------------------------
# usbredir: usbredirparser/usbredirfilter.c, usbredirfilter_string_to_rules()


def _strtol0(token: str) -> int:
    """strtol(token, &ep, 0) with *ep required to be '\\0'."""
    t = token.strip(" \t\n\v\f\r")  # strtol skips leading white space only
    if t != token.lstrip(" \t\n\v\f\r"):
        raise ValueError(token)
    sign = -1 if t.startswith("-") else 1
    body = t[1:] if t[:1] in "+-" else t
    if body.lower().startswith("0x"):
        value = int(body[2:], 16)
    elif body.startswith("0") and len(body) > 1:
        value = int(body, 8)
    else:
        if not body.isdigit():
            raise ValueError(token)
        value = int(body, 10)
    return sign * value


def usbredir_string_to_rules(
    text: str, token_sep: str = ",", rule_sep: str = "|"
) -> list[tuple[int, int, int, int, int]]:
    rules = []
    for rule in (r for r in re.split("[" + re.escape(rule_sep) + "]", text) if r):
        fields = [f for f in re.split("[" + re.escape(token_sep) + "]", rule) if f]
        if len(fields) != 5:
            raise ValueError(f"rule {rule!r}: {len(fields)} fields")
        values = tuple(_strtol0(f) for f in fields)
        cls, vendor, product, version, allow = values
        if not (-1 <= cls <= 255 and all(-1 <= v <= 0xFFFF for v in (vendor, product, version))):
            raise ValueError(f"rule {rule!r}: out of range")
        rules.append((cls, vendor, product, version, 1 if allow else 0))
    return rules


# ---------------------------------------------------------------------------
# systemd ExecStart=: load-fragment.c config_parse_exec(): specifiers are
# expanded on the whole value ("%%" -> "%"), words are split with
# extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE), and at exec time
# "$$" becomes "$" (replace_env_argv).

_CESC = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
         "\\": "\\", '"': '"', "'": "'", "s": " "}  # fmt: skip


def _specifiers(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "%":
            if text[i : i + 2] != "%%":
                raise ValueError(f"specifier %{text[i + 1 : i + 2]} would be expanded")
            out.append("%")
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _cunescape_one(s: str, i: int) -> tuple[str, int]:
    ch = s[i]
    if ch in _CESC:
        return _CESC[ch], i + 1
    if ch == "x":
        return chr(int(s[i + 1 : i + 3], 16)), i + 3
    if ch in "01234567":
        return chr(int(s[i : i + 3], 8)), i + 3
    if ch == "u":
        return chr(int(s[i + 1 : i + 5], 16)), i + 5
    if ch == "U":
        return chr(int(s[i + 1 : i + 9], 16)), i + 9
    raise ValueError(f"invalid escape \\{ch}")


def parse_exec_start(value: str) -> list[str]:
    text = _specifiers(value)
    words: list[str] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t\n":
            i += 1
        if i >= len(text):
            break
        word: list[str] = []
        quote: str | None = None
        while i < len(text):
            ch = text[i]
            if quote is None and ch in " \t\n":
                break
            if ch == "\\":
                if i + 1 >= len(text):
                    raise ValueError("trailing backslash")
                esc, i = _cunescape_one(text, i + 1)
                word.append(esc)
                continue
            if quote is None and ch in "\"'":
                quote = ch
            elif ch == quote:
                quote = None
            else:
                word.append(ch)
            i += 1
        if quote is not None:
            raise ValueError("unbalanced quoting")
        words.append("".join(word))
    out: list[str] = []
    for w in words:
        if "$" in w.replace("$$", ""):
            raise ValueError(f"{w!r} would expand a variable")
        out.append(w.replace("$$", "$"))
    if out and out[0] == ";":
        raise ValueError("command separator")
    return out
