"""How long `vmplug list` takes: on the largest real capture and on 1,000 devices.

The 1,000-device tree is synthetic but built only from real captured device
directories (tests/fixtures/sysfs/mixed): a keyboard and a hub copied onto
8 buses x 5 hubs x 25 ports, with bus and device numbers rewritten.

Printed side by side in one run:
* interpreter start alone (`python -c pass`) and `vmplug --version`;
* `vmplug list --json` end to end, and the work on top of interpreter start;
* vmplug's reader in-process vs a straightforward pathlib reader that reads
  every attribute file (the alternative the reader's design avoids).

Run: .venv/bin/python bench/bench_list.py [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sysfs" / "mixed"
VMPLUG = [sys.executable, "-m", "vmplug"]

BUSES, HUBS, PORTS = 8, 5, 25


def _rewrite(dev: Path, name: str, bus: int, devnum: int) -> None:
    (dev / "busnum").write_text(f"{bus}\n")
    (dev / "devnum").write_text(f"{devnum}\n")
    uevent = dev / "uevent"
    lines = [
        f"BUSNUM={bus:03d}"
        if line.startswith("BUSNUM=")
        else f"DEVNUM={devnum:03d}"
        if line.startswith("DEVNUM=")
        else line
        for line in uevent.read_text().splitlines()
    ]
    uevent.write_text("\n".join(lines) + "\n")
    for sub in dev.iterdir():
        if ":" in sub.name and sub.is_dir():
            sub.rename(dev / f"{name}:{sub.name.split(':', 1)[1]}")


def build_tree(dst: Path) -> int:
    """A sysfs root with BUSES*HUBS*PORTS leaf devices; returns the device count."""
    src_root = FIXTURE / "bus/usb/devices"
    kbd = (src_root / "2-2.4.2").resolve()
    hub = (src_root / "2-2").resolve()
    root_hub = (src_root / "usb2").resolve()
    pci = dst / "devices/pci0000:00/0000:00:0b.0"
    links = dst / "bus/usb/devices"
    links.mkdir(parents=True)
    (dst / "bus/usb/drivers").mkdir()
    shutil.copytree(FIXTURE / "bus/usb/drivers", dst / "bus/usb/drivers", dirs_exist_ok=True)
    count = 0
    for b in range(1, BUSES + 1):
        rh = pci / f"usb{b}"
        shutil.copytree(root_hub, rh, symlinks=True, ignore=shutil.ignore_patterns("2-*"))
        _rewrite(rh, f"{b}-0", b, 1)
        (links / f"usb{b}").symlink_to(f"../../../devices/pci0000:00/0000:00:0b.0/usb{b}")
        devnum = 2
        for h in range(1, HUBS + 1):
            hname = f"{b}-{h}"
            hdir = rh / hname
            shutil.copytree(hub, hdir, symlinks=True, ignore=shutil.ignore_patterns("2-2.*"))
            _rewrite(hdir, hname, b, devnum)
            devnum += 1
            (links / hname).symlink_to(f"../../../devices/pci0000:00/0000:00:0b.0/usb{b}/{hname}")
            count += 1
            for p in range(1, PORTS + 1):
                name = f"{hname}.{p}"
                ddir = hdir / name
                shutil.copytree(kbd, ddir, symlinks=True)
                _rewrite(ddir, name, b, devnum)
                devnum += 1
                (links / name).symlink_to(
                    f"../../../devices/pci0000:00/0000:00:0b.0/usb{b}/{hname}/{name}"
                )
                count += 1
    return count


def _time_cmd(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def _naive_read(root: Path) -> int:
    """The alternative: pathlib, one read per attribute file, every file."""
    n = 0
    for link in (root / "bus/usb/devices").iterdir():
        if ":" in link.name:
            continue
        dev = link.resolve()
        for attr in (
            "busnum", "devnum", "idVendor", "idProduct", "bcdDevice", "manufacturer",
            "product", "serial", "speed", "version", "bDeviceClass", "bDeviceSubClass",
            "bDeviceProtocol", "maxchild", "removable", "authorized", "bConfigurationValue",
            "power/control", "power/autosuspend_delay_ms", "descriptors",
        ):  # fmt: skip
            with contextlib.suppress(OSError):
                (dev / attr).read_bytes()
        for sub in dev.iterdir():
            if ":" in sub.name:
                for attr in ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol"):
                    (sub / attr).read_bytes()
                if (sub / "driver").exists():
                    (sub / "driver").readlink()
        n += 1
    return n


def _ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms  min {min(xs) * 1000:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    from vmplug.host.inventory import read_devices  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "sysfs"
        n = build_tree(synth)
        real = len(read_devices(FIXTURE))
        print(
            f"trees: capture 'mixed' = {real} devices, synthetic = {n} devices (+{BUSES} root hubs)"
        )

        base = _time_cmd([sys.executable, "-c", "pass"], args.runs)
        version = _time_cmd([*VMPLUG, "--version"], args.runs)
        real_t = _time_cmd([*VMPLUG, "--sysfs-root", str(FIXTURE), "list", "--json"], args.runs)
        big_t = _time_cmd([*VMPLUG, "--sysfs-root", str(synth), "list", "--json"], args.runs)
        print(f"python -c pass                     {_ms(base)}")
        print(f"vmplug --version                   {_ms(version)}")
        print(f"vmplug list --json (capture)       {_ms(real_t)}")
        print(f"vmplug list --json (1,000 devices) {_ms(big_t)}")
        extra = statistics.median(big_t) - statistics.median(base)
        print(
            "  work on top of interpreter start, 1,000 devices: "
            f"{extra * 1000:.1f} ms (goal < 100 ms)"
        )

        reader, naive = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            devices = read_devices(synth)
            reader.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _naive_read(synth)
            naive.append(time.perf_counter() - t0)
        assert len(devices) == n + BUSES
        print(f"in-process reader, 1,000 devices   {_ms(reader)}")
        print(f"naive pathlib reader (same tree)   {_ms(naive)}")
        ratio = statistics.median(naive) / statistics.median(reader)
        print(f"  naive / vmplug: {ratio:.2f}x")


if __name__ == "__main__":
    main()
