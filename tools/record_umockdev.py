#!/usr/bin/env python3
"""Make the umockdev fixtures (tests/fixtures/umockdev/) the usbguard tests replay.

    .venv/bin/python tools/record_umockdev.py upstream GIT_DIR... [--out DIR]
    .venv/bin/python tools/record_umockdev.py lab [--out DIR]

``upstream`` copies recordings of real hardware out of git repositories
(fetched mirrors or clones, read with ``git --git-dir=GIT_DIR show HEAD:PATH``):
umockdev's own ``devices/`` recordings (github:martinpitt/umockdev) and the
recording usbguard's use-case tests replay (github:USBGuard/usbguard,
``src/Tests/UseCase/devices.umockdev``: a Lenovo dock, trackball, camera and
keyboard).  Only the small ones that have USB devices are taken (see UPSTREAM),
and only the lines the kernel could have written are kept (see replayable()).

``lab`` boots the lab guest once (see vmplug_lab: the Debian kernel under
QEMU/TCG) with the ``mixed`` topology plus the dummy_hcd gadgets of
vmplug_lab.gadgets, and inside it:

* records every USB device and interface with ``umockdev-record``
  (``lab-mixed.umockdev``; see :func:`replayable` for the one kind of line
  dropped);
* runs the real ``usbguard generate-policy`` against the guest's real /sys
  (``lab-mixed.usbguard.rules``, what usbguard says on a live kernel, with the
  ports' ``connect_type`` that a replay does not have);
* writes ``0`` to the keyboard's (2-2.4.2) ``authorized`` file, as
  ``usbguard block-device`` does, and records that device again
  (``lab-deauthorized.umockdev``; the kernel has removed its interfaces).

``lab.json`` says what was booted and when.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmplug_lab.gadgets import GADGETS, setup_script
from vmplug_lab.guest import LabGuest
from vmplug_lab.topologies import MIXED

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "umockdev"

#: (repository, path in it, fixture name): small recordings with USB devices.
UPSTREAM = (
    ("martinpitt/umockdev", "devices/input/usbkbd.umockdev", "umockdev-usbkbd.umockdev"),
    ("martinpitt/umockdev", "devices/input/usbkbd.pcap.umockdev", "umockdev-usbkbd-xhci.umockdev"),
    ("martinpitt/umockdev", "devices/hidraw/fido2.umockdev", "umockdev-fido2.umockdev"),
    (
        "martinpitt/umockdev",
        "devices/cameras/canon-powershot-sx200.umockdev",
        "umockdev-canon-powershot-sx200.umockdev",
    ),
    (
        "martinpitt/umockdev",
        "devices/mobiles/sony-xperia-mini-pro.umockdev",
        "umockdev-sony-xperia-mini-pro.umockdev",
    ),
    ("USBGuard/usbguard", "src/Tests/UseCase/devices.umockdev", "usbguard-usecase.umockdev"),
)

#: The device the lab run de-authorizes: the keyboard of the mixed topology.
BLOCKED = "2-2.4.2"


def upstream(git_dirs: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict[str, str]] = {}
    for repo, path, name in UPSTREAM:
        for git_dir in git_dirs:
            done = subprocess.run(
                ["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0:
                commit = subprocess.run(
                    ["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                data = replayable(done.stdout)
                (out / name).write_bytes(data)
                sources[name] = {
                    "repository": f"github:{repo}",
                    "path": path,
                    "commit": commit,
                    "changed": f"{len(done.stdout) - len(data)} bytes of udev-only E: lines "
                    "dropped (see replayable() in tools/record_umockdev.py)",
                }
                print(f"{name}: {len(done.stdout)} bytes from {repo}")
                break
        else:
            raise SystemExit(f"{repo}:{path} is in none of {[str(g) for g in git_dirs]}")
    (out / "upstream.json").write_text(json.dumps(sources, indent=2) + "\n")


#: An ``E:`` line whose key the kernel could have written into ``uevent``.
_KERNEL_KEY = re.compile(rb"^E: [A-Z][A-Z0-9]*=")


def replayable(record: bytes) -> bytes:
    """``record`` without udev's own properties (``E: ID_VENDOR=``, ``E: CURRENT_TAGS=``...).

    umockdev-run writes a device's ``E:`` lines, sorted, into its replayed
    ``uevent`` file.  The kernel's ``uevent`` of a USB device only has keys of
    capitals and digits (MAJOR, DEVTYPE, BUSNUM...); udev adds keys with ``_``.
    usbguard's uevent grammar (``UEventParser.hpp``: ``[A-Z][A-Z0-9]*``) stops
    at the first such key, so a device with, say, ``COLORD_DEVICE`` sorted
    before ``DEVTYPE`` has no DEVTYPE for usbguard, which then skips it and
    everything below it.  Dropping the udev-only lines makes the replay's
    ``uevent`` what the kernel's was.
    """
    return b"".join(
        line
        for line in record.splitlines(keepends=True)
        if not line.startswith(b"E: ") or _KERNEL_KEY.match(line)
    )


def lab(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmplug-umockdev-", dir="/tmp") as tmp:
        work = Path(tmp) / "lab"  # shared read-write with the guest (vng --rwdir)
        work.mkdir()
        script = work / "gadgets.sh"
        script.write_text(setup_script(GADGETS))
        with LabGuest(MIXED, work) as guest:
            guest.run(f"sh {script}", timeout=120, check=True)
            expected = len(MIXED) + len(GADGETS)
            guest.wait_for(
                "n=$(ls /sys/bus/usb/devices | grep -c -E '^[0-9]+-[0-9.]+$'); "
                f'test "$n" -ge {expected}',
                timeout=120,
            )
            guest.run("udevadm settle --timeout=30", timeout=60)
            rec = work / "lab-mixed.umockdev"
            rules = work / "lab-mixed.usbguard.rules"
            guest.run(
                f"umockdev-record /sys/bus/usb/devices/* > {rec} && "
                f"usbguard generate-policy > {rules}",
                timeout=300,
                check=True,
            )
            dev = f"/sys/bus/usb/devices/{BLOCKED}"
            blocked = work / "lab-deauthorized.umockdev"
            guest.run(
                f'echo 0 > {dev}/authorized && test "$(cat {dev}/authorized)" = 0 && '
                f"umockdev-record {dev} > {blocked}",  # its interfaces are gone now
                timeout=120,
                check=True,
            )
            meta = {
                "kernel": guest.run("uname -r", check=True).stdout.strip(),
                "qemu": guest.qemu_version(),
                "usbguard": guest.run("dpkg-query -W -f='${Version}' usbguard").stdout.strip(),
                "umockdev": guest.run("umockdev-record --version").stdout.strip(),
                "devices": [d.to_json() for d in MIXED],
                "gadgets": [g.name for g in GADGETS],
                "deauthorized": BLOCKED,
                "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "remake": "sudo .venv/bin/python tools/record_umockdev.py lab",
            }
        for path in (rec, rules, blocked):
            data = path.read_bytes()
            (out / path.name).write_bytes(replayable(data) if path.suffix == ".umockdev" else data)
            print(f"{path.name}: {path.stat().st_size} bytes")
        (out / "lab.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    up = sub.add_parser("upstream", help="copy upstream recordings out of git repositories")
    up.add_argument("git_dirs", nargs="+", type=Path)
    up.add_argument("--out", type=Path, default=OUT)
    lb = sub.add_parser("lab", help="record in the lab guest (one boot)")
    lb.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.what == "upstream":
        upstream(args.git_dirs, args.out)
    else:
        lab(args.out)
    print(f"now: git add {shlex.quote(str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
