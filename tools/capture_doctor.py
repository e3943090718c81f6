"""Capture the lab data the doctor's tests replay: a real kernel log of USB events.

    .venv/bin/python tools/capture_doctor.py [OUT_DIR]

Boots the lab guest (a Debian kernel under QEMU/TCG, see vmplug_lab) with a
high-speed keyboard (xHCI port 2 -> 2-2) and an audio device (2-1), then for
real: unplugs and replugs the keyboard three times (disconnect + new device
lines), and lets a second QEMU inside the guest take the audio device with
``usb-host`` (QEMU 7.2 takes it without a reset: no line for that).  Writes the guest's kernel
log (``dmesg``) to ``OUT_DIR/kernel/lab-replug.log`` (default
tests/fixtures/doctor) and what was done to ``lab-replug.json``.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from vmplug_lab.guest import LabDevice, LabGuest

KBD = LabDevice("usb-kbd", "xhci.0", "2", "kbd1")
AUDIO = LabDevice("usb-audio", "xhci.0", "1", "audio1")
VM = (
    "qemu-system-x86_64 -nodefaults -display none -accel tcg -m 64 -machine q35"
    " -device qemu-xhci,id=xhci -device usb-host,bus=xhci.0,id=vmplug-a,hostbus=2,hostport=1"
)


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="vmplug-capdoc-", dir="/tmp"))
    guest = LabGuest([AUDIO, KBD], work / "lab")
    steps: list[str] = []
    guest.start()
    try:
        guest.wait_for("test -e /sys/bus/usb/devices/2-2 && test -e /sys/bus/usb/devices/2-1")
        for i in range(3):
            guest.unplug(KBD.id)
            guest.wait_for("! test -e /sys/bus/usb/devices/2-2")
            guest.hotplug(KBD)
            guest.wait_for("test -e /sys/bus/usb/devices/2-2:1.0/driver")
            steps.append(f"replug {KBD.id} (2-2) #{i + 1}")
        vm = guest.spawn(VM, log=f"{guest.workdir}/vm.log")
        guest.wait_for("! readlink /sys/bus/usb/devices/2-1:1.0/driver | grep -q snd", 90)
        time.sleep(2)
        guest.kill(vm, signal.SIGKILL)
        steps.append("second-level QEMU took 2-1 with usb-host hostbus=2,hostport=1, then killed")
        log = guest.run("dmesg", check=True).stdout
        version = guest.qemu_version()
        kernel = guest.run("uname -r", check=True).stdout.strip()
    finally:
        guest.stop()
    (out / "kernel").mkdir(parents=True, exist_ok=True)
    (out / "kernel" / "lab-replug.log").write_text(log)
    meta = {
        "kernel": kernel,
        "qemu": version,
        "devices": [AUDIO.to_json(), KBD.to_json()],
        "steps": steps,
        "captured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "kernel" / "lab-replug.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'kernel' / 'lab-replug.log'} ({len(log.splitlines())} lines)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/fixtures/doctor"))
