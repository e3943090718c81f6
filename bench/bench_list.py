"""How long `vmplug list` takes: on the largest real capture and on 1,000 devices.

The 1,000-device tree is synthetic but built only from real captured device
directories (tests/fixtures/sysfs/mixed): a keyboard and a hub copied onto
8 buses x 5 hubs x 25 ports, with bus and device numbers rewritten.

Printed side by side in one run, CPU time (user + sys of the finished child,
from getrusage: the figure to quote on a shared machine) with wall time beside
it, and the load average:
* interpreter start alone (`python -c pass`) and `vmplug --version`;
* `vmplug list --json` end to end, and the work on top of interpreter start;
  the same through the click command (what `list` answered with before it
  answered `--json` without click), and the ratio;
* what bounds that work: the imports `list` needs alone, and the reader's own
  system calls alone (the very opens, reads, readlinks and stats one scan
  makes, replayed with nothing parsed), against the goal;
* a lean Python program printing the same bytes (bench/lean_list.py: the
  same files read the same way, straight into dicts; the bench checks its
  output is vmplug's on both trees), the ratio, and whether even it meets the goal;
* the floor of any program that prints this output from this tree: the same
  system calls, importing json (it imports re and enum) and encoding the very
  output from objects already built, and what the goal leaves per device for
  everything else; list's work part by part (imports, the reader's system
  calls and its Python, to_json, encoding);
* vmplug's reader in-process vs a straightforward pathlib reader that reads
  every attribute file (the alternative the reader's design avoids).

The vmplug package's .pyc files are brought up to date first (as an install
leaves them), so a module edited since is not compiled again in every run.

Run: .venv/bin/python bench/bench_list.py [--runs N]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sysfs" / "mixed"
VMPLUG = [sys.executable, "-m", "vmplug"]
LEAN = Path(__file__).resolve().parent / "lean_list.py"

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


def _time_cmd(cmd: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(cpu, wall) seconds of each of ``runs`` whole processes."""
    cpu, wall = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return cpu, wall


class _Recorder:
    """Stands in for ``os`` in vmplug.host.sysfs for one scan and writes down
    every system call that touches the tree, to replay them bare."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.dirs: dict[int, int] = {}  # real fd -> index of the open that made it
        self.dir_opens: set[int] = set()  # indices of the opens of directories

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        self.calls.append(("open", path, self.dirs.get(dir_fd) if dir_fd is not None else None))
        if flags & os.O_DIRECTORY:
            self.dirs[fd] = len(self.calls) - 1
            self.dir_opens.add(len(self.calls) - 1)
        return fd

    def close(self, fd: int) -> None:
        if fd in self.dirs:
            self.calls.append(("close", "", self.dirs.pop(fd)))
        os.close(fd)

    def readlink(self, path: str, *, dir_fd: int | None = None) -> str:
        self.calls.append(("readlink", path, self.dirs.get(dir_fd) if dir_fd is not None else None))
        return os.readlink(path, dir_fd=dir_fd)

    def stat(self, path: str, *, dir_fd: int | None = None) -> os.stat_result:
        self.calls.append(("stat", path, self.dirs.get(dir_fd) if dir_fd is not None else None))
        return os.stat(path, dir_fd=dir_fd)


def _replay(calls: list[tuple[str, str, int | None]], flags: list[int]) -> None:
    """The recorded system calls, in order, with nothing parsed: the reader's floor."""
    fds: dict[int, int] = {}
    for i, (kind, path, parent) in enumerate(calls):
        dir_fd = None if parent is None or kind == "close" else fds[parent]
        if kind == "open":
            fd = os.open(path, flags[i], dir_fd=dir_fd)
            if flags[i] & os.O_DIRECTORY:
                fds[i] = fd
            else:
                with contextlib.suppress(OSError):
                    os.read(fd, 65536)
                os.close(fd)
        elif kind == "close":
            assert parent is not None
            os.close(fds.pop(parent))
        elif kind == "readlink":
            with contextlib.suppress(OSError):
                os.readlink(path, dir_fd=dir_fd)
        else:
            with contextlib.suppress(OSError):
                os.stat(path, dir_fd=dir_fd)
    for fd in fds.values():
        os.close(fd)


def _floor(root: Path, runs: int) -> tuple[int, list[float]]:
    """(system calls per scan, CPU seconds of each replay) of one scan of ``root``."""
    from vmplug.host import sysfs  # noqa: PLC0415

    recorder = _Recorder()
    setattr(sysfs, "os", recorder)  # noqa: B010 - as tests/unit/test_sysfs_vanishing.py
    try:
        sysfs.scan(root)
    finally:
        setattr(sysfs, "os", os)  # noqa: B010
    calls, dirs = recorder.calls, recorder.dir_opens
    base = os.O_RDONLY | os.O_CLOEXEC
    flags = [base | (os.O_DIRECTORY if i in dirs else 0) for i in range(len(calls))]
    out = []
    for _ in range(runs):
        c0 = time.process_time()
        _replay(calls, flags)
        out.append(time.process_time() - c0)
    return len(calls), out


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


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    import vmplug  # noqa: PLC0415
    from vmplug.host.inventory import read_devices  # noqa: PLC0415

    # Fresh .pyc for every module first: under PYTHONDONTWRITEBYTECODE=1 a module
    # edited since its .pyc is compiled again in every run, which is no part of
    # what `list` costs an installed vmplug.
    compileall.compile_dir(Path(vmplug.__file__).parent, quiet=1)
    med = statistics.median
    print(f"load average {_load()}, {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "sysfs"
        n = build_tree(synth)
        real = len(read_devices(FIXTURE))
        print(
            f"trees: capture 'mixed' = {real} devices, synthetic = {n} devices (+{BUSES} root hubs)"
        )
        # what `list --json` loads (vmplug.cli._list_json): the reader, the model, json
        imports = "import vmplug.cli, vmplug.host.inventory, vmplug.textsafe, json"
        via_click = [sys.executable, "-c", "from vmplug.cli.app import main; main()"]
        cmds = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "vmplug --version": [*VMPLUG, "--version"],
            "import json, alone": [sys.executable, "-c", "import json"],
            "imports `list` needs, alone": [sys.executable, "-c", imports],
            "vmplug list --json (capture)": [
                *VMPLUG, "--sysfs-root", str(FIXTURE), "list", "--json"
            ],
            "vmplug list --json (1,000 devices)": [
                *VMPLUG, "--sysfs-root", str(synth), "list", "--json"
            ],
            "  the same through click": [*via_click, "--sysfs-root", str(synth), "list", "--json"],
            "lean Python, same output": [sys.executable, str(LEAN), str(synth)],
        }  # fmt: skip
        ours = b""
        for tree in (FIXTURE, synth):  # the stick measures the same output, or nothing
            ours = subprocess.run(
                [*VMPLUG, "--sysfs-root", str(tree), "list", "--json"],
                check=True, capture_output=True,
            ).stdout  # fmt: skip
            lean = subprocess.run(
                [sys.executable, str(LEAN), str(tree)], check=True, capture_output=True
            ).stdout
            if ours != lean:
                sys.exit(f"bench/lean_list.py does not print what vmplug prints for {tree}")
        cpu: dict[str, list[float]] = {k: [] for k in cmds}
        wall: dict[str, list[float]] = {k: [] for k in cmds}
        for cmd in cmds.values():
            _time_cmd(cmd, 1)  # warm-up: page cache, .pyc
        for _ in range(args.runs):  # in turn, so a drift of the machine hits all alike
            for name, cmd in cmds.items():
                c, w = _time_cmd(cmd, 1)
                cpu[name] += c
                wall[name] += w
        base = med(cpu["python -c pass"])
        for name in cmds:
            print(f"{name:<36} cpu {_ms(cpu[name])}   wall {_ms(wall[name])}")
        extra = med(cpu["vmplug list --json (1,000 devices)"]) - base
        extra_wall = med(wall["vmplug list --json (1,000 devices)"]) - med(wall["python -c pass"])
        imp = med(cpu["imports `list` needs, alone"]) - base
        click = med(cpu["  the same through click"]) - base
        print(
            "  work on top of interpreter start, 1,000 devices: "
            f"{extra * 1000:.1f} ms cpu ({extra_wall * 1000:.1f} ms wall), "
            f"{extra / base:.1f}x interpreter start; goal < 100 ms: "
            f"{'met' if extra < 0.1 else 'NOT met'}"
        )
        print(
            f"  through click (the group, the command, its options): {click * 1000:.1f} ms cpu "
            f"on top of interpreter start; click / without: {click / extra:.2f}x"
        )
        lean_work = med(cpu["lean Python, same output"]) - base
        print(
            "  a lean Python program printing the same bytes (bench/lean_list.py): "
            f"{lean_work * 1000:.1f} ms cpu on top of interpreter start; "
            f"vmplug / lean: {extra / lean_work:.2f}x; "
            "the goal is "
            + (
                "out of reach of a Python reader that does nothing but the output "
                "(the lean one misses it)"
                if lean_work >= 0.1
                else "within a Python reader's reach (the lean one meets it)"
            )
        )
        ncalls, floor = _floor(synth, args.runs)
        print(
            f"  bound: the imports alone {imp * 1000:.1f} ms cpu + the reader's {ncalls} "
            f"system calls alone (replayed, nothing parsed) {med(floor) * 1000:.1f} ms cpu "
            f"= {(imp + med(floor)) * 1000:.1f} ms; "
            f"list's work / bound: {extra / (imp + med(floor)):.2f}x"
        )

        # The floor of any program that prints this output from this tree:
        # the reader's system calls, importing json, and encoding the very
        # output from objects already built (vmplug's own, read back).
        out = ours.decode()  # the 1,000-device tree's, printed for the check above
        objects = json.loads(out)
        encode = []
        for _ in range(args.runs):
            t0 = time.process_time()
            json.dumps(objects, ensure_ascii=False)
            encode.append(time.process_time() - t0)
        json_import = med(cpu["import json, alone"]) - base
        any_floor = med(floor) + med(encode) + json_import
        left = 0.1 - any_floor
        print(
            f"  floor of any program printing this output: the system calls {med(floor) * 1000:.1f}"
            f" + encoding the output's {len(out) // 1024} KiB from built objects "
            f"{med(encode) * 1000:.1f} + import json {json_import * 1000:.1f} = "
            f"{any_floor * 1000:.1f} ms cpu; list's work / floor: {extra / any_floor:.2f}x; "
            f"the goal leaves {left * 1e6 / n:.1f} us per device for all else "
            "(imports, parsing, records)"
        )

        reader, naive, records = [], [], []
        for _ in range(args.runs):
            t0 = time.process_time()
            devices = read_devices(synth)
            reader.append(time.process_time() - t0)
            t0 = time.process_time()
            [d.to_json() for d in devices if not d.is_root_hub]
            records.append(time.process_time() - t0)
            t0 = time.process_time()
            _naive_read(synth)
            naive.append(time.process_time() - t0)
        assert len(devices) == n + BUSES
        print(f"in-process reader, 1,000 devices     cpu {_ms(reader)}")
        print(f"  its system calls alone (replayed)  cpu {_ms(floor)}")
        print(f"naive pathlib reader (same tree)     cpu {_ms(naive)}")
        print(
            f"  list's work, part by part (each timed alone, in-process but the imports): "
            f"imports {imp * 1000:.1f} (json {json_import * 1000:.1f}) + reader "
            f"{med(reader) * 1000:.1f} (system calls {med(floor) * 1000:.1f}, Python "
            f"{(med(reader) - med(floor)) * 1000:.1f}) + to_json {med(records) * 1000:.1f} + "
            f"encoding {med(encode) * 1000:.1f} = "
            f"{(imp + med(reader) + med(records) + med(encode)) * 1000:.1f} ms cpu"
        )
        ratio = med(naive) / med(reader)
        print(f"  naive / vmplug: {ratio:.2f}x; vmplug / its system calls: "
              f"{med(reader) / med(floor):.2f}x")  # fmt: skip
    print(f"load average {_load()} at the end")


if __name__ == "__main__":
    main()
