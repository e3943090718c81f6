"""`vmplug generate udev`: golden rules, udevadm's own parser, and --install."""

from __future__ import annotations

import dataclasses
import grp
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.devices import AUDIO, DISK, HUB, KEYLAB, SERIAL_A, SERIAL_B
from tests.support.udev_parse import Token, parse_rules, udev_match
from vmplug.generate import udev
from vmplug.generate.common import CannotExpress
from vmplug.host import install


def _group() -> str:
    for name in ("kvm", "root"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        return name
    return grp.getgrgid(os.getgid()).gr_name


def test_golden(golden: Callable[[str, str], None]) -> None:
    golden("udev.rules", udev.render_rules(udev.plan_udev([AUDIO, KEYLAB, DISK])))
    golden(
        "udev-by-port.rules",
        udev.render_rules(udev.plan_udev([SERIAL_A, SERIAL_B], by_port=True, group="plugdev")),
    )


def test_tokens() -> None:
    rules = udev.plan_udev([AUDIO])
    parsed = parse_rules(udev.render_rules(rules))
    assert len(parsed) == 2
    access, power = parsed
    assert Token("ATTR{idVendor}", "==", "46f4") in access
    # udev has no escape for ':' in a match: '?' stands for it
    assert Token("ATTR{serial}", "==", "1-0000?00?0b.0-2.1") in access
    assert Token("GROUP", "=", "kvm") in access
    assert Token("MODE", "=", "0660") in access
    assert Token("SYMLINK", "+=", "vmplug/46f4-0002-1-0000_00_0b.0-2.1") in access
    assert Token("ATTR{power/control}", "=", "on") in power
    assert Token("TEST", "==", "power/control") in power
    assert Token("ACTION", "!=", "remove") in power


def test_odd_serial_still_matches() -> None:
    odd = dataclasses.replace(KEYLAB, serial='A "B|C*\\ é€ ')
    (rule,) = udev.plan_udev([odd])
    pattern = {t[0]: t[2] for t in rule.matches}["ATTR{serial}"]
    assert set(pattern) <= set("ABC?*")
    assert udev_match(pattern, odd.serial.encode())  # type: ignore[union-attr]
    assert not udev_match(pattern, b"X")


def test_errors() -> None:
    with pytest.raises(CannotExpress, match="hub"):
        udev.plan_udev([HUB])
    with pytest.raises(CannotExpress, match="group"):
        udev.plan_udev([KEYLAB], group='kvm" RUN+="/bin/sh')
    with pytest.raises(CannotExpress, match="mode"):
        udev.plan_udev([KEYLAB], mode="0999")


def test_udevadm_parses_the_rules() -> None:
    """udevadm (no `verify` before v254) loads every rules file when it runs `test`;
    a rules file in /run/udev/rules.d is read and any syntax problem is reported
    with the file name and line."""
    if shutil.which("udevadm") is None:
        pytest.skip("udevadm is not installed (Debian: udev)")
    if os.geteuid() != 0:
        pytest.skip("writing /run/udev/rules.d needs root")
    odd = dataclasses.replace(KEYLAB, serial='x"y\\z|*', product='Key"Lab\nGROUP="root"')
    text = udev.render_rules(udev.plan_udev([AUDIO, odd, DISK], group=_group()))
    rules_dir = Path("/run/udev/rules.d")
    rules_dir.mkdir(parents=True, exist_ok=True)
    path = rules_dir / f"99-vmplug-test-{uuid.uuid4().hex}.rules"
    bad = rules_dir / f"99-vmplug-test-{uuid.uuid4().hex}.rules"
    try:
        path.write_text(text)
        bad.write_text('ATTR{idVendor}=="1235", GROUP="kvm\n')  # proves errors are seen
        res = subprocess.run(
            ["udevadm", "test", "/devices/virtual/net/lo"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        path.unlink(missing_ok=True)
        bad.unlink(missing_ok=True)
    out = res.stdout + res.stderr
    assert f"Reading rules file: {path}" in out
    assert str(bad) in out.replace(f"Reading rules file: {bad}", "")  # the broken one is flagged
    problems = [
        line for line in out.splitlines() if str(path) in line and "Reading rules file" not in line
    ]
    assert problems == []


def _fake_udevadm(tmp_path: Path, status: int = 0) -> tuple[str, Path]:
    log = tmp_path / "udevadm.log"
    script = tmp_path / "udevadm"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        + ('echo "Failed to send reload request: No such file" >&2\n' if status else "")
        + f"exit {status}\n"
    )
    script.chmod(0o755)
    return str(script), log


def test_install(tmp_path: Path) -> None:
    tool, log = _fake_udevadm(tmp_path)
    rules = udev.plan_udev([AUDIO, KEYLAB])
    done = install.install_rules(rules, rules_dir=tmp_path / "rules.d", udevadm=tool)
    files = sorted(p.name for p in (tmp_path / "rules.d").iterdir())
    assert files == sorted(r.filename for r in rules)
    assert all(f.startswith("70-vmplug-") and f.endswith(".rules") for f in files)
    for rule in rules:
        content = (tmp_path / "rules.d" / rule.filename).read_text()
        assert parse_rules(content) == parse_rules(udev.render_rules([rule]))
    calls = log.read_text().splitlines()
    assert calls[0] == "control --reload"
    assert calls[1] == "trigger --action=change /sys/bus/usb/devices/2-2.1"
    assert any("wrote" in d for d in done) and any("reloaded" in d for d in done)


def test_install_without_udev_running(tmp_path: Path) -> None:
    tool, _ = _fake_udevadm(tmp_path, status=1)
    done = install.install_rules(
        udev.plan_udev([KEYLAB]), rules_dir=tmp_path, single_file="70-mine.rules", udevadm=tool
    )
    assert (tmp_path / "70-mine.rules").exists()
    assert "did not reload" in done[-1] and "next boot" in done[-1]
