"""The container setups people write for dockurr/windows, made for real on a real
engine in the lab guest, and their real inspect documents.

Each :class:`Setup` is one container of :mod:`vmplug_lab.containers`' image
(its entry script starts QEMU from ``USB`` and ``ARGUMENTS`` as dockurr's
scripts do), started by the engine's own CLI with the flags people put in a
compose file, its QEMU paused (``-S``: only the configuration matters here).
What the doctor's container layer must say of each is part of the setup, so
the lab test (``tests/lab/test_lab_doctor_containers.py``) and the unit test
on the captured documents (``tests/doctor/test_container.py``) check the same
table.

Run as a script it boots the lab guest once, runs every setup on Docker
(Debian's docker.io 20.10) and on Podman (4.3) in turn and writes what
``GET /containers/NAME/json`` answered to
``tests/fixtures/docker/real/ENGINE-VERSION/NAME.json``::

    python -m vmplug_lab.capture_inspect tests/fixtures/docker/real
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmplug_lab.containers import (
    HUB,
    IMAGE,
    IMPORT_CHANGES,
    KBD,
    TABLET,
    VMPLUG,
    Engines,
    build_image_tar,
)
from vmplug_lab.guest import LabGuest, LabUnavailable, lab_unavailable_reason

#: vmplug's QMP socket in the bind-mounted /qmp folder (what generate compose writes).
QMP = "-qmp unix:/qmp/qmp.sock,server=on,wait=off"
#: The keyboard, 2-2.1 in the lab guest, by port on the image's own controller.
BY_PORT = "-device usb-host,bus=xhci.0,hostbus=2,hostport=2.1"
BIND = "-v /dev/bus/usb:/dev/bus/usb"
RULE = "--device-cgroup-rule='c 189:* rwm'"
#: The port the setups pass (the keyboard) and its bus.
PORT = "2-2.1"
BUS = "002"
SYMLINK = "/dev/focusrite_4i4"


@dataclass(frozen=True)
class Setup:
    """One container as people set it up, and what the doctor must find."""

    name: str
    what: str
    #: engine run flags; ``{node}`` is the port's /dev/bus/usb node at that moment
    flags: str
    #: ``ARGUMENTS``; ``{devnum}`` its device number
    arguments: str
    env: tuple[str, ...] = ()
    #: the container-layer check that must report it, and the severities it may have
    check: str = ""
    severities: tuple[str, ...] = ()
    #: a word the finding's fix must hold (the fix is what makes ``ct-good``)
    fix_has: str = ""
    #: the severities on Podman, where they differ (its inspect hides the cgroup rules)
    on_podman: tuple[str, ...] | None = None

    def severities_on(self, engine: str) -> tuple[str, ...]:
        if engine.startswith("podman") and self.on_podman is not None:
            return self.on_podman
        return self.severities

    def run_command(self, cli: str, qmp_root: str, devnum: int) -> str:
        node = f"/dev/bus/usb/{BUS}/{devnum:03d}"
        flags = self.flags.format(node=node)
        args = self.arguments.format(devnum=devnum)
        envs = " ".join(f"-e {shlex.quote(e)}" for e in self.env)
        return (
            f"mkdir -p {qmp_root}/{self.name} && {cli} run -d --name {self.name}"
            f" --network none -v {qmp_root}/{self.name}:/qmp {flags} {envs}"
            f" -e ARGUMENTS={shlex.quote(args + ' -S')} {IMAGE}"
        )


SETUPS: tuple[Setup, ...] = (
    Setup(
        "ct-good",
        "what vmplug generate compose writes: bind mount, cgroup rule, QMP socket, by port",
        f"{BIND} {RULE}",
        f"{BY_PORT} {QMP}",
    ),
    Setup(
        "ct-devices",
        "devices: - /dev/bus/usb/002/NNN instead of the bind mount",
        f"--device {{node}} {RULE}",
        f"{BY_PORT} {QMP}",
        check="container.devices",
        severities=("error",),
        fix_has="/dev/bus/usb:/dev/bus/usb",
    ),
    Setup(
        "ct-norule",
        "the bind mount but no device_cgroup_rules",
        BIND,
        f"{BY_PORT} {QMP}",
        check="container.cgroup",
        severities=("error",),
        fix_has="c 189:* rwm",
        on_podman=("info",),
    ),
    Setup(
        "ct-privileged",
        "privileged: true with devices: per device",
        "--privileged --device {node}",
        f"{BY_PORT} {QMP}",
        check="container.devices",
        severities=("error",),
        fix_has="/dev/bus/usb:/dev/bus/usb",
    ),
    Setup(
        "ct-symlink",
        f"a udev symlink ({SYMLINK}) mapped as a device",
        f"--device {SYMLINK} {RULE}",
        f"{BY_PORT} {QMP}",
        check="container.devices",
        severities=("error",),
        fix_has="/dev/bus/usb:/dev/bus/usb",
    ),
    Setup(
        "ct-noqmp",
        "no QMP socket: no monitor in ARGUMENTS",
        f"{BIND} {RULE}",
        BY_PORT,
        check="container.qmp",
        severities=("warning",),
        fix_has="-qmp unix:/qmp/qmp.sock",
    ),
    Setup(
        "ct-hostaddr",
        "usb-host by hostaddr in ARGUMENTS",
        f"{BIND} {RULE}",
        "-device usb-host,bus=xhci.0,hostbus=2,hostaddr={devnum} " + QMP,
        check="container.arguments",
        severities=("warning",),
        fix_has="hostport",
    ),
    Setup(
        "ct-usbvar",
        'the image\'s USB variable given a device (USB: "0x1234:0x5678")',
        f"{BIND} {RULE}",
        QMP,
        env=("USB=0x0627:0x0001",),
        check="container.usb-env",
        severities=("error",),
        fix_has="vendorid=0x0627,productid=0x0001",
    ),
    Setup(
        "ct-usboff",
        "USB=no: the image's controller left out",
        f"{BIND} {RULE}",
        f"{BY_PORT} {QMP}",
        env=("USB=no",),
        check="container.usb-env",
        severities=("error",),
        fix_has="qemu-xhci",
    ),
    Setup(
        "ct-xhci2",
        "a second xHCI in ARGUMENTS beside the image's, the device on it",
        f"{BIND} {RULE}",
        f"-device qemu-xhci,id=xhci2 -device usb-host,bus=xhci2.0,hostbus=2,hostport=2.1 {QMP}",
        check="container.controllers",
        severities=("warning",),
        fix_has='usb_bus = "xhci.0"',
    ),
    Setup(
        "ct-xhcidup",
        "a qemu-xhci in ARGUMENTS with the image's id (xhci)",
        f"{BIND} {RULE}",
        f"-device qemu-xhci,id=xhci,p2=8,p3=8 {BY_PORT} {QMP}",
        check="container.controllers",
        severities=("error",),
        fix_has="remove the controller",
    ),
)


def load_image(guest: LabGuest, engine: Engines, tarball: Path, timeout: float = 1800) -> float:
    """``import`` the lab image (:meth:`Engines.load_image`, with more time: ``podman
    import`` took over 300 s under TCG at load 12); seconds it took."""
    changes = " ".join(f"--change {shlex.quote(c)}" for c in IMPORT_CHANGES)
    t0 = time.monotonic()
    guest.run(
        f"{engine.spec.cli()} import {changes} {shlex.quote(str(tarball))} {IMAGE}",
        timeout=timeout,
        check=True,
    )
    return time.monotonic() - t0


def devnum(guest: LabGuest, port: str = PORT) -> int:
    return int(guest.run(f"cat /sys/bus/usb/devices/{port}/devnum", check=True).stdout)


def create(guest: LabGuest, engine: Engines, setups: tuple[Setup, ...] = SETUPS) -> dict[str, str]:
    """Start every setup's container (and the udev-style symlink); the engine's
    complaint for each one it refused ({} when all were made)."""
    g, cli, root = guest, engine.spec.cli(), engine.spec.root
    num = devnum(g)
    g.run(f"ln -sfn bus/usb/{BUS}/{num:03d} {SYMLINK}", check=True)
    lines = []
    for s in setups:
        lines.append(
            f"{s.run_command(cli, f'{root}/q', num)} >/dev/null 2>{root}/q/{s.name}.err"
            f" || echo {s.name}"
        )
    g.run(f"mkdir -p {root}/q", check=True)
    res = g.run("\n".join(lines), timeout=2400, check=True)
    refused = {}
    for name in res.stdout.split():
        refused[name] = g.run(f"cat {root}/q/{name}.err").stdout.strip()
    return refused


def remove(guest: LabGuest, engine: Engines, setups: tuple[Setup, ...] = SETUPS) -> None:
    names = " ".join(s.name for s in setups)
    guest.run(f"{engine.spec.cli()} rm -f {names} >/dev/null 2>&1 || true", timeout=600)


def _get(guest: LabGuest, engine: Engines, path: str, timeout: float = 900) -> Any:
    """One unversioned API call by curl in the guest (Podman's service took over
    120 s for ``/version`` under TCG at load 17: :meth:`Engines.inspect`'s limit)."""
    res = guest.run(engine.spec.curl("GET", path), timeout=timeout, check=True)
    return json.loads(res.stdout)


def version(guest: LabGuest, engine: Engines) -> str:
    doc = _get(guest, engine, "/version")
    return str(doc.get("Version", "unknown")) if isinstance(doc, dict) else "unknown"


def inspect_all(
    guest: LabGuest, engine: Engines, setups: tuple[Setup, ...] = SETUPS, skip: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    return {
        s.name: _get(guest, engine, f"/containers/{s.name}/json")
        for s in setups
        if s.name not in skip
    }


def write_fixtures(docs: dict[str, dict[str, Any]], dest: Path) -> list[Path]:
    """One ``NAME.json`` per container, as the engine answered (a list of one, as
    ``docker inspect`` prints it)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, doc in docs.items():
        path = dest / f"{name}.json"
        path.write_text(json.dumps([doc], indent=1, sort_keys=True) + "\n")
        out.append(path)
    return out


def doctor(guest: LabGuest, engine: Engines, config: Path, timeout: float = 2400) -> dict[str, Any]:
    """``vmplug doctor --json`` in the guest, on the engine's API socket."""
    res = guest.run(
        f"{VMPLUG} --config {config} doctor --json --timeout 300"
        f" --docker-socket {engine.spec.socket}",
        timeout=timeout,
    )
    if not res.stdout.strip():
        raise RuntimeError(f"vmplug doctor printed nothing (rc={res.rc}): {res.stderr[-2000:]}")
    doc = json.loads(res.stdout)
    if not isinstance(doc, dict):
        raise RuntimeError("vmplug doctor --json: not a document")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", type=Path, help="where ENGINE-VERSION/NAME.json go")
    ap.add_argument("--engine", action="append", choices=("docker", "podman"))
    ns = ap.parse_args(argv)
    reason = lab_unavailable_reason()
    if reason:
        print(f"lab guest unavailable: {reason}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vmplug-capture-"))
    guest = LabGuest([HUB, KBD, TABLET], work / "lab", memory="1536M")
    try:
        tarball = build_image_tar(guest.workdir / "image.tar")
        guest.start()
        guest.wait_for(f"test -e /sys/bus/usb/devices/{PORT}")
        for kind in ns.engine or ["docker", "podman"]:
            engine = Engines(guest, kind, f"/tmp/ct-{kind}")
            try:
                engine.prepare()
                engine.start()
                load_image(guest, engine, tarball)
                refused = create(guest, engine)
                time.sleep(5.0)  # let the QEMUs that fail exit
                docs = inspect_all(guest, engine, skip=tuple(refused))
                label = f"{kind}-{version(guest, engine)}"
                for path in write_fixtures(docs, ns.dest / label):
                    print(path)
                for name, why in refused.items():
                    print(f"{label}: {name} refused: {why}", file=sys.stderr)
                remove(guest, engine)
            finally:
                engine.close()
    except LabUnavailable as exc:
        print(f"lab guest unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        guest.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
