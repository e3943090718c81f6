"""Lab: the dockurr/windows path on a real Docker (Debian's docker.io 20.10, API 1.41)
and a real Podman service, inside the lab guest (real kernel, real USB).

One lab guest per engine (module-scoped, parametrized).  In it, as a user
would: ``vmplug generate compose --by-port 2-2.1 2-2.2`` writes the compose
file (the two devices share 0627:0001), the real ``docker-compose`` 1.29
brings it up (our dockurr-like image: :mod:`vmplug_lab.containers`; only the
image, KVM and networking are changed for the lab), and ``vmplug run`` finds
the container through the engine's API (``container =``, ``uri =``: the
version negotiated from ``/version``, never assumed) and attaches through the
container's bind-mounted QMP socket.  The demo's watcher reads, on a second
QMP socket of the container's QEMU, what it really holds.

The tests run in order, each on what the previous left: cold start, replug,
``docker restart``, ``docker-compose up --force-recreate`` (a new container
id, the same name), the engine killed -9 and started again, vmplug
restarted: every time both devices back in the QEMU, each exactly once.

Under Podman the container is made by the ``podman run`` flags vmplug
derives from the same compose file (``vmplug.generate.compose.
podman_run_command``): Podman 4.3's Docker-compatible API drops
``HostConfig.DeviceCgroupRules`` (the container's OCI spec held only "deny
all", so its QEMU kept both usb-host devices ``attached: false``), and
podman-compose 1.0.3 does not pass ``device_cgroup_rules`` on.  Re-creating
is ``podman rm -f`` + the same ``podman run`` (a new id, the same name).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug_lab.containers import KBD, PORTS, SERVICE, ContainerLab
from vmplug_lab.guest import lab_unavailable_reason

# The module fixture (guest boot, engine, image import: 4-9 min under TCG on a
# loaded machine) counts toward the first test's timeout.
pytestmark = [pytest.mark.lab, pytest.mark.long_lab, pytest.mark.timeout(1800)]

BOTH = sorted(PORTS.values())


@pytest.fixture(scope="module", params=["docker", "podman"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    kind = str(request.param)
    lab = ContainerLab(Path(tmp_path_factory.mktemp(f"ct-{kind}")), kind)
    try:
        lab.boot()
        yield lab
    finally:
        lab.close()


def _held(lab: ContainerLab, what: str, timeout: float = 90.0, min_conn: int = 0) -> float:
    secs, st = lab.expect(BOTH, timeout, min_conn)
    assert secs is not None, f"{what}: {st.describe()}\n{lab.daemon_log()[-2000:]}"
    return secs


def test_cold_start_compose_up_and_vmplug_attach(lab: ContainerLab) -> None:
    generated = lab.generate()
    # what vmplug wrote for the replug-proof path, kept in the lab's copy
    assert "/dev/bus/usb:/dev/bus/usb" in generated
    assert "c 189:* rwm" in generated
    assert "-qmp unix:/qmp/qmp.sock" in generated
    lab.up()
    if lab.kind == "podman":
        # the rule survives into the container Podman made (its compat API drops it)
        assert "--device-cgroup-rule" in lab.podman_run, lab.podman_run
    lab.start_watcher()
    lab.start_daemon()
    _held(lab, "cold start")
    log = lab.daemon_log()
    # the VM was found through the engine's API (Docker 20.10 refuses /v1.43/)
    assert f"vm {SERVICE}: container {SERVICE}, QMP at " in log, log


def test_replug_comes_back_into_the_container(lab: ContainerLab) -> None:
    lab.guest.unplug(KBD.id)
    secs, st = lab.expect([PORTS["tablet1"]], 60.0)
    assert secs is not None, st.describe()
    time.sleep(1.0)
    mark = len(lab.daemon_log())
    lab.guest.hotplug(KBD)
    _held(lab, "replug")
    assert " attach vmplug-" in lab.daemon_log()[mark:]


def test_engine_restart_of_the_container(lab: ContainerLab) -> None:
    conn = lab.state().conn
    lab.cli(f"restart -t 10 {SERVICE}")
    _held(lab, "docker restart", min_conn=conn)


def test_force_recreate_gives_a_new_container_with_its_devices(lab: ContainerLab) -> None:
    before = lab.container_id()
    conn = lab.state().conn
    lab.up(recreate=True)
    after = lab.container_id()
    assert after and after != before
    _held(lab, "up --force-recreate", min_conn=conn)


def test_engine_killed_and_started_again(lab: ContainerLab) -> None:
    conn = lab.state().conn
    lab.engine.kill(signal.SIGKILL)
    lab.engine.start()
    # Docker without live-restore stops the containers it finds and starts
    # them again (restart: always); Podman's service leaves them running.
    if lab.kind == "docker":
        _held(lab, "engine restart", 120.0, min_conn=conn)
    else:
        _held(lab, "engine restart", 120.0)
    assert lab.state().holds(BOTH)


def test_vmplug_restart_adopts_without_attaching_twice(lab: ContainerLab) -> None:
    lab.stop_daemon()
    conn = lab.state().conn
    lab.start_daemon()
    _held(lab, "vmplug restart")
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        st = lab.state()
        assert st.holds(BOTH) and st.conn == conn, st.describe()
        time.sleep(0.2)
    assert " attach vmplug-" not in lab.daemon_log()


#: The setups people write, each made for real as a running container (QEMU
#: paused with -S: only its configuration matters, not its CPU), and the
#: finding the doctor's container layer must give it: (name, run flags,
#: ARGUMENTS, environment, check, severities).
QMP = "-qmp unix:/qmp/qmp.sock,server=on,wait=off"
BY_PORT = "-device usb-host,bus=xhci.0,hostbus=2,hostport=2.1"
BIND = "-v /dev/bus/usb:/dev/bus/usb"
RULE = "--device-cgroup-rule='c 189:* rwm'"


def _setups(devnum: int) -> list[tuple[str, str, str, str, str, tuple[str, ...]]]:
    node = f"/dev/bus/usb/002/{devnum:03d}"
    return [
        ("ct-devices", f"--device {node} {RULE}", f"{BY_PORT} {QMP}", "", "container.devices",
         ("error",)),
        ("ct-norule", BIND, f"{BY_PORT} {QMP}", "", "container.cgroup", ("error",)),
        ("ct-privileged", f"--privileged --device {node}", f"{BY_PORT} {QMP}", "",
         "container.devices", ("error",)),
        ("ct-symlink", f"--device /dev/focusrite_4i4 {RULE}", f"{BY_PORT} {QMP}", "",
         "container.devices", ("error",)),
        ("ct-noqmp", f"{BIND} {RULE}", BY_PORT, "", "container.qmp", ("warning", "error")),
        ("ct-hostaddr", f"{BIND} {RULE}",
         f"-device usb-host,bus=xhci.0,hostbus=2,hostaddr={devnum} {QMP}", "",
         "container.arguments", ("warning",)),
        ("ct-usboff", f"{BIND} {RULE}", f"{BY_PORT} {QMP}", "USB=no", "container.usb-env",
         ("error",)),
    ]  # fmt: skip


def test_doctor_finds_the_setups_people_write(lab: ContainerLab) -> None:
    g = lab.guest
    devnum = int(g.run("cat /sys/bus/usb/devices/2-2.1/devnum", check=True).stdout)
    setups = _setups(devnum)
    lines = [f"ln -sf bus/usb/002/{devnum:03d} /dev/focusrite_4i4", "set -e"]
    for name, flags, args, env, _check, _sev in setups:
        qmpdir = f"/tmp/ct/{name}"
        envs = f"-e {env}" if env else ""
        lines.append(
            f"mkdir -p {qmpdir} && {lab.engine.spec.cli()} run -d --name {name}"
            f" --network none -v {qmpdir}:/qmp {flags} {envs}"
            f" -e ARGUMENTS='{args} -S' vmplug-lab/windows:latest >/dev/null"
        )
    g.run("\n".join(lines), timeout=400, check=True)
    res = g.run(
        f"{lab.env} /work/main/.venv/bin/vmplug doctor --json --timeout 60"
        f" --docker-socket {lab.engine.spec.socket}",
        timeout=400,
    )
    assert res.stdout.strip(), res.stderr
    doc = json.loads(res.stdout)
    (g.workdir / "doctor.json").write_text(res.stdout)
    ours = [f for f in doc["findings"] if f["layer"] == "container"]
    by = {(f["subject"], f["check"]): f for f in ours}
    missed = []
    for name, _flags, _args, _env, check, severities in setups:
        f = by.get((name, check))
        if f is None or f["severity"] not in severities:
            missed.append((name, check, f and f["severity"]))
    assert not missed, (missed, [(f["subject"], f["check"], f["severity"]) for f in ours])
    symlink = by[("ct-symlink", "container.devices")]
    assert any("/dev/focusrite_4i4 -> /dev/bus/usb/" in e for e in symlink["evidence"])
    # the generated service itself: nothing to fix in the container layer
    bad = [f for f in ours if f["subject"] == SERVICE and f["severity"] in ("warning", "error")]
    assert not bad, bad
