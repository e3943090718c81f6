"""QEMU-layer checks against real QEMU processes (TCG, no OS), found in /proc and over QMP.

Each QEMU gets a unique ``-name`` and the doctor is narrowed to it (``vm=``),
so it never talks to other QEMUs on this machine.  The host's USB tree is a
captured one (this machine has no USB bus).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmplug.cli import cli
from vmplug.doctor import guest, host, qemu
from vmplug.doctor import qemu as qemu_checks
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.doctor.qemu_info import parse_cmdline
from vmplug.wire.qmp import SyncQmp

from .conftest import BASE_ARGS, DOCTOR, QEMU, SYSFS, XHCI

pytestmark = pytest.mark.qemu
MINIMAL = SYSFS / "minimal"
IDENTICAL = SYSFS / "identical"


def unique() -> str:
    return f"doctor-{uuid.uuid4().hex[:8]}"


def check(vm: str, sysfs: Path = MINIMAL, timeout: float = 5.0) -> dict[str, list[Finding]]:
    ctx = DoctorContext(sysfs_root=sysfs, vm=vm, kernel_log_source=str, timeout=timeout)
    out: dict[str, list[Finding]] = {}
    for f in run_checks(ctx, list(qemu.CHECKS)):
        out.setdefault(f.check, []).append(f)
    return out


def test_usb1_only_vm_taking_a_shared_id(qemu: Any) -> None:
    vm = unique()
    proc = qemu(
        ["-usb", "-device", "usb-host,id=dup,vendorid=0x0627,productid=0x0001"],
        machine="pc",
        name=vm,
    )
    proc.start()
    found = check(vm, IDENTICAL)
    (p,) = found["qemu.process"]
    assert p.severity is Severity.OK and f"(pid {proc.pid})" in p.evidence[0]
    (ctl,) = found["qemu.controller"]
    assert ctl.severity is Severity.ERROR and "USB 1.1 controller (UHCI/OHCI)" in ctl.title
    # the identical capture's two keyboards are high-speed (xHCI USB 2 side)
    assert "2-1 (0627:0001, 480 Mbit/s)" in ctl.title
    assert "controller piix3-usb-uhci (uhci)" in ctl.evidence  # from QMP query-pci
    assert any(e.startswith("-usb on machine pc") for e in ctl.evidence)
    assert ctl.fix and "qemu-xhci" in ctl.fix
    (dup,) = found["qemu.duplicate-ids"]
    assert dup.severity is Severity.WARNING
    assert "1 usb-host by vendorid:productid and 2 host devices" in dup.title
    assert dup.fix and "hostbus=2,hostport=1" in dup.fix and "hostport=3" in dup.fix
    assert found["qemu.usb-host-match"][0].severity is Severity.OK
    (att,) = found["qemu.attached"]  # QEMU's own view (QOM): it holds nothing here
    assert att.severity is Severity.WARNING and "dup (not vmplug's) waits" in att.title


def test_uhci_controller_on_q35_and_nothing_high_speed(qemu: Any) -> None:
    vm = unique()
    qemu(["-device", "piix3-usb-uhci,id=uhci"], name=vm).start()
    (ctl,) = check(vm)["qemu.controller"]
    assert ctl.severity is Severity.WARNING and "no high-speed device will work" in ctl.title
    assert "controller piix3-usb-uhci (uhci)" in ctl.evidence


def test_xhci_by_port_is_quiet(qemu: Any) -> None:
    vm = unique()
    qemu(
        [
            "-device", "qemu-xhci,id=xhci",
            "-device", "usb-host,bus=xhci.0,id=vmplug-0123456789ab,hostbus=2,hostport=1",
        ],
        name=vm,
    ).start()  # fmt: skip
    found = check(vm, IDENTICAL)
    assert found["qemu.controller"][0].severity is Severity.OK
    assert "qemu.duplicate-ids" not in found  # matched by port: no id to share
    assert found["qemu.usb-host-match"][0].severity is Severity.OK
    (att,) = found["qemu.attached"]
    assert "vmplug-0123456789ab (vmplug's)" in att.title
    assert "hostbus=2,hostport=1" in att.evidence[1]


def test_two_usb_host_with_one_id_and_waiting(qemu: Any) -> None:
    vm = unique()
    qemu(
        [
            "-device", "qemu-xhci,id=xhci",
            "-device", "usb-host,id=vmplug-aaaaaaaaaaaa,vendorid=0x1235,productid=0x821a",
            "-device", "usb-host,id=second,vendorid=0x1235,productid=0x821a",
        ],
        name=vm,
    ).start()  # fmt: skip
    found = check(vm)
    (dup,) = found["qemu.duplicate-ids"]
    assert dup.severity is Severity.WARNING and "1235:821a: 2 usb-host" in dup.title
    waits = {f.subject: f for f in found["qemu.attached"]}
    assert waits["vmplug-aaaaaaaaaaaa"].severity is Severity.INFO
    assert "(vmplug's) waits for its device (not plugged in)" in waits["vmplug-aaaaaaaaaaaa"].title
    assert "(not vmplug's)" in waits["second"].title


def test_busy_qmp_socket(qemu: Any) -> None:
    vm = unique()
    proc = qemu(["-device", "qemu-xhci,id=xhci"], name=vm)
    proc.start()
    holder = SyncQmp(proc.qmp_path)  # another client: QMP serves one at a time
    try:
        (p,) = check(vm, timeout=1.0)["qemu.process"]
    finally:
        holder.close()
    assert p.severity is Severity.WARNING and p.title.endswith("QMP does not answer")
    assert "busy" in p.evidence[-1] and p.fix and "-qmp unix:" in p.fix
    (p,) = check(vm)["qemu.process"]
    assert p.severity is Severity.OK


def test_cmdline_parsing() -> None:
    inst = parse_cmdline(
        [
            "/usr/bin/qemu-system-x86_64", "-name", "guest=win,debug-threads=on",
            "-machine", "pc-q35-8.2,usb=off", "-S",
            "-chardev", "socket,id=charmonitor,path=/run/libvirt/qemu/win.monitor,server=on",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-chardev", "socket,id=qga0,path=qga.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", "{\"driver\":\"qemu-xhci\",\"id\":\"usb\"}",
            "--device", "ich9-usb-ehci1,id=ehci",
            "-device", "usb-host,hostdevice=/dev/bus/usb/003/007,id=hostdev0,bus=ehci.0",
            "-device", "usb-host,id=x,vendorid=0x1235,productid=0x821a,serial=a,,b",
        ],
        cwd="/var/lib/vm",
    )  # fmt: skip
    assert inst.name == "win" and inst.machine == "pc-q35-8.2" and not inst.usb_flag
    assert inst.qmp_paths == ["/run/libvirt/qemu/win.monitor"]
    assert inst.qga_path == "/var/lib/vm/qga.sock"
    assert inst.controllers == [("qemu-xhci", "xhci"), ("ich9-usb-ehci1", "ehci")]
    (by_dev, by_id) = inst.usb_hosts
    assert by_dev.by_address() and by_dev.id == "hostdev0"
    assert by_id.vidpid() == (0x1235, 0x821A) and by_id.props["serial"] == "a,b"


def test_cli_healthy_vm_has_nothing_to_fix(qemu: Any, tmp_path: Path) -> None:
    vm = unique()
    proc = qemu(
        [
            "-device", "qemu-xhci,id=xhci",
            "-device", "usb-host,id=vmplug-bbbbbbbbbbbb,vendorid=0x1235,productid=0x821a",
        ],
        name=vm,
    )  # fmt: skip
    proc.start()
    config = tmp_path / "vmplug.toml"
    config.write_text(f'[vm.{vm}]\nqmp = "{proc.qmp_path}"\n')
    log = tmp_path / "kern.log"
    log.write_text("[    1.000000] usb 2-1: new full-speed USB device number 2 using xhci_hcd\n")
    args = ["--sysfs-root", str(MINIMAL), "--config", str(config), "doctor", "--vm", vm]
    args += ["--kernel-log", str(log), "--docker-socket", str(tmp_path / "no.sock")]
    args += ["--dev-root", str(tmp_path)]
    res = CliRunner().invoke(cli, [*args, "--json"])
    doc = json.loads(res.stdout)
    bad = [f for f in doc["findings"] if f["severity"] in ("warning", "error")]
    assert bad == [] and res.exit_code == 0 and doc["status"] == "ok"
    titles = [f["title"] for f in doc["findings"]]
    assert f"VM {vm}: QEMU found, QMP answers on {proc.qmp_path}" in titles
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "nothing to fix" in res.stdout
    assert "✓" in res.stdout and "qemu\n" in res.stdout


def test_cli_errors_exit_1_and_help(tmp_path: Path) -> None:
    args = ["--sysfs-root", str(MINIMAL), "doctor", "--proc-root", str(tmp_path), "--json"]
    args += ["--kernel-log", str(DOCTOR / "kernel" / "hub-errors.log"), "--docker-socket", "x"]
    args += ["--inspect", str(DOCTOR / "docker" / "windows-bad.json")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1  # found errors; 2 is bad input
    doc = json.loads(res.stdout)
    assert doc["exit_status"] == 1 and doc["status"] == "error" and doc["counts"]["error"] >= 3
    assert {f["layer"] for f in doc["findings"]} == {"host", "container", "qemu", "guest"}
    res = CliRunner().invoke(cli, ["doctor", "--help"])
    assert "Examples:" in res.stdout
    assert "Exit status: 0 nothing wrong, 1 found problems" in res.stdout


def test_guest_agent_channel_without_an_agent(qemu: Any, tmp_path: Path) -> None:
    vm = unique()
    sock = Path(tempfile.mkdtemp(prefix="vmplug-qga", dir="/tmp")) / "qga.sock"
    try:
        qemu(
            [
                "-device", "qemu-xhci,id=xhci",
                "-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            ],
            name=vm,
        ).start()  # fmt: skip
        ctx = DoctorContext(sysfs_root=MINIMAL, vm=vm, timeout=1.5)
        (f,) = run_checks(ctx, list(guest.CHECKS))
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)
    # the channel is on the command line, but no OS runs an agent behind it
    assert f.severity is Severity.WARNING and f.title == f"VM {vm}: the guest agent does not answer"
    assert f.evidence[0].startswith(f"{sock}: ") and "qemu-guest-agent" in (f.fix or "")


def test_no_guest_agent_channel_says_how_to_add_one(qemu: Any) -> None:
    vm = unique()
    qemu(["-device", "qemu-xhci,id=xhci"], name=vm).start()
    (f,) = run_checks(DoctorContext(sysfs_root=MINIMAL, vm=vm), list(guest.CHECKS))
    assert f.severity is Severity.INFO and "no guest agent channel" in f.title
    fix = f.fix or ""
    assert "-device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in fix
    assert "<target type='virtio' name='org.qemu.guest_agent.0'/>" in fix
    assert "ARGUMENTS" in fix and "apt install qemu-guest-agent" in fix and ".msi" in fix


def test_vm_in_a_container_found_through_its_compose_file(qemu: Any) -> None:
    """A QEMU whose QMP socket is in the compose project's ./qmp, bound at /qmp inside."""
    project = Path(tempfile.mkdtemp(prefix="vmplug-dc", dir="/tmp"))
    try:
        name = unique()
        proc = qemu(["-usb"], machine="pc", name=name, sock_dir=project / "qmp")
        (project / "qmp").mkdir()
        proc.start()
        compose = project / "docker-compose.yml"
        compose.write_text(
            "services:\n  windows:\n    image: dockurr/windows\n    container_name: studio\n"
            "    environment:\n"
            f'      ARGUMENTS: "-qmp unix:/qmp/{name}-qmp0.sock,server=on,wait=off"\n'
            "    volumes:\n      - ./qmp:/qmp\n      - /dev/bus/usb:/dev/bus/usb\n"
        )
        ctx = DoctorContext(
            sysfs_root=MINIMAL, vm="studio", compose_files=[compose], api_sockets=[]
        )
        found = run_checks(ctx, list(qemu_checks.CHECKS))
    finally:
        shutil.rmtree(project, ignore_errors=True)
    by = {f.check: f for f in found}
    # the process in /proc and the container's socket are one VM, named after the container
    assert by["qemu.process"].title == f"VM studio: QEMU found, QMP answers on {proc.qmp_path}"
    assert by["qemu.process"].severity is Severity.OK
    assert by["qemu.controller"].severity is Severity.WARNING  # -usb on pc: UHCI only


def test_libvirt_monitor_passed_as_fd() -> None:
    inst = parse_cmdline(
        [
            "qemu-system-x86_64", "-name", "guest=win11,debug-threads=on",
            "-chardev", "socket,id=charmonitor,fd=27,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
        ]
    )  # fmt: skip
    assert inst.qmp_paths == [] and inst.monitor_fd and inst.name == "win11"


def test_cli_bad_rule_is_bad_input() -> None:
    res = CliRunner().invoke(cli, ["--sysfs-root", str(MINIMAL), "doctor", "rule:id zz:qq"])
    assert res.exit_code == 2 and "Traceback" not in res.output


@pytest.fixture
def spawn_qemu() -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    """QEMU started with a command line of the test's own (killed by PID at teardown)."""
    made: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        made.append(proc)
        return proc

    yield start
    for proc in made:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_qemu_without_qmp(spawn_qemu: Any) -> None:
    vm = unique()
    proc = spawn_qemu([QEMU, "-machine", "q35", *BASE_ARGS, "-name", vm, *XHCI])
    deadline = time.monotonic() + 20
    while f"-name\0{vm}".encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (p,) = check(vm)["qemu.process"]
    assert p.severity is Severity.WARNING and "no QMP unix socket" in p.title
    assert p.fix and p.fix.startswith(f"-qmp unix:/run/vmplug/{vm}.qmp,server=on,wait=off")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_qemu_user_may_not_open_the_node(spawn_qemu: Any, tmp_path: Path) -> None:
    """QEMU running as nobody; the device node root:root 0660, as without a udev rule."""
    vm = unique()
    sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-q", dir="/tmp"))
    try:
        sock_dir.chmod(0o777)
        sock = sock_dir / "qmp.sock"
        setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = spawn_qemu(
            [*setpriv, QEMU, "-machine", "q35", *BASE_ARGS, "-name", vm, *XHCI,
             "-qmp", f"unix:{sock},server=on,wait=off"]
        )  # fmt: skip
        _wait_for(sock, proc)
        dev_root = tmp_path / "dev"
        node = dev_root / "bus" / "usb" / "002" / "002"
        node.parent.mkdir(parents=True)
        major, minor = next(MINIMAL.glob("devices/pci*/*/usb2/2-1/dev")).read_text().split(":")
        os.mknod(node, stat.S_IFCHR | 0o660, os.makedev(int(major), int(minor)))
        node.chmod(0o660)
        ctx = DoctorContext(sysfs_root=MINIMAL, vm=vm, device="2-1", dev_root=dev_root)
        (f,) = run_checks(ctx, [c for c in host.CHECKS if c.id == "host.devnode"])
        assert f.severity is Severity.ERROR, f
        assert f"QEMU ({vm} pid {proc.pid}) may not open {node}" in f.title
        assert f"{vm} pid {proc.pid}: uid 65534 gids [65534]" in f.evidence
        assert f.fix and 'GROUP="kvm", MODE="0660"' in f.fix
        node.chmod(0o666)  # what a MODE="0666" rule would do: quiet
        ctx = DoctorContext(sysfs_root=MINIMAL, vm=vm, device="2-1", dev_root=dev_root)
        (f,) = run_checks(ctx, [c for c in host.CHECKS if c.id == "host.devnode"])
        assert f.severity is Severity.OK and "QEMU may open it" in f.title
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
