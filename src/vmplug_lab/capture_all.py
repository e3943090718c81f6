"""Re-make every sysfs fixture: boot the lab guest once per topology and capture.

    .venv/bin/python -m vmplug_lab.capture_all [--out tests/fixtures/sysfs] [NAME...]

Each capture lands in ``OUT/<name>/`` (replaced) with a ``capture.json``
recording the guest kernel, QEMU's version and the exact device list.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from vmplug_lab.gadgets import GADGETS, setup_script
from vmplug_lab.guest import LabDevice, LabGuest
from vmplug_lab.topologies import TOPOLOGIES

REMAKE = ".venv/bin/python -m vmplug_lab.capture_all"


#: Captures whose devices the guest kernel makes itself (see vmplug_lab.gadgets).
SCRIPTED: dict[str, tuple[str, int]] = {"gadgets": (setup_script(GADGETS), len(GADGETS))}


def capture_topology(
    name: str, devices: tuple[LabDevice, ...], out: Path, workdir: Path
) -> dict[str, object]:
    """Boot a guest with ``devices``, capture its USB sysfs into ``out``; return metadata."""
    with LabGuest(devices, workdir) as guest:
        expected = len(devices)
        script = None
        if name in SCRIPTED:
            script, expected = SCRIPTED[name]
            path = workdir / "setup.sh"
            path.write_text(script)
            guest.run(f"sh {path}", timeout=120, check=True)
        guest.wait_for(
            "n=$(ls /sys/bus/usb/devices | grep -c -E '^[0-9]+-[0-9.]+$'); "
            f'test "$n" -ge {expected}',
            timeout=120,
        )
        guest.run("udevadm settle --timeout=30", timeout=60)
        meta = {
            "topology": name,
            "qemu": guest.qemu_version(),
            "devices": [d.to_json() for d in devices],
            "qemu_opts": guest.qemu_args(),
            **({"setup_script": script} if script else {}),
            "remake": REMAKE,
        }
        meta_path = workdir / "meta.json"
        meta_path.write_text(json.dumps(meta))
        tar = workdir / "capture.tar"
        py = shlex.quote(sys.executable)
        guest.run(
            f"rm -rf /tmp/cap && {py} -m vmplug_lab.capture /tmp/cap --meta {meta_path} "
            f"&& tar -C /tmp/cap -cf {tar} .",
            timeout=120,
            check=True,
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tarfile.open(tar) as tf:
        # extraction filters came with Python 3.11.4; Debian 12 has 3.11.2 (our own archive)
        if hasattr(tarfile, "tar_filter"):
            tf.extractall(out, filter="tar")
        else:  # pragma: no cover - Python < 3.11.4
            tf.extractall(out)  # noqa: S202
    info: dict[str, object] = json.loads((out / "capture.json").read_text())
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-make the sysfs fixtures in the lab guest")
    parser.add_argument("names", nargs="*", help=f"topologies (default: all of {list(TOPOLOGIES)})")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/sysfs"))
    args = parser.parse_args(argv)
    known = {**TOPOLOGIES, **dict.fromkeys(SCRIPTED, ())}
    names = args.names or list(known)
    for name in names:
        if name not in known:
            parser.error(f"unknown topology {name!r}")
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"vmplug-lab-{name}-", dir="/tmp") as tmp:
            info = capture_topology(name, known[name], args.out / name, Path(tmp))
        print(f"{name}: {len(info.get('usb_devices', []))} USB devices ({info.get('files')} files)")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
