"""Capture the QEMU command lines the argv parser's tests read (tests/wire/test_proc.py).

    .venv/bin/python -m tools.capture_qemu_argv QEMU_DOCKER_CHECKOUT [OUT_DIR]

(from the repository root: the libvirt capture uses the tests' tests.support.vmrig)

QEMU_DOCKER_CHECKOUT is a clone of https://github.com/qemus/qemu-docker (the
base of dockurr/windows); OUT_DIR defaults to tests/fixtures/qemu-argv.

* ``dockurr-windows.json``: the image's own ``src/config.sh`` is sourced by
  bash with the variables its other scripts would have set (TCG instead of
  KVM, no disk, no network), ``ARGUMENTS`` as ``vmplug generate compose``
  writes it for a real device of tests/fixtures/sysfs/minimal, then the
  image's exec line ``exec qemu-system-x86_64 ${ARGS:+ $ARGS}`` runs with a
  stand-in program that records the argv it was given: exactly what QEMU
  would get, shell splitting included.
* ``libvirt.json``: a private libvirtd (``qemu:///session`` on its own socket,
  tests/support/vmrig.py) starts a TCG domain with an xHCI controller and a
  guest-agent channel; the real QEMU's ``/proc/PID/cmdline`` is read, then
  the domain is destroyed and libvirtd stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vmplug.generate.compose import arguments_value, plan_compose
from vmplug.host.inventory import read_devices
from vmplug.wire.proc import scan_qemu

ROOT = Path(__file__).resolve().parents[1]

RECORD = 'import json, sys; json.dump(sys.argv, open(sys.argv[0] + ".json", "w"))'


def qemu_version() -> str:
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()[0]


def dockurr(checkout: Path, out: Path) -> None:
    config = checkout / "src" / "config.sh"
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dev = next(d for d in read_devices(ROOT / "tests/fixtures/sysfs/minimal") if not d.is_root_hub)
    arguments = arguments_value(plan_compose([dev]).arguments)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"vmplug-argv-{os.getpid()}"
    work.mkdir()
    try:
        fake = work / "qemu-system-x86_64"
        fake.write_text(f"#!{sys.executable}\n{RECORD}\n")
        fake.chmod(0o755)
        env = {
            "PATH": f"{work}:/usr/bin:/bin",
            "RAM_SIZE": "4G",
            "CPU_FLAGS": "qemu64",
            "CPU_CORES": "2",
            "PROCESS": "windows",
            "MACHINE": "q35",
            "SECURE": ",smm=off",
            "KVM_OPTS": ",accel=tcg",
            "DISPLAY": "none",
            "DISPLAY_OPTS": "-display none -vga none",
            "NET_OPTS": "",
            "DISK_OPTS": "",
            "BOOT_OPTS": "",
            "ARGUMENTS": arguments,
        }
        script = (
            "set -Eeuo pipefail\n"
            "html() { :; }\n"
            f". {config}\n"
            "exec qemu-system-x86_64 ${ARGS:+ $ARGS}\n"
        )
        subprocess.run(["bash", "-c", script], env=env, cwd=work, check=True)
        argv = json.loads((work / "qemu-system-x86_64.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    argv[0] = "qemu-system-x86_64"
    doc = {
        "made_by": "tools/capture_qemu_argv.py",
        "source": f"qemus/qemu-docker {commit} src/config.sh, exec line of src/entry.sh",
        "environment": env | {"PATH": None},
        "argv": argv,
    }
    (out / "dockurr-windows.json").write_text(json.dumps(doc, indent=1) + "\n")


def libvirt(out: Path) -> None:
    from tests.support.vmrig import domain_xml, private_libvirtd  # noqa: PLC0415

    name = f"vmplug-argv-{os.getpid()}"
    with private_libvirtd("vmplug-argv-") as lv:
        # libvirt's own channel path is longer than a unix socket may be here
        channel = (
            "    <channel type='unix'>\n"
            f"      <source mode='bind' path='{lv.root}/run/qga.sock'/>\n"
            "      <target type='virtio' name='org.qemu.guest_agent.0'/>\n"
            "    </channel>\n"
        )
        xml = domain_xml(name).replace("  </devices>", channel + "  </devices>")
        path = lv.root / f"{name}.xml"
        path.write_text(xml)
        path.chmod(0o644)
        lv.virsh("define", str(path))
        lv.virsh("start", name)
        argv: list[str] = []
        deadline = time.monotonic() + 30
        while not argv and time.monotonic() < deadline:
            for proc in scan_qemu():
                if proc.args.name == name:
                    argv = list(proc.argv)
            time.sleep(0.1)
        version = lv.virsh("version").stdout
        lv.virsh("destroy", name, check=False)
    if not argv:
        raise SystemExit("the domain's QEMU was not found in /proc")
    doc = {
        "made_by": "tools/capture_qemu_argv.py",
        "source": "libvirtd qemu:///session (private), /proc/PID/cmdline of its QEMU",
        "versions": [line.strip() for line in version.splitlines() if line.strip()],
        "qemu": qemu_version(),
        "domain": name,
        "argv": argv,
    }
    (out / "libvirt.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    checkout = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests/fixtures/qemu-argv"
    out.mkdir(parents=True, exist_ok=True)
    dockurr(checkout, out)
    libvirt(out)


if __name__ == "__main__":
    main()
