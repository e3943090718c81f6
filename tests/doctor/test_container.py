"""Container checks on Docker-shaped inspect documents and compose files, and the
Engine API client against a real HTTP server on a unix socket."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vmplug.config import parse_config
from vmplug.doctor import container
from vmplug.doctor.container_info import load_compose_file, load_inspect_file
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.generate.compose import plan_compose, render_new
from vmplug.host.inventory import read_devices
from vmplug.wire.engine import get_json_sync as api_get
from vmplug_lab import capture_inspect

from .conftest import DOCTOR, SYSFS

DOCKER = DOCTOR / "docker"
COMPOSE = DOCTOR / "compose"
NO_SELINUX = Path("/nonexistent/selinux/enforce")


def check(ctx: DoctorContext) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in run_checks(ctx, list(container.CHECKS)):
        out.setdefault(f.check, []).append(f)
    return out


def sev(found: dict[str, list[Finding]], check_id: str) -> Severity:
    (f,) = found[check_id]
    return f.severity


def ctx_for(**kw: Any) -> DoctorContext:
    kw.setdefault("api_sockets", [])
    kw.setdefault("selinux_enforce", NO_SELINUX)
    return DoctorContext(sysfs_root=SYSFS / "mixed", **kw)


def test_good_compose_from_vmplug_generate_is_quiet(tmp_path: Path) -> None:
    audio = next(d for d in read_devices(SYSFS / "mixed") if d.port == "2-2.1")
    path = tmp_path / "docker-compose.yml"
    path.write_text(render_new(plan_compose([audio], base_dir=tmp_path)))
    found = check(ctx_for(compose_files=[path]))
    assert all(f.severity is Severity.OK for fs in found.values() for f in fs), found
    (qmp,) = found["container.qmp"]
    assert f"reachable from the host at {tmp_path}/qmp/qmp.sock" in qmp.title


def test_devices_instead_of_bind_mount() -> None:
    found = check(ctx_for(compose_files=[COMPOSE / "devices-usb.yml"]))
    (f,) = found["container.devices"]
    assert f.severity is Severity.ERROR and "created once" in f.title
    assert "devices: /dev/bus/usb" in f.evidence
    assert f.fix and "/dev/bus/usb:/dev/bus/usb" in f.fix and "c 189:* rwm" in f.fix
    assert sev(found, "container.cgroup") is Severity.WARNING  # no rule either
    assert sev(found, "container.qmp") is Severity.OK
    assert sev(found, "container.arguments") is Severity.OK  # by vendorid: fine


def test_missing_cgroup_rule_with_bind_mount() -> None:
    found = check(ctx_for(compose_files=[COMPOSE / "no-cgroup-rule.yml"]))
    assert sev(found, "container.devices") is Severity.OK  # long-syntax bind found
    (f,) = found["container.cgroup"]
    assert f.severity is Severity.ERROR and "EPERM" in f.title
    assert f.fix == "    device_cgroup_rules:\n      - 'c 189:* rwm'"


def test_usb_off() -> None:
    found = check(ctx_for(compose_files=[COMPOSE / "usb-off.yml"]))
    (f,) = found["container.usb-env"]
    assert f.severity is Severity.ERROR and f.evidence[-1] == "environment USB=N"
    assert sev(found, "container.cgroup") is Severity.OK
    assert sev(found, "container.devices") is Severity.OK


def test_arguments_by_address_and_no_qmp() -> None:
    found = check(ctx_for(compose_files=[COMPOSE / "by-address-no-qmp.yml"]))
    (f,) = found["container.arguments"]
    assert f.severity is Severity.WARNING and "2 usb-host" in f.title
    assert "-device driver=usb-host,hostbus=3,hostaddr=7" in f.evidence
    assert sev(found, "container.qmp") is Severity.WARNING
    assert sev(found, "container.cgroup") is Severity.OK  # privileged


def test_qmp_socket_not_reachable_from_the_host() -> None:
    found = check(ctx_for(compose_files=[COMPOSE / "qmp-not-mounted.yml"]))
    (f,) = found["container.qmp"]
    assert f.severity is Severity.WARNING and "/run/qmp.sock" in f.title
    assert f.fix and "./qmp:/run" in f.fix


@pytest.mark.parametrize(
    "arguments",
    [
        "-qmp unix:/qmp/qmp.sock,server=on,wait=off",
        "-chardev socket,id=vq,path=/qmp/qmp.sock,server=on,wait=off -mon chardev=vq,mode=control",
    ],
)
def test_qmp_socket_in_either_form_is_found_the_way_the_daemon_finds_it(arguments: str) -> None:
    from vmplug.doctor.container_info import ContainerSpec, qmp_socket  # noqa: PLC0415

    spec = ContainerSpec(name="windows", source="test", env={"ARGUMENTS": arguments})
    assert qmp_socket(spec) == ("ARGUMENTS", "/qmp/qmp.sock")
    # the image's own HMP monitor is not vmplug's QMP socket
    assert (
        qmp_socket(ContainerSpec(name="w", source="t", env={"QMP": "/run/shm/monitor.sock"}))
        is None
    )
    assert qmp_socket(ContainerSpec(name="w", source="t", env={"QMP": "unix:/q/s.sock"})) == (
        "QMP",
        "/q/s.sock",
    )


def test_selinux_enforcing(tmp_path: Path) -> None:
    enforce = tmp_path / "enforce"
    enforce.write_text("1")
    found = check(ctx_for(compose_files=[COMPOSE / "no-cgroup-rule.yml"], selinux_enforce=enforce))
    (f,) = found["container.selinux"]
    assert f.severity is Severity.WARNING and f"{enforce} = 1" in f.evidence
    assert f.fix and "label=disable" in f.fix
    # privileged containers are not confined
    found = check(
        ctx_for(compose_files=[COMPOSE / "by-address-no-qmp.yml"], selinux_enforce=enforce)
    )
    assert sev(found, "container.selinux") is Severity.OK
    enforce.write_text("0")
    found = check(ctx_for(compose_files=[COMPOSE / "no-cgroup-rule.yml"], selinux_enforce=enforce))
    assert sev(found, "container.selinux") is Severity.OK


def test_inspect_documents(tmp_path: Path) -> None:
    found = check(ctx_for(inspect_files=[DOCKER / "windows-bad.json"]))
    assert sev(found, "container.devices") is Severity.ERROR
    assert sev(found, "container.cgroup") is Severity.WARNING
    assert sev(found, "container.usb-env") is Severity.ERROR
    assert sev(found, "container.qmp") is Severity.WARNING
    assert sev(found, "container.arguments") is Severity.WARNING
    assert all(f.subject == "win-studio" for fs in found.values() for f in fs)
    good = check(ctx_for(inspect_files=[DOCKER / "windows-good.json"]))
    bad = [f for fs in good.values() for f in fs if f.severity is not Severity.OK]
    # running, but its QMP socket is not on this machine; and its ARGUMENTS add a
    # qemu-xhci with the id of the image's own (USB unset: qemu-xhci,id=xhci):
    # QEMU 7.2 says "Duplicate ID 'xhci' for device" and does not start
    assert [(f.check, f.severity) for f in bad] == [
        ("container.controllers", Severity.ERROR),
        ("container.qmp", Severity.WARNING),
    ]
    assert "Duplicate ID 'xhci'" in bad[0].title
    assert "/srv/windows/qmp/qmp.sock" in bad[1].title


def test_no_engine_says_so() -> None:
    found = check(ctx_for(api_sockets=["/nonexistent/docker.sock"]))
    (f,) = found["container.engine"]
    assert f.severity is Severity.INFO and "no Docker or Podman API socket" in f.title
    assert f.evidence == ("/nonexistent/docker.sock: no such socket",)
    assert f.fix and "--compose" in f.fix


def test_compose_short_and_long_forms() -> None:
    (spec,) = load_compose_file(COMPOSE / "no-cgroup-rule.yml")
    assert spec.env["VERSION"] == "11" and spec.env["ARGUMENTS"].startswith("-device usb-host")
    assert ("/dev/bus/usb", "/dev/bus/usb") in spec.binds
    assert (str((COMPOSE / "qmp").resolve()), "/qmp") in spec.binds


@pytest.fixture
async def engine(tmp_path: Path) -> Any:
    """A Docker-Engine-shaped HTTP API on a unix socket serving the inspect documents."""
    docs = {d["Id"]: d for d in json.loads((DOCKER / "windows-bad.json").read_text())}
    listing = json.loads((DOCKER / "containers-list.json").read_text())
    seen: list[str] = []

    async def containers(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(listing)

    async def inspect(request: web.Request) -> web.Response:
        seen.append(request.path)
        doc = docs.get(request.match_info["id"])
        if doc is None:
            return web.json_response({"message": "No such container"}, status=404)
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/containers/json", containers)
    app.router.add_get("/containers/{id}/json", inspect)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "docker.sock"
    site = web.UnixSite(runner, str(sock))
    await site.start()
    yield sock, seen
    await runner.cleanup()


async def test_engine_api_over_a_unix_socket(engine: Any) -> None:
    sock, seen = engine
    ctx = ctx_for(api_sockets=[str(sock)])
    found = await asyncio.to_thread(check, ctx)
    assert seen == [
        "/containers/json",
        "/containers/c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d3/json",
    ]
    (f,) = found["container.devices"]
    assert f.severity is Severity.ERROR and f.subject == "win-studio"
    assert f.evidence[0] == f"source: {sock} GET /containers/c2d4e6f8a0b1/json"
    with pytest.raises(OSError, match="HTTP 404"):
        await asyncio.to_thread(api_get, str(sock), "/containers/nope/json", 5.0)


def test_a_socket_that_is_not_an_engine(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        found = check(ctx_for(api_sockets=[str(path)], timeout=0.5))
    finally:
        srv.close()
    (f,) = found["container.engine"]
    assert f.severity is Severity.INFO
    assert f.evidence[0].startswith(f"{path}: ") and "timed out" in f.evidence[0]


# ------------------------------------------------ real inspect documents (lab engines)

#: ``GET /containers/NAME/json`` of each setup on Docker 20.10 and Podman 4.3 in the
#: lab guest, written by vmplug_lab.capture_inspect (see its README).
REAL = Path(__file__).resolve().parents[1] / "fixtures" / "docker" / "real"
REAL_DOCS = sorted(REAL.glob("*/*.json"))
SETUPS = {s.name: s for s in capture_inspect.SETUPS}


def _real_dev(tmp_path: Path, doc: Path) -> Path:
    """A /dev as the lab guest's was: the setup's node and the udev-style symlink to it."""
    (spec,) = load_inspect_file(doc)
    nodes = [d for d in spec.devices if d.startswith("/dev/bus/usb/")] or ["/dev/bus/usb/002/003"]
    dev = tmp_path / "dev"
    node = dev / nodes[0].removeprefix("/dev/")
    node.parent.mkdir(parents=True)
    node.touch()
    (dev / capture_inspect.SYMLINK.removeprefix("/dev/")).symlink_to(node.relative_to(dev))
    return dev


def test_real_documents_cover_every_setup_on_both_engines() -> None:
    engines = sorted({p.parent.name.split("-")[0] for p in REAL_DOCS})
    assert engines == ["docker", "podman"], REAL_DOCS
    for engine in {p.parent for p in REAL_DOCS}:
        assert sorted(p.stem for p in engine.glob("*.json")) == sorted(SETUPS), engine


@pytest.mark.parametrize("doc", REAL_DOCS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_doctor_on_real_inspect_documents(doc: Path, tmp_path: Path) -> None:
    setup = SETUPS[doc.stem]
    found = check(ctx_for(inspect_files=[doc], dev_root=_real_dev(tmp_path, doc)))
    bad = {f.check: f for fs in found.values() for f in fs if f.severity is not Severity.OK}
    if setup.check != "container.cgroup":  # Podman: "cannot tell", an INFO, not a fault
        bad = {c: f for c, f in bad.items() if f.severity >= Severity.WARNING}
    # off the lab guest, the QMP socket of a running container is not on this machine
    qmp = bad.pop("container.qmp", None)
    if qmp is not None and setup.check != "container.qmp":
        assert "but is not there" in qmp.title, qmp
    if not setup.check:
        assert not bad, bad
        return
    f = bad.get(setup.check) or (qmp if setup.check == "container.qmp" else None)
    assert f is not None, (setup.name, sorted(bad))
    assert f.severity.label in setup.severities_on(doc.parent.name), f
    assert setup.fix_has in (f.fix or ""), f.fix


def test_two_controllers_with_usb_bus_in_the_config_is_fine() -> None:
    docs = sorted(REAL.glob("*/ct-xhci2.json"))
    assert docs
    config = parse_config('[vm.ct-xhci2]\ncontainer = "ct-xhci2"\nusb_bus = "xhci.0"\n')
    for doc in docs:
        (f,) = check(ctx_for(inspect_files=[doc]))["container.controllers"]
        assert f.severity is Severity.WARNING and "xhci2.0" in f.title
        (f,) = check(ctx_for(inspect_files=[doc], config=config))["container.controllers"]
        assert f.severity is Severity.OK and "usb_bus = 'xhci.0'" in f.title
