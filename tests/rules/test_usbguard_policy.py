"""Differential tests against the real usbguard: every rule it generates matches its device.

Sources of USB trees, all from real kernels:

* umockdev recordings of real hardware (tests/fixtures/umockdev: umockdev's own
  ``devices/`` recordings, usbguard's use-case recording, and one made in the
  lab guest; see tools/record_umockdev.py), replayed with ``umockdev-run``:
  usbguard and vmplug both read the replay's fake /sys;
* the lab's sysfs captures (tests/fixtures/sysfs), bind-mounted on /sys in a
  mount namespace of the test's own for usbguard (their ports have a real
  ``connect_type``, which umockdev does not replay).

For each tree ``usbguard generate-policy`` (default: ``via-port`` only for a
device without a serial) and ``generate-policy --with-ports`` (a ``via-port``
on every rule, which says which device the rule is for) run; usbguard prints
both in the same order.  Then:

* every generated rule, in both forms, matches exactly its device in
  vmplug's matcher among all devices of the tree (hubs and root hubs too), and
  ``vmplug match`` prints exactly that port for every rule of a device it lists;
* ``vmplug list --rules --all`` prints usbguard's lines, minus ``allow``;
  without ``--all`` the same minus the root hubs; ``--json`` the same text
  with its fields.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmplug.cli import cli
from vmplug.host.sysfs import read_device, scan
from vmplug.model import UsbDevice
from vmplug.rules import parse_rule

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
RECORDINGS = sorted((FIXTURES / "umockdev").glob("*.umockdev"))
CAPTURES = sorted(p for p in (FIXTURES / "sysfs").iterdir() if (p / "bus").is_dir())
VMPLUG = str(Path(sys.executable).parent / "vmplug")
USBGUARD = shutil.which("usbguard")
UMOCKDEV_RUN = shutil.which("umockdev-run")
UNSHARE = shutil.which("unshare")

needs_usbguard = pytest.mark.skipif(
    USBGUARD is None or UMOCKDEV_RUN is None,
    reason="usbguard and umockdev-run are needed: apt-get install usbguard umockdev",
)


def run_group(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own; on timeout kill that whole group by its PID."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def in_replay(recording: Path, script: str, timeout: float = 120.0) -> str:
    """Run ``sh -c script`` under ``umockdev-run -d recording``; its stdout."""
    assert UMOCKDEV_RUN is not None
    done = run_group([UMOCKDEV_RUN, "-d", str(recording), "--", "sh", "-c", script], timeout)
    assert done.returncode == 0, f"{recording.name}: rc={done.returncode}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Tree:
    """One USB tree as usbguard and vmplug both saw it."""

    name: str
    root: Path  # a sysfs root vmplug reads (the replay's copied testbed, or a capture)
    default: tuple[str, ...]  # `usbguard generate-policy`
    with_ports: tuple[str, ...]  # `usbguard generate-policy --with-ports`
    #: `vmplug list --rules --all` and `--json`, run where usbguard ran
    vmplug_rules: tuple[str, ...]
    vmplug_json: str
    vmplug_rules_no_root_hubs: tuple[str, ...]


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line for line in text.splitlines() if line.strip())


_SEP = "=====vmplug-test====="


def _split(out: str) -> list[str]:
    parts = out.split(_SEP + "\n")
    assert len(parts) == 5, out
    return parts


_SCRIPT = (
    "set -e; usbguard generate-policy; echo {sep}; usbguard generate-policy --with-ports; "
    "echo {sep}; {vmplug} list --rules --all; echo {sep}; {vmplug} list --rules --all --json; "
    "echo {sep}; {vmplug} list --rules"
)


@cache
def replay_tree(recording: Path, tmp: Path) -> Tree:
    root = tmp / recording.stem
    shutil.rmtree(root, ignore_errors=True)
    script = _SCRIPT.format(sep=_SEP, vmplug=VMPLUG) + f'; cp -a "$UMOCKDEV_DIR/sys" {root}'
    parts = _split(in_replay(recording, script))
    return Tree(
        recording.stem,
        root,
        _lines(parts[0]),
        _lines(parts[1]),
        _lines(parts[2]),
        parts[3],
        _lines(parts[4]),
    )


@cache
def capture_tree(capture: Path) -> Tree | None:
    """usbguard on a capture bind-mounted on /sys in a private mount namespace."""
    if UNSHARE is None or os.geteuid() != 0:
        return None
    probe = run_group([UNSHARE, "-m", "true"], 30)
    if probe.returncode != 0:
        return None
    vmplug = f"{VMPLUG} --sysfs-root {capture}"
    script = f"mount --bind {capture} /sys && " + _SCRIPT.format(sep=_SEP, vmplug=vmplug)
    done = run_group([UNSHARE, "-m", "sh", "-c", script])
    assert done.returncode == 0, done.stderr
    parts = _split(done.stdout)
    return Tree(
        capture.name,
        capture,
        _lines(parts[0]),
        _lines(parts[1]),
        _lines(parts[2]),
        parts[3],
        _lines(parts[4]),
    )


@pytest.fixture(scope="module")
def replay_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("umockdev")


SOURCES = [("umockdev", p) for p in RECORDINGS] + [("capture", p) for p in CAPTURES]


@pytest.fixture(params=SOURCES, ids=lambda s: f"{s[0]}:{s[1].stem}")
def tree(request: pytest.FixtureRequest, replay_tmp: Path) -> Tree:
    if USBGUARD is None or UMOCKDEV_RUN is None:
        pytest.skip("usbguard and umockdev-run are needed: apt-get install usbguard umockdev")
    kind, path = request.param
    if kind == "umockdev":
        return replay_tree(path, replay_tmp)
    got = capture_tree(path)
    if got is None:
        pytest.skip("bind-mounting a capture on /sys needs root and unshare -m")
    return got


def _target_stripped(rule: str) -> str:
    assert rule.startswith("allow "), rule
    return rule.removeprefix("allow ")


_VIA_PORT = re.compile(r' via-port "([^"]*)"')


def _port(rule: str) -> str:
    m = _VIA_PORT.search(rule)
    assert m, rule
    return m.group(1)


def _devices(tree: Tree) -> list[UsbDevice]:
    return scan(tree.root)


def test_the_recordings_are_there() -> None:
    # umockdev's and usbguard's recordings of real hardware, and the lab's own
    assert len(RECORDINGS) >= 7
    assert len(CAPTURES) >= 4


@needs_usbguard
def test_usbguard_makes_a_rule_for_every_device_vmplug_reads(tree: Tree) -> None:
    ports = sorted(_port(r) for r in tree.with_ports)
    assert ports == sorted(d.port for d in _devices(tree))
    assert len(tree.default) == len(tree.with_ports) > 0


@needs_usbguard
def test_every_generated_rule_matches_exactly_its_device(tree: Tree) -> None:
    devices = _devices(tree)
    order = {d.port: i for i, d in enumerate(devices)}
    portless = [_VIA_PORT.sub("", r, count=1) for r in tree.with_ports]
    checked = 0
    for default, with_port in zip(tree.default, tree.with_ports, strict=True):
        port = _port(with_port)
        # the default form is the same rule, via-port left out where there is a serial
        if ' serial "" ' not in default:
            assert default == _VIA_PORT.sub("", with_port, count=1)
            # Without its port a rule matches every device that differs only in the
            # port: clones with one serial on one hub (the "identical" capture).
            twins = [_port(w) for w, p in zip(tree.with_ports, portless, strict=True)
                     if p == default]  # fmt: skip
        else:
            twins = [port]
        rule = parse_rule(_target_stripped(default))
        matched = [d.port for d in devices if rule.matches(d)]
        assert matched == sorted(twins, key=order.__getitem__), (tree.name, default)
        rule = parse_rule(_target_stripped(with_port))
        assert [d.port for d in devices if rule.matches(d)] == [port], (tree.name, with_port)
        checked += 1
    assert checked == len(devices)


@needs_usbguard
def test_vmplug_match_prints_exactly_the_device(tree: Tree) -> None:
    listed = {d.port for d in _devices(tree) if not d.is_hub and not d.is_root_hub}
    runner = CliRunner()
    for default, with_port in zip(tree.default, tree.with_ports, strict=True):
        port = _port(with_port)
        for rule_text in (default, with_port):
            result = runner.invoke(
                cli,
                ["match", "--json", "--sysfs-root", str(tree.root), _target_stripped(rule_text)],
            )
            if port in listed:
                assert result.exit_code == 0, (rule_text, result.output)
                assert port in json.loads(result.output)
                if rule_text == with_port or ' serial "" ' in rule_text:
                    assert json.loads(result.output) == [port]
            else:  # `vmplug match` lists no hubs: nothing, and says so with exit 1
                assert result.exit_code == 1, (rule_text, result.output)


@needs_usbguard
def test_list_rules_prints_what_usbguard_prints(tree: Tree) -> None:
    expected = sorted(_target_stripped(r) for r in tree.default)
    assert sorted(tree.vmplug_rules) == expected
    devices = [
        _target_stripped(d)
        for d, p in zip(tree.default, tree.with_ports, strict=True)
        if not _port(p).startswith("usb")
    ]
    assert len(devices) < len(expected)  # there were root hubs
    assert sorted(tree.vmplug_rules_no_root_hubs) == sorted(devices)


@needs_usbguard
def test_list_rules_json_has_the_text_and_its_fields(tree: Tree) -> None:
    objects = json.loads(tree.vmplug_json)
    assert [o["rule"] for o in objects] == list(tree.vmplug_rules)
    by_port = {d.port: d for d in _devices(tree)}
    for obj in objects:
        fields = obj["fields"]
        dev = by_port[obj["port"]]
        assert list(fields)[:5] == ["id", "serial", "name", "hash", "parent-hash"]
        assert list(fields)[-1] == "with-connect-type"
        assert fields["id"] == dev.vidpid
        assert fields["hash"] == dev.descriptors_sha256
        assert fields.get("with-interface", []) == [
            f"{c:02x}:{s:02x}:{p:02x}" for c, s, p in dev.interface_triples
        ]
        assert ("via-port" in fields) == (fields["serial"] == "")
        # the text is the fields, and parses back to a rule for that device
        rule = parse_rule(obj["rule"])
        assert [a.name for a in rule.attributes] == list(fields)
        matched = [d for d in by_port.values() if rule.matches(d)]
        if "via-port" in fields:
            assert matched == [dev]
        else:  # clones with one serial match together, as in usbguard
            assert dev in matched
            assert all((d.vidpid, d.serial) == (dev.vidpid, dev.serial) for d in matched)


@needs_usbguard
def test_lab_replay_equals_usbguard_on_the_live_kernel(replay_tmp: Path) -> None:
    """The lab recording replays what usbguard saw on the live guest kernel (apart
    from the ports' connect_type, which umockdev does not record)."""
    live = (FIXTURES / "umockdev" / "lab-mixed.usbguard.rules").read_text().splitlines()
    tree = replay_tree(FIXTURES / "umockdev" / "lab-mixed.umockdev", replay_tmp)

    def no_connect_type(rules: list[str]) -> list[str]:
        return sorted(re.sub(r' with-connect-type "[^"]*"$', "", r) for r in rules)

    assert len(live) == 19
    assert no_connect_type(live) == no_connect_type([f"allow {r}" for r in tree.vmplug_rules])
    assert any('with-connect-type "unknown"' in r for r in live)


@needs_usbguard
def test_a_device_read_on_its_own_has_the_same_hashes(tree: Tree) -> None:
    """The daemon reads a hot-plugged device alone (no sysfs root, no hub read
    before it): its parent-hash is worked out from its path and its hub."""
    for dev in _devices(tree):
        assert dev.sysfs_path is not None
        alone = read_device(dev.sysfs_path, dev.port)
        assert alone is not None
        assert (alone.descriptors_sha256, alone.parent_hash) == (
            dev.descriptors_sha256,
            dev.parent_hash,
        )
