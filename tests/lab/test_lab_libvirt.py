"""Lab: `vmplug run` keeps USB devices in a libvirt domain, with real USB.

Inside the lab guest (hub, keyboard, tablet; real kernel, sysfs, uevents,
/dev/bus/usb) a real libvirtd runs in system mode from the host's read-only
root that virtme-ng shares: /etc, /var and /tmp are the guest's writable
overlays and /run is a tmpfs, so it needs no more than its directories and a
qemu.conf for a guest without cgroups, D-Bus or virtlogd.  It runs a TCG
domain (q35, qemu-xhci, no OS) and `vmplug run` drives it through
``libvirt = "labvm"``.

What the domain holds is read the way a user would: `virsh dumpxml` (the live
XML's ``<hostdev>`` with vmplug's ``ua-vmplug-…`` alias and the device's
bus/device address) and QEMU's own QOM through `virsh qemu-monitor-command`
(the ``usb-host`` with that id, ``attached`` true).  The tests run in order:
start -> unplug -> replug -> `virsh destroy` + `start` -> daemon restart.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmplug.vms.libvirt import usb_hostdevs
from vmplug_lab.demo import DEVICES, KBD, PORTS, TABLET
from vmplug_lab.guest import GuestProcess, LabError, LabGuest, lab_unavailable_reason

pytestmark = pytest.mark.lab

DOMAIN = "labvm"
VIRSH = "virsh -c qemu:///system"
GUEST_DIR = "/tmp/vmplug-lv"
#: A guest without systemd: no cgroup controllers, no D-Bus, no virtlogd,
#: nothing to confine (the guest is thrown away).
QEMU_CONF = """
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
"""
DOMAIN_XML = f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='qemu-xhci'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""
CONFIG = f"""\
[vm.win]
libvirt = "{DOMAIN}"

[[rule]]
attach = "win"
match = 'id 0627:0001'
"""
SYSFS_MAP = (
    "for d in /sys/bus/usb/devices/*; do [ -f $d/devnum ] && "
    'echo "${d##*/} $(cat $d/busnum) $(cat $d/devnum)"; done'
)


@dataclass
class Held:
    """What the domain holds: vmplug ids -> host port (via the guest's sysfs)."""

    ports: dict[str, str] = field(default_factory=dict)  # dev_id -> "2-2.1" or "gone"
    addresses: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)

    def holds(self, expected: list[str]) -> bool:
        return sorted(self.ports.values()) == sorted(expected)


class LibvirtLab:
    def __init__(self, workdir: Path) -> None:
        self.guest = LabGuest(DEVICES, workdir / "lab", memory="1536M")
        self.daemon: GuestProcess | None = None
        self.libvirtd: GuestProcess | None = None
        self.daemon_starts = 0
        self.logs: list[Path] = []

    def run(self, cmd: str, timeout: float = 120.0) -> str:
        return self.guest.run(cmd, timeout=timeout, check=True).stdout

    def boot(self) -> None:
        g = self.guest
        g.start()
        wd = g.workdir
        (wd / "qemu.conf").write_text(QEMU_CONF)
        (wd / "domain.xml").write_text(DOMAIN_XML)
        (wd / "vmplug.toml").write_text(CONFIG)
        # libvirtd resolves its default QEMU user, libvirt-qemu, before it reads
        # qemu.conf ("Failed to parse user 'libvirt-qemu'" without it): the
        # guest's own /etc gets it when the host's has none (scripts/install.sh
        # makes it; libvirt-daemon-system's postinst may not have run).
        self.run(
            "getent group kvm >/dev/null || groupadd --system kvm; "
            "getent passwd libvirt-qemu >/dev/null || useradd --system --gid kvm"
            " --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu"
        )
        self.run(
            f"mkdir -p {GUEST_DIR} /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt "
            f"/var/cache/libvirt && cat {wd}/qemu.conf >> /etc/libvirt/qemu.conf"
        )
        self.libvirtd = g.spawn("libvirtd --timeout 0", log=f"{wd}/libvirtd.log")
        g.wait_for("test -S /run/libvirt/libvirt-sock", timeout=120)
        self.run(f"{VIRSH} define {wd}/domain.xml && {VIRSH} start {DOMAIN}", timeout=300)
        g.wait_for(" && ".join(f"test -e /sys/bus/usb/devices/{p}" for p in PORTS.values()))

    def start_daemon(self, timeout: float = 180.0) -> None:
        self.daemon_starts += 1
        log = self.guest.workdir / f"daemon-{self.daemon_starts}.log"
        self.logs.append(log)
        vmplug = Path(sys.executable).parent / "vmplug"
        self.daemon = self.guest.spawn(
            f"{vmplug} --config {self.guest.workdir}/vmplug.toml run"
            f" --socket {GUEST_DIR}/vmplug.sock --db {GUEST_DIR}/vmplug.db --events kernel",
            log=str(log),
        )
        deadline = time.monotonic() + timeout
        while "vm win: connected" not in self.log():
            if self.guest.poll(self.daemon) is not None:
                raise LabError(f"vmplug run exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise LabError(f"vmplug run did not reach the domain:\n{self.log()}")
            time.sleep(0.3)

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.guest.kill(self.daemon, signal.SIGTERM, timeout=30)
            self.daemon = None

    def log(self, index: int = -1) -> str:
        try:
            return self.logs[index].read_text(errors="replace")
        except (OSError, IndexError):
            return ""

    def close(self) -> None:
        self.guest.stop()  # everything inside (libvirtd, its QEMU, vmplug) goes with it

    # ------------------------------------------------------------- observing

    def held(self) -> Held:
        out = self.run(f"{VIRSH} dumpxml {DOMAIN} && echo ---- && {SYSFS_MAP}")
        xml, _, table = out.partition("----")
        where = {}
        for line in table.split("\n"):
            parts = line.split()
            if len(parts) == 3:
                where[(int(parts[1]), int(parts[2]))] = parts[0]
        held = Held()
        for hd in usb_hostdevs(xml):
            if hd.dev_id.startswith("vmplug-"):
                held.ports[hd.dev_id] = where.get((hd.bus or 0, hd.device or 0), "gone")
                held.addresses[hd.dev_id] = (hd.bus, hd.device)
        return held

    def qom(self) -> dict[str, Any]:
        """QEMU's usb-host devices and their ``attached``, from QOM through libvirt."""

        def qmp(cmd: str, **args: Any) -> Any:
            text = json.dumps({"execute": cmd, "arguments": args})
            out = self.run(f"{VIRSH} qemu-monitor-command {DOMAIN} {shlex.quote(text)}")
            return json.loads(out)["return"]

        found = {}
        for child in qmp("qom-list", path="/machine/peripheral"):
            if child["type"] == "child<usb-host>":
                path = f"/machine/peripheral/{child['name']}"
                found[child["name"]] = qmp("qom-get", path=path, property="attached")
        return found

    def wait(self, check: Callable[[Held], bool], timeout: float = 90.0) -> Held:
        deadline = time.monotonic() + timeout
        while True:
            held = self.held()
            if check(held):
                return held
            if time.monotonic() > deadline:
                raise AssertionError(f"domain holds {held}; daemon log:\n{self.log()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = LibvirtLab(Path(tmp_path_factory.mktemp("lv")))
    try:
        lab.boot()
        yield lab
    finally:
        lab.close()


def both() -> list[str]:
    return sorted(PORTS.values())


def test_daemon_attaches_into_the_domain(lab: LibvirtLab) -> None:
    assert lab.held().ports == {}
    lab.start_daemon()
    held = lab.wait(lambda h: h.holds(both()))
    assert all(bus == 2 for bus, _ in held.addresses.values())
    # QEMU itself has them: libvirt passed vmplug's alias on as the device id
    qom = lab.qom()
    assert qom == {f"ua-{dev_id}": True for dev_id in held.ports}


def test_unplug_takes_it_out_of_the_domain(lab: LibvirtLab) -> None:
    before = lab.held()
    kbd_id = next(i for i, p in before.ports.items() if p == PORTS[KBD.id])
    lab.guest.unplug(KBD.id)
    held = lab.wait(lambda h: h.holds([PORTS[TABLET.id]]))
    assert kbd_id not in held.ports, "the stale <hostdev> was detached"
    assert set(lab.qom()) == {f"ua-{i}" for i in held.ports}


def test_replug_brings_it_back_at_its_new_address(lab: LibvirtLab) -> None:
    devnum_before = int(lab.run(f"cat /sys/bus/usb/devices/{PORTS[TABLET.id]}/devnum"))
    lab.guest.hotplug(KBD)
    held = lab.wait(lambda h: h.holds(both()))
    kbd_id = next(i for i, p in held.ports.items() if p == PORTS[KBD.id])
    kbd_devnum = int(lab.run(f"cat /sys/bus/usb/devices/{PORTS[KBD.id]}/devnum"))
    assert held.addresses[kbd_id] == (2, kbd_devnum) and kbd_devnum > devnum_before
    assert all(lab.qom().values())


def test_domain_destroyed_and_started_gets_its_devices_back(lab: LibvirtLab) -> None:
    connected_before = lab.log().count("vm win: connected")
    lab.run(f"{VIRSH} destroy {DOMAIN}")
    assert lab.held().ports == {}
    lab.run(f"{VIRSH} start {DOMAIN}", timeout=300)
    lab.wait(lambda h: h.holds(both()), timeout=180)
    assert lab.log().count("vm win: connected") == connected_before + 1, "a lifecycle event"
    assert all(lab.qom().values())


def test_daemon_restart_adopts_without_duplicates(lab: LibvirtLab) -> None:
    before = lab.held()
    lab.stop_daemon()
    lab.start_daemon()
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        held = lab.held()
        assert held.ports == before.ports, held
        time.sleep(0.5)
    assert len(lab.qom()) == 2
    assert " attach vmplug-" in lab.log(0), "the first daemon's log names its attaches"
    new_log = lab.log()
    assert " attach vmplug-" not in new_log, new_log


def test_persist_writes_the_domain_config(lab: LibvirtLab) -> None:
    """``persist = true``: what vmplug attaches also goes into the persistent
    config, so the domain gets its devices at start even with no vmplug."""
    (lab.guest.workdir / "vmplug.toml").write_text(
        CONFIG.replace(f'libvirt = "{DOMAIN}"', f'libvirt = "{DOMAIN}"\npersist = true')
    )
    assert lab.daemon is not None
    lab.run(f"kill -HUP {lab.daemon.pid}")
    deadline = time.monotonic() + 60
    while "config reloaded" not in lab.log():
        assert time.monotonic() < deadline, lab.log()[-2000:]
        time.sleep(0.3)
    assert usb_hostdevs(lab.run(f"{VIRSH} dumpxml --inactive {DOMAIN}")) == []
    # a restart makes the daemon attach again, now live and into the config
    lab.run(f"{VIRSH} destroy {DOMAIN} && {VIRSH} start {DOMAIN}", timeout=300)
    live = lab.wait(lambda h: h.holds(both()), timeout=180)
    saved = usb_hostdevs(lab.run(f"{VIRSH} dumpxml --inactive {DOMAIN}"))
    assert sorted(h.dev_id for h in saved) == sorted(live.ports)
    assert all("startupPolicy" in h.xml for h in saved)
    # no vmplug at all: libvirt itself gives the domain its devices at start
    lab.stop_daemon()
    lab.run(f"{VIRSH} destroy {DOMAIN} && {VIRSH} start {DOMAIN}", timeout=300)
    assert lab.held().holds(both())
    assert all(lab.qom().values()) and len(lab.qom()) == 2
