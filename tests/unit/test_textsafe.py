"""printable(): device-chosen text made inert for terminals, logs and comments;
the log formatter keeps one record on one line; selectors of the API are exact."""

from __future__ import annotations

import logging
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fakekernel import FIXTURES
from vmplug.cli.daemon import _JournalFormatter
from vmplug.errors import SelectorError
from vmplug.host.inventory import read_devices
from vmplug.host.select import describe, select, select_one
from vmplug.textsafe import DEFAULT_LIMIT, ELLIPSIS, printable, printable_lines

HOSTILE = "X\n\x1b[2J\x1b[31mRED\x1b[0m"
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def test_controls_become_visible_escapes() -> None:
    assert printable(HOSTILE) == "X\\n\\x1b[2J\\x1b[31mRED\\x1b[0m"
    assert printable("a\tb\rc\x00d\x7fe\x85f\x9bg") == "a\\tb\\rc\\x00d\\x7fe\\x85f\\x9bg"
    assert printable("\u202eevil\u2066x\u2069\u200b\ufeff\u00ad") == (
        "\\u202eevil\\u2066x\\u2069\\u200b\\ufeff\\xad"
    )
    assert printable("a\u2028b\u2029c") == "a\\u2028b\\u2029c"
    assert printable("tag\U000e0041") == "tag\\U000e0041"
    assert printable("\udcff") == "\\udcff"  # a lone surrogate (undecodable byte) prints


def test_plain_text_is_kept_and_backslash_doubled() -> None:
    for text in (
        "QEMU USB Keyboard",
        "Focusrite Scarlett 4i4 4th Gen",
        "Müller ÄÖÜ 日本語",
        "[bold]",
    ):
        assert printable(text) == text
    assert printable("a\\x1b") == "a\\\\x1b"  # an escape in the output always means a character
    assert printable("C:\\dir", backslash=False) == "C:\\dir"


def test_long_text_is_cut_with_an_ellipsis() -> None:
    assert printable("A" * 5000) == "A" * (DEFAULT_LIMIT - 1) + ELLIPSIS
    assert printable("abcde", 5) == "abcde"
    assert printable("abcdef", 5) == "abcd" + ELLIPSIS
    assert printable("abc\x1b", 5) == "abc" + ELLIPSIS  # an escape is never cut in half
    assert printable("A" * 5000, None) == "A" * 5000
    with pytest.raises(ValueError):
        printable("x", 0)


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_any_text_gives_one_short_inert_line(text: str, limit: int) -> None:
    out = printable(text, limit)
    assert len(out) <= limit
    assert not any(unicodedata.category(ch) in UNSAFE for ch in out)
    assert "\n" not in out and "\x1b" not in out
    out.encode("utf-8")  # no lone surrogate left
    if len(printable(text, None)) <= limit:
        assert out == printable(text, None)
    else:
        assert out.endswith(ELLIPSIS)


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_nothing_is_lost_without_a_limit(text: str) -> None:
    """The escaped form reads back to the very text: no two inputs look the same."""
    out = printable(text, None)
    assert out.encode("ascii", "backslashreplace").decode("unicode_escape") == text


def test_printable_lines_keeps_vmplugs_own_line_breaks() -> None:
    assert printable_lines("one\ntwo \x1b[2J\n  ^") == "one\ntwo \\x1b[2J\n  ^"


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("vmplug", logging.INFO, __file__, 1, msg, args, None)


@pytest.mark.parametrize("journal", [False, True])
def test_a_log_record_is_one_line_whatever_a_device_says(journal: bool) -> None:
    fmt = _JournalFormatter(journal=journal)
    record = _record("device %s %s added: %s", "2-1", "0627:0001", HOSTILE + "A" * 5000)
    line = fmt.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert "X\\n\\x1b[2J\\x1b[31mRED\\x1b[0m" in line
    assert len(line) < 400  # an argument is cut at LOG_ARG_LIMIT
    assert isinstance(record.args, tuple) and str(record.args[2]).startswith(HOSTILE)
    assert fmt.format(_record("plain %d", 3)).endswith("plain 3")
    assert "\n" not in fmt.format(_record("a message\nwith a newline"))


def test_a_traceback_still_follows_its_record() -> None:
    fmt = _JournalFormatter(journal=False)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        info = sys.exc_info()
    record = logging.LogRecord("vmplug", logging.ERROR, __file__, 1, "%s", ("x\ny",), info)
    text = fmt.format(record)
    first, *rest = text.split("\n")
    assert first.endswith("x\\ny") and rest and "RuntimeError: boom" in rest[-1]


def test_api_selectors_are_exact_the_command_line_is_friendly() -> None:
    devices = read_devices(FIXTURES / "mixed")
    kbd = [d for d in devices if d.port == "2-2.4.2"]
    assert select(devices, "2-2.4.2", exact=True) == kbd
    assert select(devices, " 2-2.4.2\n") == kbd  # the command line ignores white space
    for odd in ("2-2.4.2\n", "2-2.4.2 ", "\t2-2.4.2", "0627:0001\n", "2-2.4.2\x00"):
        assert select(devices, odd, exact=True) == [], repr(odd)
        with pytest.raises(SelectorError):
            select_one(devices, odd, exact=True)
    same_id = [d for d in devices if d.vidpid == "0627:0001"]
    assert select(devices, "0627:0001", exact=True) == same_id


def test_describe_is_one_safe_line_unless_exact(tmp_path: Path) -> None:
    root = tmp_path / "sysfs"
    shutil.copytree(FIXTURES / "mixed", root, symlinks=True)
    (root / "bus/usb/devices/2-2.4.2").resolve().joinpath("manufacturer").write_text(HOSTILE + "\n")
    dev = next(d for d in read_devices(root) if d.port == "2-2.4.2")
    assert "\n" not in describe(dev) and "\x1b" not in describe(dev)
    assert HOSTILE in describe(dev, exact=True)
