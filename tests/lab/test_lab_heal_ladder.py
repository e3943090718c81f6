"""Lab: a VM that refuses device_add (no USB controller) drives the whole ladder
on a real kernel -- the daemon inside the lab guest (``--events kernel``, the
guest's /sys and /dev/bus/usb) climbs reattach, reset (USBDEVFS_RESET),
port-cycle (the hub port's disable) and reauthorize for the keyboard, and the
kernel does each: dmesg shows the reset, the port cycle gives the keyboard a new
address.  The guest (and the daemon and VM in it) is stopped by PID in teardown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug_lab.demo import GUEST_DIR, KBD, PORTS, VM_COMMAND, VM_NAME, DemoLab
from vmplug_lab.guest import lab_unavailable_reason

pytestmark = pytest.mark.lab

PORT = PORTS[KBD.id]
CONFIG = f"""\
[vm.{VM_NAME}]
qmp = "{GUEST_DIR}/vm.sock"

[heal]
attach_refusals = 2
interval_s = 0.5

[[rule]]
attach = "{VM_NAME}"
match = 'via-port "{PORT}"'
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    lab = DemoLab(Path(tmp_path_factory.mktemp("heal")))
    try:
        lab.boot()
        yield lab
    finally:
        lab.close()


def test_a_vm_without_usb_drives_every_rung_on_the_real_kernel(lab: DemoLab) -> None:
    g = lab.guest
    (g.workdir / "vmplug.toml").write_text(CONFIG)
    before = int(g.run(f"cat /sys/bus/usb/devices/{PORT}/devnum", check=True).stdout)
    no_usb = VM_COMMAND.replace(" -device qemu-xhci,id=xhci", "")
    assert no_usb != VM_COMMAND
    lab.vm = g.spawn(no_usb, log=f"{g.workdir}/vm-nousb.log")
    lab.start_daemon()
    rungs: list[tuple[str, bool]] = []
    pat = re.compile(rf"heal {re.escape(PORT)} \(.*\): (\S+) because attach refused")
    failed = re.compile(rf"heal {re.escape(PORT)}: (\S+) failed: (.*)")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        lines = lab.daemon_log()
        rungs = [(m.group(1), True) for ln in lines if (m := pat.search(ln))]
        fails = [(m.group(1), m.group(2)) for ln in lines if (m := failed.search(ln))]
        if len(rungs) >= 4:
            break
        time.sleep(1)
    assert [r for r, _ in rungs] == ["reattach", "reset", "port-cycle", "reauthorize"], "\n".join(
        lab.daemon_log()[-40:]
    )
    assert fails == [], fails  # the real kernel took every rung
    dmesg = g.run("dmesg", check=True).stdout
    assert re.search(rf"usb {re.escape(PORT)}: reset \S+ USB device number {before}\b", dmesg)
    g.wait_for(f"test -e /sys/bus/usb/devices/{PORT}/devnum", timeout=60)
    after = int(g.run(f"cat /sys/bus/usb/devices/{PORT}/devnum", check=True).stdout)
    assert after != before  # the port cycle made the kernel enumerate it anew
    assert g.run(f"cat /sys/bus/usb/devices/{PORT}/authorized").stdout.strip() == "1"
