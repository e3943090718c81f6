"""Lab: the doctor's container layer on real engines, on the setups people write.

One lab guest boot (real kernel, real USB, TCG) for both engines in turn:
Debian's Docker 20.10 (API 1.41), then Podman 4.3's service.  On each, every
setup of :data:`vmplug_lab.capture_inspect.SETUPS` is made for real as a
container of the dockurr-like image (the engine's own CLI, the flags people
put in compose files), and the real ``vmplug doctor --json`` is run on the
engine's API socket.  Each setup must get its finding, with the fix; the
setup the fixes lead to (``ct-good``, what ``vmplug generate compose``
writes) must get none.  Then what each finding claims is shown to be true
in the same containers:

* no cgroup rule: opening the USB node in the container is refused (EPERM),
  with the rule it opens;
* ``devices:`` a node: after a replug the device's new node is not in the
  container, while the bind mount shows it;
* ``USB`` given a device, a second controller with the image's id: the
  container's QEMU did not start, with QEMU's own words in its log;
* a second xHCI: its real QEMU has two USB buses (``vmplug vms``).

With ``VMPLUG_CAPTURE_INSPECT=DIR`` the inspect documents are also written
to ``DIR/ENGINE-VERSION/NAME.json`` (:func:`capture_inspect.write_fixtures`,
how ``tests/fixtures/docker/real`` was made).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmplug_lab import capture_inspect as ci
from vmplug_lab.containers import HUB, KBD, TABLET, VMPLUG, Engines, build_image_tar
from vmplug_lab.guest import LabGuest, lab_unavailable_reason

pytestmark = [pytest.mark.lab, pytest.mark.long_lab, pytest.mark.timeout(5400)]


class Rig:
    def __init__(self, guest: LabGuest, tarball: Path) -> None:
        self.guest = guest
        self.tarball = tarball
        self.results: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    work = Path(tmp_path_factory.mktemp("doctor-ct"))
    guest = LabGuest([HUB, KBD, TABLET], work / "lab", memory="1536M")
    try:
        tarball = build_image_tar(guest.workdir / "image.tar")
        guest.start()
        guest.wait_for(f"test -e /sys/bus/usb/devices/{ci.PORT}")
        yield Rig(guest, tarball)
    finally:
        guest.stop()


def _container_findings(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["subject"], f["check"]): f for f in doc["findings"] if f["layer"] == "container"}


def _exec(rig: Rig, engine: Engines, name: str, cmd: str) -> tuple[int, str]:
    res = rig.guest.run(f"{engine.spec.cli()} exec {name} {cmd} 2>&1", timeout=300)
    return res.rc, res.stdout


@pytest.mark.parametrize("kind", os.environ.get("VMPLUG_LAB_ENGINES", "docker podman").split())
def test_doctor_finds_each_setup_on_the_real_engine(rig: Rig, kind: str) -> None:
    g = rig.guest
    engine = Engines(g, kind, f"/tmp/ct-{kind}")
    t0 = time.monotonic()
    try:
        engine.prepare()
        engine.start()
        ci.load_image(g, engine, rig.tarball)
        t_engine = time.monotonic() - t0
        t0 = time.monotonic()
        refused = ci.create(g, engine)
        t_create = time.monotonic() - t0
        assert not refused, refused
        time.sleep(5.0)  # the QEMUs that cannot start exit at once
        label = f"{kind}-{ci.version(g, engine)}"
        docs = ci.inspect_all(g, engine)
        dest = os.environ.get("VMPLUG_CAPTURE_INSPECT")
        if dest:
            ci.write_fixtures(docs, Path(dest) / label)
        cfg = g.workdir / "empty.toml"
        cfg.write_text("")
        t0 = time.monotonic()
        report = ci.doctor(g, engine, cfg)
        t_doctor = time.monotonic() - t0
        (g.workdir / f"doctor-{kind}.json").write_text(json.dumps(report, indent=1))
        by = _container_findings(report)

        # every setup found, with the fix that makes it ct-good
        missed = []
        for s in ci.SETUPS:
            if not s.check:
                continue
            f = by.get((s.name, s.check))
            if f is None or f["severity"] not in s.severities_on(kind):
                missed.append((s.name, s.check, f and f["severity"]))
            elif s.fix_has not in (f.get("fix") or ""):
                missed.append((s.name, s.check, "fix lacks " + s.fix_has))
        assert not missed, (missed, sorted((k, v["severity"]) for k, v in by.items()))
        symlink = by[("ct-symlink", "container.devices")]
        assert any("/dev/bus/usb/" in e for e in symlink["evidence"]), symlink
        good = [
            (k, v["severity"], v["title"])
            for k, v in by.items()
            if k[0] == "ct-good" and v["severity"] in ("warning", "error")
        ]
        assert not good, good
        qmp = by[("ct-good", "container.qmp")]["title"]
        assert "vmplug's QMP socket is reachable" in qmp, qmp

        # what the findings claim is true in these containers (every claim tried,
        # the failures said together: one guest boot is 3-5 min)
        wrong: list[str] = []

        def claim(ok: bool, what: str, seen: object) -> None:
            if not ok:
                wrong.append(f"{what}: {seen!r}"[:1500])
                print(f"CLAIM FAILED {kind}: {wrong[-1]}", flush=True)

        node = f"/dev/bus/usb/{ci.BUS}/{ci.devnum(g):03d}"
        rc, out = _exec(rig, engine, "ct-norule", f"cat {node}")
        claim(rc != 0 and "Operation not permitted" in out, "no rule: EPERM", (rc, out))
        rc, out = _exec(rig, engine, "ct-good", f"sh -c 'cat {node} | busybox wc -c'")
        words = out.split()
        claim(
            rc == 0 and bool(words) and words[-1].isdigit() and int(words[-1]) >= 18,
            "rule: a device descriptor read",
            (rc, out),
        )
        for name, says in (
            ("ct-usbvar", "'0x0627:0x0001' is not a valid device model name"),
            ("ct-xhcidup", "Duplicate ID 'xhci' for device"),
        ):
            state = docs[name]["State"]
            claim(state["Running"] is False and state["ExitCode"] != 0, f"{name} exited", state)
            logs = g.run(f"{engine.spec.cli()} logs {name} 2>&1", timeout=300).stdout
            claim(says in logs, f"{name} log", logs[-1500:])
        vms = g.run(
            f"{VMPLUG} --config {cfg} vms --json --no-processes --timeout 30"
            f" --docker-socket {engine.spec.socket}",
            timeout=600,
        )
        try:
            found = {v["name"]: v for v in json.loads(vms.stdout)["vms"]}
        except (ValueError, KeyError, TypeError):
            found = {}
        claim("ct-xhci2" in found, "vmplug vms lists ct-xhci2", (vms.rc, vms.stdout, vms.stderr))
        # usb_buses: "xhci.0 (qemu-xhci)", the bus and its controller
        two = sorted(b.split()[0] for b in found.get("ct-xhci2", {}).get("usb_buses") or [])
        claim(two == ["xhci.0", "xhci2.0"], "ct-xhci2's QEMU has two USB buses", found)
        one = [b.split()[0] for b in found.get("ct-good", {}).get("usb_buses") or []]
        claim(one == ["xhci.0"], "ct-good's QEMU has one", one)

        # replug: the devices: node stays the old one; the bind mount shows the new
        old = ci.devnum(g)
        g.unplug(KBD.id)
        g.hotplug(KBD)
        g.wait_for(f"test -e /sys/bus/usb/devices/{ci.PORT}/devnum")
        new = ci.devnum(g)
        claim(new != old, "replug: a new device number", (old, new))
        listing = f"ls /dev/bus/usb/{ci.BUS}/"
        rc, inside = _exec(rig, engine, "ct-devices", listing)
        claim(f"{new:03d}" not in inside.split(), "devices: the new node absent", inside)
        rc, inside = _exec(rig, engine, "ct-good", listing)
        claim(f"{new:03d}" in inside.split(), "bind mount: the new node present", inside)
        assert not wrong, wrong
        rig.results[kind] = {
            "engine": label,
            "engine_start_import_s": round(t_engine, 1),
            "create_s": round(t_create, 1),
            "containers": len(ci.SETUPS),
            "doctor_s": round(t_doctor, 1),
        }
        print(json.dumps(rig.results[kind]))
    finally:
        ci.remove(g, engine)
        engine.close()
