"""``vmplug doctor``'s network layer against real parts: a real export
endpoint on loopback, real certificates made by :mod:`vmplug.remote.certs`
(a good one, one expiring in 5 days, one of another CA), a real QEMU whose
usb-redir chardev streams from the endpoint (device side:
:class:`tests.support.usbredir_device.UsbredirDevice`), and the doctor's
checks run as ``vmplug doctor`` runs them (``all_checks`` + ``run_checks``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.remote.conftest import Pki, wait_for
from tests.support.qemu_proc import QemuFactory
from tests.support.usbredir_device import UsbredirDevice
from vmplug.cli.doctor import all_checks
from vmplug.config import parse_config
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import Finding, Severity, run_checks
from vmplug.doctor.network import parse_chardev_filename
from vmplug.remote.export import ExportEndpoint, TcpSource
from vmplug.vms.base import UsbRedirSpec
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp
from vmplug.wire.tls import server_context

pytestmark = [pytest.mark.timeout(120)]

DEV = "vmplug-remote0001"


def _config(tmp_path: Path, certs_dir: Path, ports: dict[str, int], me: str = "vmhost") -> Path:
    devices = ", ".join(f"{k} = {v}" for k, v in ports.items())
    path = tmp_path / "vmplug.toml"
    path.write_text(
        f'[host.devhost]\naddress = "127.0.0.1"\ncerts = "{certs_dir}"\nme = "{me}"\n'
        f"devices = {{ {devices} }}\n"
    )
    return path


def _network(ctx: DoctorContext) -> list[Finding]:
    checks = [c for c in all_checks() if c.layer == "network"]
    assert {c.id for c in checks} == {
        "network.certs",
        "network.reach",
        "network.stream",
        "network.quality",
        "network.container",
    }
    return run_checks(ctx, checks)


def _by(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


async def _endpoint(pki: Pki, source: TcpSource, **kw: object) -> ExportEndpoint:
    ep = ExportEndpoint(
        "kbd",
        source,
        host="127.0.0.1",
        port=0,
        tls=server_context(pki.devhost.ca, pki.devhost.cert, pki.devhost.key),
        allow=frozenset({"vmhost"}),
        **kw,  # type: ignore[arg-type]
    )
    await ep.start()
    return ep


async def test_reachable_endpoint_and_valid_certificates(pki: Pki, tmp_path: Path) -> None:
    device = UsbredirDevice()
    await device.start()
    ep = await _endpoint(pki, TcpSource("127.0.0.1", device.port))
    try:
        cfg = parse_config(
            _config(tmp_path, pki.vmhost.cert.parent, {"kbd": ep.address[1]}).read_text()
        )
        ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", timeout=3)
        (tmp_path / "noproc").mkdir()
        found = await asyncio.to_thread(_network, ctx)
    finally:
        await ep.stop()
        await device.stop()
    reach = _by(found, "network.reach")
    assert [f.severity for f in reach] == [Severity.OK], reach
    assert "answers over mutual TLS" in reach[0].title and "TLS handshake" in reach[0].evidence[0]
    certs = _by(found, "network.certs")
    assert [f.severity for f in certs] == [Severity.OK], certs
    quality = _by(found, "network.quality")
    assert [f.severity for f in quality] == [Severity.OK] and "no drops" in quality[0].title
    # the probe was answered, not counted as a refused or a streaming link
    assert ep.state.probes == 1 and ep.state.sessions == 0 and not ep.state.refusals
    assert device.connections == 0


async def test_wrong_ca_and_expiring_certificates(pki: Pki, tmp_path: Path) -> None:
    ep = await _endpoint(pki, TcpSource("127.0.0.1", 9))
    try:
        # this VM host's certificate from another CA (with that CA's own cert beside it)
        stranger = pki.issue  # noqa: F841 (keeps pki's CA: the stranger is another one)
        other = pki.other_ca()
        from vmplug.remote import certs  # noqa: PLC0415

        wrong = certs.issue(other, "vmhost", tmp_path / "wrong")
        cfg = parse_config(_config(tmp_path, wrong.cert.parent, {"kbd": ep.address[1]}).read_text())
        (tmp_path / "noproc").mkdir()
        ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", timeout=3)
        found = await asyncio.to_thread(_network, ctx)
        reach = _by(found, "network.reach")
        assert [f.severity for f in reach] == [Severity.ERROR], reach
        assert "TLS handshake" in reach[0].title and "certificate" in reach[0].title, reach
        assert await wait_for(lambda: ep.state.refusals, 10)  # the endpoint refused it too
        assert ep.state.probes == 0

        # a certificate that expires in 5 days: a warning with the renewal command
        now = dt.datetime.now(dt.UTC)
        soon = certs.issue(
            pki.root / "ca",
            "vmhost",
            tmp_path / "soon",
            not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=5),
        )
        cfg = parse_config(_config(tmp_path, soon.cert.parent, {"kbd": ep.address[1]}).read_text())
        ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", timeout=3)
        found = await asyncio.to_thread(_network, ctx)
        certs_f = _by(found, "network.certs")
        assert [f.severity for f in certs_f] == [Severity.WARNING], certs_f
        assert "expires in" in certs_f[0].title and certs_f[0].fix and "issue(" in certs_f[0].fix
        assert [f.severity for f in _by(found, "network.reach")] == [Severity.OK]

        # a VM host name the endpoint does not allow: told why
        other_name = pki.issue("intruder")
        cfg = parse_config(
            _config(
                tmp_path, other_name.cert.parent, {"kbd": ep.address[1]}, me="intruder"
            ).read_text()
        )
        ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", timeout=3)
        found = await asyncio.to_thread(_network, ctx)
        reach = _by(found, "network.reach")
        assert [f.severity for f in reach] == [Severity.ERROR], reach
        assert "'intruder' is not allowed" in reach[0].title, reach
    finally:
        await ep.stop()


async def test_unreachable_device_host(pki: Pki, tmp_path: Path) -> None:
    ep = await _endpoint(pki, TcpSource("127.0.0.1", 9))
    port = ep.address[1]
    await ep.stop()  # nothing listens there now
    cfg = parse_config(_config(tmp_path, pki.vmhost.cert.parent, {"kbd": port}).read_text())
    (tmp_path / "noproc").mkdir()
    ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", timeout=3)
    found = await asyncio.to_thread(_network, ctx)
    reach = _by(found, "network.reach")
    assert [f.severity for f in reach] == [Severity.ERROR]
    assert f"cannot reach 127.0.0.1:{port}" in reach[0].title and reach[0].fix


@pytest.mark.qemu
async def test_stream_state_from_qemu_and_the_device_host(
    pki: Pki, tmp_path: Path, qemu: QemuFactory
) -> None:
    device = UsbredirDevice()
    await device.start()
    ep = await _endpoint(pki, TcpSource("127.0.0.1", device.port))
    proc = qemu(qmp_sockets=2)
    proc.start()
    vm = QmpVm("vm", proc.qmp_path)
    try:

        def cont() -> None:
            with SyncQmp(str(proc.qmp_paths[1])) as q:
                q.execute("cont")

        await asyncio.to_thread(cont)
        await vm.start()
        assert await vm.wait_connected(10)
        tls = pki.qemu_dir(pki.vmhost, "vmhost")
        await vm.attach(DEV, UsbRedirSpec("127.0.0.1", ep.address[1], "devhost", str(tls)))
        for _ in range(200):
            if (await vm.observe())[DEV].attached:
                break
            await asyncio.sleep(0.05)
        await vm.stop()  # the doctor reads QEMU through its second socket, as with a daemon
        cfg = parse_config(_config(tmp_path, pki.vmhost.cert.parent, {}).read_text())
        ctx = DoctorContext(
            config=cfg,
            proc_root=tmp_path / "noproc",
            qmp_sockets=[str(proc.qmp_paths[1])],
            timeout=3,
        )
        (tmp_path / "noproc").mkdir()
        found = await asyncio.to_thread(_network, ctx)
        stream = _by(found, "network.stream")
        assert [f.severity for f in stream] == [Severity.OK], stream
        assert "streaming (kbd held by vmhost)" in stream[0].title
        assert "frontend-open True" in stream[0].evidence[0]
        quality = _by(found, "network.quality")
        assert quality and "kernel RTT" in quality[0].evidence[0], quality

        # the same device, and the device host says another VM host holds it now
        ep.state.holder = "vmhost-b"
        ctx = DoctorContext(
            config=cfg, proc_root=tmp_path / "noproc", qmp_sockets=[str(proc.qmp_paths[1])]
        )
        found = await asyncio.to_thread(_network, ctx)
        stream = _by(found, "network.stream")
        assert [f.severity for f in stream] == [Severity.WARNING], stream
        assert "half-open link" in stream[0].title
    finally:
        await vm.stop()
        await ep.stop()
        await device.stop()


def test_chardev_filenames_as_qemu_writes_them() -> None:
    assert parse_chardev_filename("disconnected:tcp:10.0.0.2:7101") == ("10.0.0.2", 7101, False)
    assert parse_chardev_filename("tcp:127.0.0.1:40000 <-> 127.0.0.1:7101") == (
        "127.0.0.1",
        7101,
        True,
    )


def test_doctor_json_has_the_network_layer(pki: Pki, tmp_path: Path) -> None:
    """The command itself: ``vmplug doctor --json`` reports the network findings."""
    from vmplug.cli.app import cli  # noqa: PLC0415

    path = _config(tmp_path, pki.vmhost.cert.parent, {"kbd": 1})
    (tmp_path / "noproc").mkdir()
    (tmp_path / "kmsg").write_text("")
    argv = ["--config", str(path), "doctor", "--json", "--proc-root", str(tmp_path / "noproc")]
    argv += ["--kernel-log", str(tmp_path / "kmsg"), "--docker-socket", str(tmp_path / "none")]
    res = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert res.exit_code == 1, res.output  # a finding: the device host is not there
    doc = json.loads(res.output)
    layers = {f["layer"] for f in doc["findings"]}
    assert "network" in layers, doc
    assert any(f["check"] == "network.reach" and f["severity"] == "error" for f in doc["findings"])


def test_container_vm_and_a_loopback_device_host(pki: Pki, tmp_path: Path) -> None:
    """A dockurr/windows QEMU cannot reach a device host on the VM host's
    127.0.0.1 from the container's bridge network: an error with the fix."""
    path = _config(tmp_path, pki.vmhost.cert.parent, {})
    text = path.read_text() + '\n[vm.win]\ncontainer = "windows"\n'
    cfg = parse_config(text)
    (tmp_path / "noproc").mkdir()
    ctx = DoctorContext(config=cfg, proc_root=tmp_path / "noproc", qmp_sockets=[], timeout=1)
    found = [f for f in _network(ctx) if f.check == "network.container"]
    assert [f.severity for f in found] == [Severity.ERROR], found
    assert "network_mode: host" in (found[0].fix or "")
    lan = parse_config(text.replace('address = "127.0.0.1"', 'address = "192.0.2.7"'))
    ctx = DoctorContext(config=lan, proc_root=tmp_path / "noproc", timeout=1)
    found = [f for f in _network(ctx) if f.check == "network.container"]
    assert [f.severity for f in found] == [Severity.INFO] and "dials 192.0.2.7" in found[0].title
