"""``vmplug doctor`` on a device whose ``authorized`` is 0, in real trees.

* ``lab-deauthorized.umockdev``: recorded in the lab guest after writing 0 to
  the keyboard's (2-2.4.2) ``authorized`` (tools/record_umockdev.py), replayed;
* the real ``usbguard-daemon`` blocking a keyboard under ``umockdev-run``
  (umockdev's recording of a real Kinesis keyboard behind two hubs).

In both the fix the doctor prints is then run, in a fresh replay, and must
make the device authorized (and the finding go away).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.rules.test_usbguard_policy import FIXTURES, VMPLUG, in_replay

UMOCKDEV = FIXTURES / "umockdev"
DAEMON = shutil.which("usbguard-daemon") or "/usr/sbin/usbguard-daemon"

pytestmark = pytest.mark.skipif(
    shutil.which("umockdev-run") is None, reason="umockdev-run not found: apt-get install umockdev"
)


def _authorized(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in findings if f["check"] == "host.authorized"]


def _doctor(recording: Path, device: str, before: str = "") -> tuple[list[dict[str, Any]], str]:
    """``vmplug doctor --json DEVICE`` in a replay, after the shell code ``before``;
    the findings and the device's ``authorized`` at the end."""
    script = (
        f"{before}\n"
        f'{VMPLUG} doctor --json {device} > "$UMOCKDEV_DIR/doctor.json" || true\n'
        f'cat "$UMOCKDEV_DIR/doctor.json"; echo; cat /sys/bus/usb/devices/{device}/authorized'
    )
    out = in_replay(recording, script).strip().splitlines()
    return json.loads("\n".join(out[:-1]))["findings"], out[-1]


def test_a_device_someone_deauthorized() -> None:
    rec = UMOCKDEV / "lab-deauthorized.umockdev"
    findings, authorized = _doctor(rec, "2-2.4.2")
    assert authorized == "0"
    (f,) = _authorized(findings)
    assert f["severity"] == "error"
    assert f["subject"] == "2-2.4.2"
    assert "not authorized" in f["title"]
    assert "no usbguard-daemon is running" in f["title"]
    path = "/sys/devices/pci0000:00/0000:00:0b.0/usb2/2-2/2-2.4/2-2.4.2/authorized"
    assert f"{path} = 0" in f["evidence"]
    assert f["fix"] == f"echo 1 > {path}"
    # what the doctor says to run works
    findings, authorized = _doctor(rec, "2-2.4.2", before=f["fix"])
    assert authorized == "1"
    (ok,) = _authorized(findings)
    assert ok["severity"] == "ok"


def _daemon_script(tmp: Path, rules: str) -> str:
    """Start the real usbguard-daemon on the replay with ``rules``; stop it by PID on exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    conf, rules_file = tmp / "usbguard-daemon.conf", tmp / "rules.conf"
    rules_file.write_text(rules)
    conf.write_text(
        f"RuleFile={rules_file}\n"
        "ImplicitPolicyTarget=block\n"
        "PresentDevicePolicy=apply-policy\n"
        "PresentControllerPolicy=keep\n"
        "InsertedDevicePolicy=apply-policy\n"
        "RestoreControllerDeviceState=false\n"
        "DeviceManagerBackend=uevent\n"
        "IPCAllowedUsers=root\n"
        "AuditBackend=FileAudit\n"
        f"AuditFilePath={tmp}/audit.log\n"
    )
    for path in (conf, rules_file):
        path.chmod(0o600)  # usbguard refuses files others may read
    log = tmp / "daemon.log"
    # the daemon is up when it has audited its decision on the keyboard
    return (
        f"{DAEMON} -k -c {conf} > {log} 2>&1 & pid=$!\n"
        "trap 'kill $pid; wait $pid' EXIT\n"
        "for i in $(seq 100); do "
        f'grep -q "1-1.5.4.2\' target.new=" {tmp}/audit.log 2>/dev/null && break; '
        "sleep 0.1; done"
    )


@pytest.mark.skipif(
    not os.access(DAEMON, os.X_OK) or os.geteuid() != 0,
    reason="needs usbguard-daemon (apt-get install usbguard) and root",
)
def test_a_device_usbguard_blocked(tmp_path: Path) -> None:
    rec = UMOCKDEV / "umockdev-usbkbd.umockdev"
    hubs = "allow with-interface one-of { 09:*:* }\n"  # the keyboard hangs from hubs
    findings, authorized = _doctor(rec, "1-1.5.4.2", before=_daemon_script(tmp_path / "a", hubs))
    assert authorized == "0"
    (f,) = _authorized(findings)
    assert f["severity"] == "error"
    assert "usbguard blocked it" in f["title"]
    assert any(e.startswith("usbguard-daemon running: pid ") for e in f["evidence"])
    assert "usbguard allow-device" in f["fix"]
    allow = [ln for ln in f["fix"].splitlines() if ln.startswith("allow ")]
    assert len(allow) == 1, f["fix"]
    assert 'via-port "1-1.5.4.2"' in allow[0]
    # the rule the doctor suggests, in usbguard's rules file, lets the keyboard in
    script = _daemon_script(tmp_path / "b", hubs + allow[0] + "\n")
    findings, authorized = _doctor(rec, "1-1.5.4.2", before=script)
    assert authorized == "1", shlex.quote(allow[0])
    (ok,) = _authorized(findings)
    assert ok["severity"] == "ok"
