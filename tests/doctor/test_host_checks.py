"""Host checks over captured sysfs trees, real files, real processes, real logs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug.doctor import host
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.history.store import Store
from vmplug.host.inventory import read_devices

from .conftest import DOCTOR, SYSFS

MIXED = SYSFS / "mixed"
MINIMAL = SYSFS / "minimal"
NOLOG = lambda: ""  # noqa: E731


def run(ctx: DoctorContext, check_id: str) -> list[Finding]:
    (spec,) = [c for c in host.CHECKS if c.id == check_id]
    return run_checks(ctx, [spec])


def worst(findings: list[Finding]) -> Severity:
    return max(f.severity for f in findings)


# ---------------------------------------------------------------- present + history


def test_present_device_with_its_history(tmp_path: Path) -> None:
    dev = next(d for d in read_devices(MINIMAL) if d.port == "2-1")
    with Store(tmp_path / "v.db") as st:
        st.remember_device(dev, ts=1_700_000_000.0)
        st.record_event("device-add", identity=dev.identity, port="2-1")
    ctx = DoctorContext(
        sysfs_root=MINIMAL, device="2-1", store_path=tmp_path / "v.db", kernel_log_source=NOLOG
    )
    (f,) = run(ctx, "host.present")
    ctx.close()
    assert f.severity is Severity.OK and f.subject == "2-1"
    assert any(e.startswith("history: first seen 2023-11-1") for e in f.evidence)
    assert any(e.startswith("history: present since") for e in f.evidence)


def test_absent_device_says_when_and_where_it_was_last_seen(tmp_path: Path) -> None:
    audio = next(d for d in read_devices(MIXED) if d.port == "2-2.1")
    with Store(tmp_path / "v.db") as st:
        st.remember_device(audio, ts=1_700_000_000.0)
    log = "[ 12.000000] usb 2-2.1: USB disconnect, device number 4\n"
    ctx = DoctorContext(
        sysfs_root=MINIMAL,
        device="46f4:0002",
        store_path=tmp_path / "v.db",
        kernel_log_source=lambda: log,
    )
    (f,) = run(ctx, "host.present")
    ctx.close()
    assert f.severity is Severity.ERROR and "not plugged in" in f.title
    assert any("last seen 2023-11-1" in e and "at port 2-2.1" in e for e in f.evidence)
    assert "kernel: [ 12.000000] usb 2-2.1: USB disconnect, device number 4" in f.evidence


# ---------------------------------------------------------------- kernel log


def test_kernel_log_of_a_real_replug_and_reset() -> None:
    log = (DOCTOR / "kernel" / "lab-replug.log").read_text()
    ctx = DoctorContext(sysfs_root=MINIMAL, kernel_log_source=lambda: log)
    found = {
        (f.subject, f.title.split(": ", 1)[1].split(" in ")[0]): f
        for f in run(ctx, "host.kernel-log")
    }
    disc = found[("2-2", "disconnect")]
    # replugged three times: the port is flapping
    assert disc.severity is Severity.WARNING and "(3x)" in disc.title
    assert all("usb 2-2: USB disconnect, device number" in e for e in disc.evidence)
    assert disc.fix and "cable" in disc.fix


def test_kernel_log_enumeration_errors_and_over_current() -> None:
    log = (DOCTOR / "kernel" / "hub-errors.log").read_text()
    ctx = DoctorContext(sysfs_root=MINIMAL, kernel_log_source=lambda: log)
    found = {
        (f.subject, f.title.split(": ", 1)[1].split(" in ")[0]): f
        for f in run(ctx, "host.kernel-log")
    }
    assert found[("3-2", "descriptor read error")].severity is Severity.ERROR
    assert "(2x)" in found[("3-2", "descriptor read error")].title
    assert found[("3-2", "not accepting address")].evidence == (
        "[  838.177304] usb 3-2: device not accepting address 13, error -71",
    )
    # a hub port's message (usb3-port2) belongs to the device port 3-2
    assert found[("3-2", "cannot enumerate")].severity is Severity.ERROR
    oc = found[("1-4", "over-current")]
    assert oc.severity is Severity.ERROR and oc.fix and "powered hub" in oc.fix
    assert found[("2-1.2", "reset")].severity is Severity.INFO  # one reset is normal


def test_kernel_log_narrowed_to_device_and_quiet_without_errors() -> None:
    log = (DOCTOR / "kernel" / "hub-errors.log").read_text()
    ctx = DoctorContext(sysfs_root=MINIMAL, device="2-1", kernel_log_source=lambda: log)
    (f,) = run(ctx, "host.kernel-log")
    assert f.severity is Severity.OK and "for 2-1" in f.title
    ctx = DoctorContext(sysfs_root=MINIMAL, kernel_log_source=NOLOG)
    assert worst(run(ctx, "host.kernel-log")) is Severity.OK


def test_kernel_log_unreadable_is_a_note() -> None:
    def deny() -> str:
        raise PermissionError("/dev/kmsg: Operation not permitted")

    (f,) = run(DoctorContext(sysfs_root=MINIMAL, kernel_log_source=deny), "host.kernel-log")
    assert f.severity is Severity.INFO and f.fix and "--kernel-log" in f.fix


# ---------------------------------------------------------------- autosuspend


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_autosuspend_on_an_audio_device(tmp_path: Path) -> None:
    # quiet on the capture as the kernel left it (power/control = on)
    ctx = DoctorContext(sysfs_root=MIXED, kernel_log_source=NOLOG)
    (f,) = run(ctx, "host.autosuspend")
    assert f.severity is Severity.OK and f.subject == "2-2.1"
    # what `echo auto > power/control` does to the same tree
    root = _copy_tree(MIXED, tmp_path / "sys")
    ctl = next(root.glob("devices/pci*/*/usb2/2-2/2-2.1/power/control"))
    ctl.write_text("auto\n")
    (f,) = run(DoctorContext(sysfs_root=root, kernel_log_source=NOLOG), "host.autosuspend")
    assert f.severity is Severity.WARNING and f.subject == "2-2.1"
    assert f.evidence == (f"{ctl} = auto",)
    assert f.fix and f"echo on > {ctl}" in f.fix
    assert 'ATTR{idVendor}=="46f4", ATTR{idProduct}=="0002"' in f.fix  # generate udev
    # HID devices autosuspend by design: never flagged
    assert {x.subject for x in run(DoctorContext(sysfs_root=root), "host.autosuspend")} == {"2-2.1"}


# ---------------------------------------------------------------- holders


def test_host_driver_holds_a_device_meant_for_a_vm() -> None:
    ctx = DoctorContext(sysfs_root=MIXED, device="2-2.1", dev_root=Path("/nonexistent"))
    (f,) = run(ctx, "host.holders")
    assert f.severity is Severity.WARNING and "snd-usb-audio" in f.title
    assert any(e.endswith("2-2.1:1.0/driver -> snd-usb-audio") for e in f.evidence)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A real process (not QEMU) holding the device's /dev/bus/usb node open."""
    node = tmp_path / "dev" / "bus" / "usb" / "002" / "002"
    node.parent.mkdir(parents=True)
    node.write_bytes(b"")
    with node.open("rb") as f:
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        yield tmp_path / "dev", proc
    finally:
        proc.kill()
        proc.wait()


def test_another_program_holding_the_node_blocks_qemu(
    holder: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    dev_root, proc = holder
    ctx = DoctorContext(sysfs_root=MINIMAL, device="2-1", dev_root=dev_root)
    (f,) = run(ctx, "host.holders")
    assert f.severity is Severity.ERROR and "sleep holds its USB node" in f.title
    assert f"{dev_root}/bus/usb/002/002 open by sleep (pid {proc.pid})" in f.evidence
    assert f.fix == f"stop sleep (pid {proc.pid}) first"


# ---------------------------------------------------------------- device node


def _node(dev_root: Path, rdev: tuple[int, int], mode: int = 0o664) -> Path:
    node = dev_root / "bus" / "usb" / "002" / "002"
    node.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(node, stat.S_IFCHR | mode, os.makedev(*rdev))
    node.chmod(mode)  # whatever the umask
    return node


def _sysfs_dev(root: Path, port: str) -> tuple[int, int]:
    text = next(root.glob(f"devices/pci*/*/usb*/{port}/dev")).read_text().strip()
    major, minor = text.split(":")
    return int(major), int(minor)


def test_devnode_missing_stale_and_right(tmp_path: Path) -> None:
    want = _sysfs_dev(MINIMAL, "2-1")
    dev_root = tmp_path / "dev"
    ctx = DoctorContext(sysfs_root=MINIMAL, device="2-1", dev_root=dev_root, proc_root=tmp_path)
    (f,) = run(ctx, "host.devnode")
    assert f.severity is Severity.ERROR and "does not exist" in f.title
    node = _node(dev_root, (want[0], want[1] + 1))  # the node of another device number
    (f,) = run(
        DoctorContext(sysfs_root=MINIMAL, device="2-1", dev_root=dev_root, proc_root=tmp_path),
        "host.devnode",
    )
    assert f.severity is Severity.ERROR and "stale" in f.title
    assert f"{node}: crw-rw-r-- uid 0 gid 0 dev {want[0]}:{want[1] + 1}" in f.evidence
    node.unlink()
    _node(dev_root, want)
    (f,) = run(
        DoctorContext(sysfs_root=MINIMAL, device="2-1", dev_root=dev_root, proc_root=tmp_path),
        "host.devnode",
    )
    assert f.severity is Severity.OK and "is its node" in f.title


# ---------------------------------------------------------------- bandwidth, controller


def test_bandwidth_fits_on_the_capture() -> None:
    (f,) = run(DoctorContext(sysfs_root=MIXED), "host.bandwidth")
    assert f.severity is Severity.OK
    domains = host.bandwidth_domains(read_devices(MIXED))
    # the full-speed hub 2-2 and everything under it share one 12 Mbit/s tree
    cap, devs = domains["full-speed tree under 2-2 (12 Mbit/s)"]
    assert cap == pytest.approx(10.8e6)
    assert {d.port for d in devs} == {"2-2", "2-2.1", "2-2.4", "2-2.4.1", "2-2.4.2"}
    assert {d.port for d in domains["bus 1 (480 Mbit/s)"][1]} == {"1-1", "1-3"}


def test_controller_sharing_is_a_note() -> None:
    (f,) = run(DoctorContext(sysfs_root=MIXED, device="2-2.1"), "host.controller")
    assert f.severity is Severity.INFO and "0000:00:0b.0" in f.title
    assert any(e.startswith("2-2.4.2 (0627:0001") for e in f.evidence)
    (f,) = run(DoctorContext(sysfs_root=MINIMAL, device="2-1"), "host.controller")
    assert f.severity is Severity.OK


# ---------------------------------------------------------------- udev symlinks


def test_udev_symlinks(tmp_path: Path) -> None:
    dev_root = tmp_path / "dev"
    want = _sysfs_dev(MINIMAL, "2-1")
    _node(dev_root, want)
    links = dev_root / "vmplug"
    links.mkdir()
    (links / "0627-0001-port2-1").symlink_to("../bus/usb/002/002")
    (f,) = run(DoctorContext(sysfs_root=MINIMAL, dev_root=dev_root), "host.symlinks")
    assert f.severity is Severity.OK and "1 udev symlinks" in f.title
    (links / "1235-821a-port3-1").symlink_to("../bus/usb/003/007")  # its device left
    (links / "1c75-02cb-port2-1").symlink_to("../bus/usb/002/002")  # now another device's node
    found = {
        f.subject: f
        for f in run(DoctorContext(sysfs_root=MINIMAL, dev_root=dev_root), "host.symlinks")
    }
    assert set(found) == {str(links / "1235-821a-port3-1"), str(links / "1c75-02cb-port2-1")}
    gone = found[str(links / "1235-821a-port3-1")]
    assert gone.severity is Severity.WARNING and "gone" in gone.title
    other = found[str(links / "1c75-02cb-port2-1")]
    assert "now another device (0627:0001)" in other.title


def test_usb1_controller_shares_one_schedule(tmp_path: Path) -> None:
    # the capture's xHCI USB 2 root hub, as a USB 1.1 controller's would read (12)
    root = _copy_tree(MIXED, tmp_path / "sys")
    next(root.glob("devices/pci*/*/usb2/speed")).write_text("12\n")
    domains = host.bandwidth_domains(read_devices(root))
    assert "bus 2 (USB 1.1 controller, 12 Mbit/s)" in domains
    assert not any(k.startswith("full-speed tree") for k in domains)
