"""The container backend's Engine client and ``podman run`` form against a real
Podman service (Debian 12's podman 4.3, rootful, storage in the test's folder).

* The API version is negotiated from ``/_ping``'s ``Api-Version`` header and
  cached per address: Podman's ``/version`` runs ``dpkg-query`` for conmon,
  crun and slirp4netns on every call (seconds here, minutes in the TCG lab
  guest), ``/_ping`` does not.
* Podman 4.3's Docker-compatible API drops ``HostConfig.DeviceCgroupRules``
  (what docker-compose sends for ``device_cgroup_rules``): the container's OCI
  spec is "deny all devices", so QEMU in it cannot open a USB node.  The
  ``podman run`` flags :func:`vmplug.generate.compose.podman_run_command`
  makes of the generated compose file keep the rule.  Both read from the OCI
  spec Podman writes (``podman init``; the container need not run).

The service is stopped by its process group when the test ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.chroot import in_chroot
from tests.support.devices import AUDIO, KEYLAB
from vmplug.generate import compose
from vmplug.generate.common import CannotExpress
from vmplug.wire.engine import Engine, cached_version, forget_version
from vmplug.wire.errors import EngineError

pytestmark = [
    pytest.mark.skipif(
        shutil.which("podman") is None or os.geteuid() != 0,
        reason="needs Debian's podman and root",
    ),
    pytest.mark.skipif(in_chroot(), reason="Podman's service does not come up inside a chroot"),
]

IMAGE = "localhost/vmplug-test/empty:latest"
USB_RULE = {"allow": True, "type": "c", "major": 189, "access": "rwm"}


@dataclass
class Podman:
    base: Path
    sock: Path
    proc: subprocess.Popen[bytes] | None

    def cli(self) -> list[str]:
        b = self.base
        return [
            "podman", "--log-level=error", "--storage-driver=vfs", "--root", str(b / "root"),
            "--runroot", str(b / "runroot"), "--tmpdir", str(b / "tmp"),
            "--cgroup-manager=cgroupfs", "--events-backend=file",
        ]  # fmt: skip

    def run(self, *args: str) -> str:
        res = subprocess.run(
            [*self.cli(), *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert res.returncode == 0, (args, res.stderr)
        return res.stdout.strip()

    def device_rules(self, name: str) -> list[dict[str, Any]]:
        """The device cgroup rules of the OCI spec Podman wrote for ``name``."""
        cid = self.run("inspect", "-f", "{{.Id}}", name)
        # init writes the spec, then crun may refuse this sandbox's rlimits: fine
        subprocess.run([*self.cli(), "init", name], capture_output=True, timeout=120, check=False)
        spec = self.base / "root" / "vfs-containers" / cid / "userdata" / "config.json"
        doc = json.loads(spec.read_text())
        rules: list[dict[str, Any]] = doc["linux"]["resources"].get("devices") or []
        return rules


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    base = Path(tempfile.mkdtemp(prefix="vmplug-podman-vms-", dir="/tmp"))
    for sub in ("root", "runroot", "tmp"):
        (base / sub).mkdir()
    sock = base / "podman.sock"
    probe = Podman(base, sock, None)
    proc = subprocess.Popen(
        [*probe.cli(), "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rig = Podman(base, sock, proc)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("podman system service did not come up")
            time.sleep(0.1)
        tar = base / "empty.tar"
        with tarfile.open(tar, "w") as t:
            info = tarfile.TarInfo("etc/hostname")
            info.size = 6
            t.addfile(info, io.BytesIO(b"empty\n"))
        rig.run("import", str(tar), IMAGE)
        yield rig
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(f"{base}/"):
                subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(base, ignore_errors=True)


async def test_version_from_ping_cached_per_address(podman: Podman) -> None:
    address = str(podman.sock)
    forget_version(address)
    engine = Engine(address, timeout=30)
    version = await engine.negotiate()
    assert engine.negotiated_by == "_ping"
    # the same version Podman names on its (slow) /version
    named = (await engine.version())["ApiVersion"]
    assert version == named.removeprefix("v") and version
    assert cached_version(address) == (True, version)
    again = Engine(f"unix://{address}", timeout=30)
    t0 = time.monotonic()
    assert await again.negotiate() == version and again.negotiated_by == "cache"
    assert time.monotonic() - t0 < 0.05  # no call at all
    assert isinstance(await again.containers(), list)  # the prefix works: /v1.41/...


async def test_unreachable_engine_forgets_its_version(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone.sock")
    forget_version()
    engine = Engine(gone, timeout=2, api_version="1.41")
    with pytest.raises(EngineError):
        await engine.containers()
    assert cached_version(gone) == (False, None)


async def test_events_stream_from_real_podman(podman: Podman) -> None:
    """``/events`` on Podman (versioned path from the cache): a create is seen."""
    import asyncio  # noqa: PLC0415

    engine = Engine(str(podman.sock), timeout=30)
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in engine.events({"type": ["container"], "container": ["ev1"]}):
            seen.append(event)
            if str(event.get("Action") or event.get("status")) == "create":
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(1.0)
    await asyncio.to_thread(podman.run, "create", "--name", "ev1", "--network", "none", IMAGE, "x")
    await asyncio.wait_for(task, 60)
    podman.run("rm", "-f", "ev1")
    assert any(e.get("Actor", {}).get("Attributes", {}).get("name") == "ev1" for e in seen)


def test_compat_api_drops_the_cgroup_rule_podman_run_keeps_it(
    podman: Podman, tmp_path: Path
) -> None:
    text = compose.render_new(compose.plan_compose([AUDIO, KEYLAB], base_dir=tmp_path))
    argv = compose.podman_run_command(text, "windows", tmp_path)
    assert argv[:4] == ["podman", "run", "-d", "--name"] and argv[-1] == compose.IMAGE
    i = argv.index("--device-cgroup-rule")
    assert argv[i + 1] == compose.USB_CGROUP_RULE
    assert argv[argv.index(compose.USB_BIND) - 1 :][:2] == ["-v", compose.USB_BIND]
    assert f"{tmp_path}/qmp:/qmp" in argv and "--stop-timeout" in argv
    assert argv[argv.index("--stop-timeout") + 1] == "120"  # stop_grace_period: 2m
    line = compose.podman_shell(text, "windows", tmp_path)
    assert line.startswith(f"mkdir -p {tmp_path}/windows {tmp_path}/qmp && podman run -d ")
    args = next(a for a in argv if a.startswith("ARGUMENTS="))
    assert "-qmp unix:/qmp/qmp.sock" in args

    # the container by those flags (lab image, KVM and network left out as in the lab)
    dev = tmp_path / "usb"
    dev.mkdir()
    flags = [
        "--name", "by-run", "--network", "none",
        "-v", f"{dev}:/dev/bus/usb", "--device-cgroup-rule", argv[i + 1],
    ]  # fmt: skip
    podman.run("create", *flags, IMAGE, "x")
    assert USB_RULE in podman.device_rules("by-run")

    # what docker-compose 1.29 sends for the same service, on Podman's compat API
    body = {
        "Image": IMAGE,
        "Cmd": ["x"],
        "HostConfig": {
            "Binds": [f"{dev}:/dev/bus/usb:rw"],
            "DeviceCgroupRules": [compose.USB_CGROUP_RULE],
            "NetworkMode": "none",
        },
    }
    curl = [
        "curl", "-sf", "--unix-socket", str(podman.sock), "-H",
        "Content-Type: application/json", "-X", "POST", "-d", json.dumps(body),
        "http://podman/v1.41/containers/create?name=by-compose",
    ]  # fmt: skip
    res = subprocess.run(curl, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    rules = podman.device_rules("by-compose")
    # Podman 4.3's finding: only "deny all" (if this fails, Podman keeps the rule now
    # and compose.PODMAN_NOTE is out of date)
    assert USB_RULE not in rules and {"allow": False, "access": "rwm"} in rules, rules


def test_podman_run_refuses_what_it_cannot_translate() -> None:
    text = "services:\n  w:\n    image: x\n    healthcheck: {test: [CMD, true]}\n"
    with pytest.raises(CannotExpress, match="healthcheck"):
        compose.podman_run_command(text, "w")
    with pytest.raises(CannotExpress, match="no service 'nope'"):
        compose.podman_run_command(text, "nope")
    bad = "services:\n  w:\n    image: x\n    stop_grace_period: soon\n"
    with pytest.raises(CannotExpress, match="duration"):
        compose.podman_run_command(bad, "w")
