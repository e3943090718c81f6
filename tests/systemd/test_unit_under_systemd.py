"""The generated unit run by a real systemd as PID 1 (systemd-nspawn -b).

The container boots this machine's own /usr (``--volatile=yes``: a tmpfs root,
nothing written to the host) with the unit ``vmplug generate systemd`` wrote,
a real paused QEMU with a qemu-xhci as the VM "windows" (its QMP socket in
/run/vmtest, which the unit's sandbox must reach), and a driver unit that
asks systemd what it saw and writes the answers to a directory of the test:

* ``Type=notify``: the unit is ``active`` only after READY=1, and its
  ``StatusText`` is vmplug's one-line summary;
* ``systemctl reload`` (ExecReload= -> SIGHUP -> RELOADING=1 ... READY=1)
  ends active, with the daemon's "config reloaded" in the journal;
* the watchdog: the daemon SIGSTOPped sends no WATCHDOG=1, systemd kills it
  (result ``watchdog``) and restarts it (``NRestarts`` 1, a new main PID that
  says READY=1 again);
* journald: ``journalctl VMPLUG_VM=windows`` finds a daemon line about the VM,
  with PRIORITY and CODE_FILE from the record.

Needs root and systemd-nspawn (Debian: systemd-container).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.chroot import in_chroot
from vmplug.generate.systemd import plan_systemd

pytestmark = pytest.mark.skipif(
    in_chroot(), reason="systemd-nspawn cannot boot a container from inside a chroot"
)

ROOT = Path(__file__).resolve().parents[2]
WATCHDOG_SEC = 3

QEMU_UNIT = """\
[Unit]
Description=the VM "windows": a paused QEMU with an xHCI
Before=vmplug.service
[Service]
RuntimeDirectory=vmtest
ExecStart={qemu} -M q35 -nodefaults -display none -S -m 64 -device qemu-xhci,id=xhci \
-qmp unix:/run/vmtest/qmp.sock,server=on,wait=off
[Install]
WantedBy=multi-user.target
"""

DRIVER_UNIT = """\
[Unit]
Description=asks systemd what it saw of vmplug
After=vmplug.service qemu-vm.service
[Service]
Type=oneshot
StandardOutput=file:/out/driver.log
StandardError=inherit
ExecStart=/bin/sh -x /cfg/driver.sh
[Install]
WantedBy=multi-user.target
"""

DRIVER = r"""
show() { systemctl show -p ActiveState,SubState,StatusText,MainPID,NRestarts,Result vmplug; }
wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  n=$1; shift
  while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n - 1)); done
  return 1
}
connected() { show | grep -q '^StatusText=1/1 VMs connected'; }
ok=1
wait_for 100 systemctl is-active -q vmplug || ok=0
show > /out/started
wait_for 100 connected || ok=0
show > /out/ready
if [ $ok = 0 ]; then
  journalctl -b -u vmplug --no-pager -o short-monotonic > /out/unit.log
  systemctl poweroff
  exit 1
fi
systemctl reload vmplug; echo "reload=$?" > /out/reload
show >> /out/reload
pid=$(systemctl show -p MainPID --value vmplug)
echo "stopped=$pid" > /out/watchdog
[ "$pid" -gt 1 ] && kill -STOP "$pid"
new_pid() {
  p=$(systemctl show -p MainPID --value vmplug)
  [ "$p" != "$pid" ] && [ "$p" != 0 ] && systemctl is-active -q vmplug
}
wait_for 200 new_pid
show >> /out/watchdog
journalctl -b -u vmplug -o json --no-pager VMPLUG_VM=windows > /out/journal_vm.json
journalctl -b -u vmplug -o json --no-pager VMPLUG_ACTION=reload > /out/journal_reload.json
journalctl -b -u vmplug --no-pager -o short-monotonic > /out/unit.log
systemctl poweroff
"""


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    nspawn = shutil.which("systemd-nspawn")
    qemu = shutil.which("qemu-system-x86_64")
    if os.geteuid() != 0 or nspawn is None or qemu is None:
        pytest.skip("needs root, systemd-nspawn (Debian: systemd-container) and QEMU")
    base = tmp_path_factory.mktemp("nspawn")
    units, cfg, out = base / "units", base / "cfg", base / "out"
    for d in (units / "multi-user.target.wants", cfg, out):
        d.mkdir(parents=True)
    # [api] group: the API socket is chown'ed (a syscall the filter must allow)
    (cfg / "vmplug.toml").write_text(
        '[api]\ngroup = "root"\n\n[vm.windows]\nqmp = "/run/vmtest/qmp.sock"\n'
    )
    (cfg / "driver.sh").write_text(DRIVER)
    exe = str(ROOT / ".venv" / "bin" / "vmplug")
    plan = plan_systemd(exe, config="/cfg/vmplug.toml", sockets=["/run/vmtest/qmp.sock"])
    plan = dataclasses.replace(plan, watchdog_sec=WATCHDOG_SEC)
    (units / "vmplug.service").write_text(plan.text())
    (units / "qemu-vm.service").write_text(QEMU_UNIT.format(qemu=qemu))
    (units / "driver.service").write_text(DRIVER_UNIT)
    for name in ("vmplug.service", "qemu-vm.service", "driver.service"):
        (units / "multi-user.target.wants" / name).symlink_to(f"../{name}")
    binds = [f"--bind-ro={units}:/etc/systemd/system", f"--bind-ro={cfg}:/cfg"]
    binds += [f"--bind={out}:/out", f"--bind-ro={ROOT}"]
    # --volatile=yes starts with an empty /etc: pyudev finds libudev via ld.so.cache
    binds.append("--bind-ro=/etc/ld.so.cache")
    binds.append("--bind-ro=/etc/group")  # [api] group by name
    # the venv's python is a link to the interpreter it was made from
    python = Path(sys.executable).resolve()
    prefix = python.parents[1]
    if not str(prefix).startswith("/usr"):
        binds.append(f"--bind-ro={prefix}")
    argv = [nspawn, "-q", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit"]
    argv += ["--private-network", "--console=pipe", *binds, "-b"]
    log = (base / "nspawn.log").open("w")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        pytest.fail("no power off in 150 s:\n" + (base / "nspawn.log").read_text())
    finally:
        log.close()
    (base / "unit.txt").write_text(plan.text())
    return out


def _read(out: Path, name: str) -> str:
    path = out / name
    assert path.exists(), f"{name} missing; driver log:\n" + _maybe(out / "driver.log")
    return path.read_text()


def _maybe(path: Path) -> str:
    return path.read_text() if path.exists() else "(none)"


def test_ready_and_status(booted: Path) -> None:
    started = _props(_read(booted, "started"))
    assert started["ActiveState"] == "active", started
    ready = _props(_read(booted, "ready"))
    assert ready["StatusText"] == "1/1 VMs connected, 0/0 devices attached", ready
    assert ready["NRestarts"] == "0"


def test_reload(booted: Path) -> None:
    text = _read(booted, "reload")
    assert text.startswith("reload=0"), text
    assert _props(text)["ActiveState"] == "active"
    lines = [json.loads(x) for x in _read(booted, "journal_reload.json").splitlines()]
    assert any(e["MESSAGE"].startswith("config reloaded: 1 VMs") for e in lines), lines


def test_watchdog_restarts_a_stopped_daemon(booted: Path) -> None:
    text = _read(booted, "watchdog")
    stopped = text.splitlines()[0].removeprefix("stopped=")
    after = _props(text)
    assert after["NRestarts"] == "1", text + _maybe(booted / "unit.log")
    assert after["MainPID"] not in ("0", stopped)
    assert after["ActiveState"] == "active"
    log = _read(booted, "unit.log")
    assert "Watchdog timeout" in log, log


def test_journal_fields(booted: Path) -> None:
    entries = [json.loads(x) for x in _read(booted, "journal_vm.json").splitlines()]
    assert entries, _maybe(booted / "unit.log")
    for e in entries:
        assert e["VMPLUG_VM"] == "windows"
        assert e["SYSLOG_IDENTIFIER"] == "vmplug"
        assert e["CODE_FILE"].endswith("reconciler.py")
        assert int(e["CODE_LINE"]) > 0
        assert e["PRIORITY"] in {"4", "6"}
        assert e["MESSAGE"].startswith("vm windows")
