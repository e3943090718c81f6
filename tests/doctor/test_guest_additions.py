"""The guest-additions layer against real parts: the real ``qemu-ga`` (run as a
host process on a unix socket, with and without ``-b``), a real QEMU with
``-spice`` and spicevmc usbredir channels, and Windows documents shaped after
Microsoft's (tests/fixtures/doctor/windows/README.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket as s
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.doctor.guest import (
    CHECKS,
    FilterSyntaxError,
    Passed,
    agent_findings,
    check_guest,
    filter_verdict,
    parse_filter,
    parse_version,
    service_findings,
    virtio_findings,
)
from vmplug.doctor.windows import parse_pnp_json, parse_services_json, pci_ids, virtio_advice
from vmplug.generate.spice import plan_spice
from vmplug.host.inventory import read_devices
from vmplug.model import UsbDevice
from vmplug.wire.qga import GuestAgent, commands

from .conftest import DOCTOR, QEMU, SYSFS, XHCI

AgentFactory = Callable[..., Path]


@pytest.fixture
def real_agent() -> Iterator[AgentFactory]:
    """Start the real qemu-ga on a unix socket (extra args: ``-b CMDS``); every one
    is killed by PID at teardown."""
    if shutil.which("qemu-ga") is None:
        pytest.skip("qemu-ga is not installed (Debian: qemu-guest-agent)")
    procs: list[subprocess.Popen[bytes]] = []
    dirs: list[str] = []

    def start(*extra: str) -> Path:
        d = tempfile.mkdtemp(prefix="vmplug-ga", dir="/tmp")
        dirs.append(d)
        sock = Path(d) / "qga.sock"
        (Path(d) / "state").mkdir()
        proc = subprocess.Popen(
            ["qemu-ga", "-m", "unix-listen", "-p", str(sock), "-t", f"{d}/state",
             "-f", f"{d}/qga.pid", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"qemu-ga exited: {err}")
            assert time.monotonic() < deadline, "qemu-ga did not create its socket"
            time.sleep(0.02)
        return sock

    yield start
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _by_check(found: list[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in found:
        out.setdefault(f.check, []).append(f)
    return out


# ---------------------------------------------------------------- the agent's health


def test_healthy_agent_ping_info_osinfo(real_agent: AgentFactory) -> None:
    sock = real_agent()
    with GuestAgent(sock) as agent:
        agent.ping()
        info = agent.info()
        osinfo = agent.osinfo()
    cmds = commands(info)
    assert cmds["guest-exec"] and cmds["guest-file-open"] and cmds["guest-ping"]
    assert parse_version(info["version"]) >= (2, 10)  # type: ignore[operator]
    found = _by_check(list(check_guest(DoctorContext(qga_socket=str(sock), vm="lab"))))
    (agent_ok,) = found["guest.agent"]
    assert agent_ok.severity is Severity.OK
    assert f"qemu-ga {info['version']}" in agent_ok.evidence[0]
    assert "guest-ping answered" in agent_ok.evidence[0]
    assert (
        osinfo["id"] in agent_ok.evidence[1]
        or str(osinfo.get("pretty-name")) in (agent_ok.evidence[1])
    )
    (cmd_ok,) = found["guest.agent-commands"]
    assert cmd_ok.severity is Severity.OK and "guest-file-read" in cmd_ok.evidence[0]
    # the Linux walk ran (it needs guest-file-*): a finding of its own
    assert "guest.linux-usb" in found


def test_blocked_commands_are_found_with_the_fix(real_agent: AgentFactory) -> None:
    """qemu-ga -b (Debian 12's 7.2 spells it --blacklist) disables commands: the
    agent itself says enabled=false, and the doctor names them and where to look."""
    sock = real_agent("-b", "guest-file-open,guest-file-read,guest-exec")
    found = _by_check(list(check_guest(DoctorContext(qga_socket=str(sock), vm="lab"))))
    (blocked,) = found["guest.agent-commands"]
    assert blocked.severity is Severity.WARNING
    assert "guest-file-open (read a Linux guest's /sys/bus/usb)" in blocked.title
    assert "guest-file-read" in blocked.title
    assert "guest-exec " not in blocked.title  # a Linux guest: guest-exec is not what we use
    assert "guest-info: guest-file-open enabled=false" in blocked.evidence
    assert blocked.fix and "BLACKLIST_RPC" in blocked.fix and "block-rpcs=" in blocked.fix
    assert "remove guest-file-open,guest-file-read there" in blocked.fix
    # the walk that needs them is not attempted (no error, no empty listing)
    assert "guest.linux-usb" not in found and not any(
        f.check.endswith(".failed") for fs in found.values() for f in fs
    )


def test_windows_agent_blocked_exec_and_too_old() -> None:
    """guest-info as qemu-ga on Windows answers (virtio-win's 2.5 had no guest-get-osinfo)."""
    info = {
        "version": "2.5.0",
        "supported_commands": [
            {"name": n, "enabled": n != "guest-exec", "success-response": True}
            for n in ("guest-sync", "guest-ping", "guest-info", "guest-exec", "guest-exec-status")
        ],
    }
    found = _by_check(agent_findings("win", "/qmp/qga.sock", info, {"id": "mswindows"}))
    (old,) = found["guest.agent-version"]
    assert old.severity is Severity.WARNING and "2.5.0 is older than 2.10" in old.title
    blocked, missing = found["guest.agent-commands"]
    assert "guest-exec (run Get-PnpDevice" in blocked.title
    assert (
        blocked.fix
        and "Services\\QEMU-GA" in blocked.fix
        and "Restart-Service QEMU-GA" in (blocked.fix)
    )
    assert "does not have guest-get-osinfo" in missing.title


def test_no_agent_on_the_channel(tmp_path: Path) -> None:
    path = tmp_path / "qga.sock"
    srv = s.socket(s.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)  # a channel whose guest side nobody answers (no agent in the guest)
    try:
        found = list(check_guest(DoctorContext(qga_socket=str(path), vm="w", timeout=0.5)))
    finally:
        srv.close()
    (f,) = found
    assert f.severity is Severity.WARNING and "does not answer" in f.title
    assert f.fix and "qemu-guest-agent" in f.fix


# ---------------------------------------------------------------- SPICE USB redirection

GADGETS = SYSFS / "gadgets"  # a real kernel's dummy_hcd: 4-1 is a Scarlett 4i4 (1235:821a)


def _scarlett_and_keylab() -> tuple[UsbDevice, UsbDevice]:
    devs = {d.vidpid: d for d in read_devices(GADGETS)}
    return devs["1235:821a"], devs["1c75:02cb"]


def _passed(dev: UsbDevice) -> Passed:
    assert dev.vendor_id is not None and dev.product_id is not None
    return Passed(dev.vendor_id, dev.product_id, dev.port, dev)


def test_filter_written_by_generate_spice_parses_the_same_way() -> None:
    scarlett, keylab = _scarlett_and_keylab()
    plan = plan_spice([scarlett])
    for sep in (",", ":"):
        rules = parse_filter(plan.filter(sep))
        assert [(r.vendor, r.product, r.allow) for r in rules] == [
            (0x1235, 0x821A, True),
            (-1, -1, False),
        ]
        assert filter_verdict(rules, _passed(scarlett)) == (True, 0)
        assert filter_verdict(rules, _passed(keylab)) == (False, 1)
    with pytest.raises(FilterSyntaxError, match="expected 5 fields"):
        parse_filter("-1,0x1235,0x821a,1")
    with pytest.raises(FilterSyntaxError, match="must be numbers"):
        parse_filter("-1,0x1235,zz,-1,1")
    with pytest.raises(FilterSyntaxError, match="vendor 65536 out of range"):
        parse_filter("-1,0x10000,1,-1,1")


def test_filter_checks_device_and_interface_classes_like_usbredir() -> None:
    """usbredirfilter_check: the device class (not 0x00/0xef), then every interface
    class; all must be allowed.  The Scarlett is 0xef with two audio interfaces."""
    scarlett, keylab = _scarlett_and_keylab()
    no_audio = parse_filter("0x01,-1,-1,-1,0|-1,-1,-1,-1,1")
    assert filter_verdict(no_audio, _passed(scarlett)) == (False, 0)
    assert filter_verdict(no_audio, _passed(keylab)) == (False, 0)  # KeyLab: audio/MIDI too
    serial = next(d for d in read_devices(GADGETS) if d.vidpid == "0525:a4a7")
    assert filter_verdict(no_audio, _passed(serial)) == (True, 1)
    # no rule matches: usbredir denies
    assert filter_verdict(parse_filter("-1,0x046d,-1,-1,1"), _passed(scarlett)) == (False, None)


def _spice_ok() -> bool:
    # QEMU lists the options and exits 1; without SPICE it says "There is no option group"
    res = subprocess.run([QEMU, "-spice", "help"], capture_output=True, text=True, check=False)
    return "disable-ticketing" in res.stdout + res.stderr


def _free_port() -> int:
    with s.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def _spice_vm(qemu: Any, *, filtered_second: bool = True) -> Any:
    if not _spice_ok():
        pytest.skip("this QEMU has no SPICE (Debian: qemu-system-modules-spice)")
    redir2 = "usb-redir,chardev=usbredirchardev2,id=usbredirdev2,bus=xhci.0"
    if filtered_second:
        redir2 += ",filter=-1:0x1235:0x821a:-1:0|-1:-1:-1:-1:1"
    args = [
        *XHCI,
        "-spice", f"port={_free_port()},addr=127.0.0.1,disable-ticketing=on",
        "-chardev", "spicevmc,name=usbredir,id=usbredirchardev1",
        "-device", "usb-redir,chardev=usbredirchardev1,id=usbredirdev1,bus=xhci.0",
        "-chardev", "spicevmc,name=usbredir,id=usbredirchardev2",
        "-device", redir2,
        "-device", "usb-host,vendorid=0x1235,productid=0x821a,id=scarlett,bus=xhci.0",
    ]  # fmt: skip
    proc = qemu(args, name=f"spice-{uuid.uuid4().hex[:6]}")
    proc.start()
    return proc


def _spice_check(proc: Any) -> list[Finding]:
    ctx = DoctorContext(sysfs_root=GADGETS, vm=proc.name, kernel_log_source=str, timeout=5.0)
    return [f for f in run_checks(ctx, list(CHECKS)) if f.check.startswith("guest.spice")]


@contextlib.contextmanager
def _spice_client(filter_text: str) -> Iterator[int]:
    """A process with remote-viewer's command line (no SPICE client is installed
    here): the doctor reads the real /proc/PID/cmdline.  Killed by PID."""
    proc = subprocess.Popen(
        ["remote-viewer", "-c", "import time; time.sleep(60)",
         f"--spice-usbredir-auto-redirect-filter={filter_text}", "spice://127.0.0.1:5900"],
        executable=sys.executable,
    )  # fmt: skip
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.qemu
def test_spice_usbredir_channels_on_a_real_vm_compete(qemu: Any) -> None:
    proc = _spice_vm(qemu)
    (f,) = _spice_check(proc)
    assert f.severity is Severity.WARNING and f.subject == "1235:821a"
    # channel 2's own QEMU filter blocks the device; channel 1 has none
    assert "channel(s) usbredirdev1 (spicevmc)" in f.title
    assert (
        "usb-redir usbredirdev1: chardev usbredirchardev1 (query-chardev: spicevmc), no filter, "
        "attached=false" in f.evidence
    )
    assert any("usbredirdev2" in e and "filter -1:0x1235:0x821a:-1:0" in e for e in f.evidence)
    assert f.fix is not None
    assert (
        "-device usb-redir,chardev=usbredirchardev1,id=usbredirdev1,"
        "filter=-1:0x1235:0x821a:-1:0|-1:-1:-1:-1:1"
    ) in f.fix
    assert "--spice-usbredir-auto-redirect-filter='-1,0x1235,0x821a,-1,0|-1,-1,-1,-1,1'" in f.fix
    assert "<usbdev vendor='0x1235' product='0x821a' allow='no'/>" in f.fix
    assert "-chardev spicevmc,name=usbredir,id=usbredirchardev1" in f.fix


@pytest.mark.qemu
def test_spice_client_auto_redirect_filter_that_takes_the_device(qemu: Any) -> None:
    proc = _spice_vm(qemu)
    with _spice_client("0x03,-1,-1,-1,0|-1,-1,-1,-1,1") as pid:
        found = _spice_check(proc)
    err = [f for f in found if f.severity is Severity.ERROR]
    assert len(err) == 1, found
    assert f"remote-viewer (pid {pid}) redirects 1235:821a" in err[0].title
    assert "rule 2 (-1,-1,-1,-1,1) allows 1235:821a" in err[0].evidence
    assert err[0].fix and (
        "--spice-usbredir-auto-redirect-filter='-1,0x1235,0x821a,-1,0|0x03,-1,-1,-1,0|"
        "-1,-1,-1,-1,1'" in err[0].fix
    )
    # the fix, applied, is judged clean: the client no longer takes it
    fixed = "-1,0x1235,0x821a,-1,0|0x03,-1,-1,-1,0|-1,-1,-1,-1,1"
    with _spice_client(fixed):
        found = _spice_check(proc)
    assert not [f for f in found if f.severity is Severity.ERROR]


@pytest.mark.qemu
def test_spice_without_competition(qemu: Any) -> None:
    if not _spice_ok():
        pytest.skip("this QEMU has no SPICE")
    port = _free_port()
    bare = qemu([*XHCI, "-spice", f"port={port},addr=127.0.0.1,disable-ticketing=on"],
                name=f"spice-{uuid.uuid4().hex[:6]}")  # fmt: skip
    bare.start()
    (f,) = _spice_check(bare)
    assert f.severity is Severity.OK and f"SPICE on 127.0.0.1:{port}" in f.title
    # every channel filtered: the device is safe from SPICE
    filtered = qemu(
        [*XHCI,
         "-chardev", "spicevmc,name=usbredir,id=c1", "-spice",
         f"port={_free_port()},addr=127.0.0.1,disable-ticketing=on",
         "-device", "usb-redir,chardev=c1,id=r1,bus=xhci.0,filter=-1:0x1235:-1:-1:0|-1:-1:-1:-1:1",
         "-device", "usb-host,vendorid=0x1235,productid=0x821a,id=scarlett,bus=xhci.0"],
        name=f"spice-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    filtered.start()
    (g,) = _spice_check(filtered)
    assert (
        g.severity is Severity.OK and "every SPICE usbredir channel's filter blocks it" in g.title
    )


# ---------------------------------------------------------------- Windows (documents, not captures)

WIN = DOCTOR / "windows"


def test_windows_services_as_get_service_writes_them() -> None:
    ok = parse_services_json((WIN / "services-ok.json").read_text())
    assert [(x.name, x.status, x.start) for x in ok] == [
        ("QEMU-GA", "Running", "Automatic"),
        ("spice-agent", "Running", "Automatic"),
    ]
    (f,) = service_findings(ok, "win")
    assert f.severity is Severity.OK
    one = parse_services_json("\ufeff" + (WIN / "services-strings.json").read_text())
    assert [(x.name, x.status, x.start) for x in one] == [("QEMU-GA", "Running", "Automatic")]
    bad = list(service_findings(parse_services_json((WIN / "services-bad.json").read_text()), "w"))
    assert [(x.severity, x.subject) for x in bad] == [
        (Severity.WARNING, "QEMU-GA"),
        (Severity.WARNING, "vdservice"),
    ]
    assert "starts Manual, not with Windows" in bad[0].title
    assert bad[0].fix and "Set-Service -Name QEMU-GA -StartupType Automatic" in bad[0].fix
    assert bad[1].fix and "Set-Service -Name vdservice -StartupType Disabled" in bad[1].fix
    assert "Get-Service vdservice (RHEV Spice Agent): Status=Running StartType=Automatic" in (
        bad[1].evidence
    )
    (none,) = service_findings([], "w")
    assert none.severity is Severity.OK and "none of QEMU-GA" in none.title


def test_virtio_drivers_as_get_pnpdevice_writes_them() -> None:
    devs = parse_pnp_json((WIN / "pnp-virtio.json").read_text())
    found = list(virtio_findings(devs, "win"))
    (balloon,) = found
    assert balloon.severity is Severity.ERROR
    assert balloon.title == (
        "VM win: PCI Device (virtio-balloon): Code 28 CM_PROB_FAILED_INSTALL: "
        "The drivers for this device are not installed."
    )
    assert balloon.fix and "pnputil /add-driver D:\\balloon\\w10\\amd64\\*.inf /install" in (
        balloon.fix
    )
    healthy = [d for d in devs if d.problem == 0]
    (ok,) = virtio_findings(healthy, "win")
    assert ok.severity is Severity.OK and "2 VirtIO/QEMU PCI devices" in ok.title
    assert any("qemu-xhci USB controller" in e for e in ok.evidence)
    assert "EHCI" in virtio_advice((0x1B36, 0x000D))
    assert "guest agent's channel" in virtio_advice((0x1AF4, 0x1043))
    assert pci_ids(devs[0].instance_id) == (0x1AF4, 0x1043)
