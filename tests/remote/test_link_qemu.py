"""Real QEMU's TLS chardev against vmplug's export endpoint (mutual TLS).

QEMU's usb-redir speaks first (its hello), so a usbredir peer on the
endpoint's plaintext side sees bytes only when the link really carries a
usbredir stream.  Each bad credential is refused by one side with a reason,
and nothing is attached: QEMU's ``query-chardev`` shows the chardev
disconnected, the peer saw nothing, QOM ``attached`` stays false.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.remote.conftest import Pki, UsbredirPeer, expired, running_vm, wait_for
from tests.support.qemu_proc import QemuFactory
from vmplug.errors import UsageError
from vmplug.remote import certs
from vmplug.remote.export import ExportEndpoint, TcpSource
from vmplug.vms.base import UsbRedirSpec, VmConfigError
from vmplug.vms.qmp import QmpVm
from vmplug.wire.tls import client_context

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

DEV = "vmplug-remote0001"


def _spec(ep: ExportEndpoint, tls_dir: Path | None, **kw: Any) -> UsbRedirSpec:
    return UsbRedirSpec(
        "127.0.0.1", ep.address[1], "devhost", None if tls_dir is None else str(tls_dir), **kw
    )


async def test_right_certificates_carry_the_usbredir_stream(
    pki: Pki,
    peer: UsbredirPeer,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    ep = await make_endpoint(pki.devhost, TcpSource("127.0.0.1", peer.port))
    vm, _ = await running_vm(qemu, make_vm)
    await vm.attach(DEV, _spec(ep, pki.qemu_dir(pki.vmhost, "vmhost")))
    await asyncio.wait_for(peer.got_hello.wait(), 15)
    assert peer.hellos[0].startswith(b"qemu usb-redir guest"), peer.hellos
    assert await wait_for(lambda: ep.state.last is not None and ep.state.last.down > 0)
    assert ep.state.holder == "vmhost"
    assert ep.state.refusals == type(ep.state.refusals)(maxlen=50)
    assert (await vm.redir_links()) == {DEV: True}
    seen = (await vm.observe())[DEV]
    assert (seen.driver, seen.chardev, seen.bus) == ("usb-redir", f"{DEV}-chr", "xhci.0")
    assert seen.attached is False  # the test peer announces no device: nothing in the guest

    # vmplug restarted: a new QmpVm adopts the device by its id, and detaches both parts
    await vm.stop()
    again = make_vm("vm", vm.address)
    await again.start()
    assert await again.wait_connected(10)
    assert set(await again.observe_bindings()) == {DEV}
    assert (await again.redir_links()) == {DEV: True}
    await again.detach(DEV)
    assert await again.observe() == {}
    assert await again.redir_links() == {}
    assert await wait_for(lambda: ep.state.holder is None)
    assert ep.state.sessions == 1


async def _refused(ep: ExportEndpoint, peer: UsbredirPeer, vm: QmpVm, spec: UsbRedirSpec) -> None:
    """Attach, let QEMU try (and retry), then prove nothing got through."""
    await vm.attach(DEV, spec)
    assert await wait_for(lambda: ep.state.connections >= 2, 15), "QEMU did not retry"

    async def unlinked() -> bool:
        return await vm.redir_links() == {DEV: False}

    # a refusal after the handshake (a name not allowed) leaves QEMU's chardev
    # connected for the moment until the endpoint closes it: seen disconnected
    assert await wait_for(unlinked, 5), await vm.redir_links()
    assert peer.connections == 0 and peer.received == 0  # the device was never opened
    assert ep.state.sessions == 0 and ep.state.holder is None
    assert (await vm.observe())[DEV].attached is False
    await vm.detach(DEV)
    assert await vm.redir_links() == {}


async def test_client_certificate_from_another_ca_is_refused(
    pki: Pki,
    peer: UsbredirPeer,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    ep = await make_endpoint(pki.devhost, TcpSource("127.0.0.1", peer.port))
    vm, _ = await running_vm(qemu, make_vm)
    stranger = certs.issue(pki.other_ca(), "vmhost", pki.root / "stranger")
    # QEMU itself will not load a certificate its own CA did not sign: a clear error
    mixed = pki.qemu_dir(certs.HostFiles(pki.ca.cert, stranger.cert, stranger.key), "mixed")
    with pytest.raises(VmConfigError, match="hasn't got a known issuer"):
        await vm.attach(DEV, _spec(ep, mixed))
    assert await vm.observe() == {} and await vm.redir_links() == {}
    # a VM host of another installation altogether: the endpoint refuses its certificate
    await _refused(ep, peer, vm, _spec(ep, pki.qemu_dir(stranger, "stranger")))
    reason = ep.state.refusals[0].reason
    assert "certificate rejected" in reason and "unable to get local issuer" in reason, reason


async def test_expired_client_certificate_is_refused(
    pki: Pki,
    peer: UsbredirPeer,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    ep = await make_endpoint(pki.devhost, TcpSource("127.0.0.1", peer.port))
    vm, _ = await running_vm(qemu, make_vm)
    old = expired(pki, "vmhost-old")
    # QEMU will not even load an expired certificate of its own
    with pytest.raises(VmConfigError, match="has expired"):
        await vm.attach(DEV, _spec(ep, pki.qemu_dir(old, "old")))
    assert await vm.observe() == {} and await vm.redir_links() == {}
    # any other client showing it is refused by the endpoint
    ctx = client_context(old.ca, old.cert, old.key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, writer = await asyncio.open_connection(*ep.address, ssl=ctx, server_hostname="devhost")
        await asyncio.sleep(0.2)
        writer.write(b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"x" * 100)
        await writer.drain()
    assert await wait_for(lambda: ep.state.refusals)
    assert "certificate has expired" in ep.state.refusals[0].reason, ep.state.refusals


#: Refusals of one shape: (the endpoint's certificate, allowed client names,
#: the VM host's QEMU credentials or None for plaintext, what the refusal says)
REFUSALS = {
    # QEMU checks the endpoint's certificate after the handshake and hangs up
    "expired endpoint certificate": ("expired", {"vmhost"}, "vmhost", "hung up right after"),
    # the endpoint shows a certificate for another host (no 127.0.0.1 in it)
    "endpoint for another host name": ("otherhost", {"vmhost"}, "vmhost", "hung up right after"),
    "client name not allowed": (
        "devhost",
        {"vmhost-b"},
        "vmhost",
        "client certificate for vmhost is not allowed",
    ),
    "plaintext client": ("devhost", {"vmhost"}, None, "does not speak TLS"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refused_with_its_reason_and_nothing_attached(
    case: str,
    pki: Pki,
    peer: UsbredirPeer,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    endpoint_cert, allow, client, reason = REFUSALS[case]
    files = {
        "devhost": lambda: pki.devhost,
        "expired": lambda: expired(pki, "devhost-old"),
        "otherhost": lambda: pki.issue("otherhost", addresses=["10.9.8.7"]),
    }[endpoint_cert]()
    ep = await make_endpoint(files, TcpSource("127.0.0.1", peer.port), allow=frozenset(allow))
    vm, _ = await running_vm(qemu, make_vm)
    if client is None:
        spec = _spec(ep, None, insecure=True)
    else:
        spec = _spec(ep, pki.qemu_dir(pki.vmhost, client))
    await _refused(ep, peer, vm, spec)
    assert reason in ep.state.refusals[0].reason, ep.state.refusals


async def test_second_vm_host_is_refused_while_the_first_holds(
    pki: Pki,
    peer: UsbredirPeer,
    qemu: QemuFactory,
    make_vm: Callable[..., QmpVm],
    make_endpoint: Callable[..., Any],
) -> None:
    ep = await make_endpoint(
        pki.devhost, TcpSource("127.0.0.1", peer.port), allow=frozenset({"vmhost", "vmhost-b"})
    )
    first, _ = await running_vm(qemu, make_vm)
    await first.attach(DEV, _spec(ep, pki.qemu_dir(pki.vmhost, "vmhost")))
    assert await wait_for(lambda: ep.state.holder == "vmhost", 15)
    second, _ = await running_vm(qemu, make_vm)
    other = pki.issue("vmhost-b")
    await second.attach(DEV, _spec(ep, pki.qemu_dir(other, "vmhost-b")))
    assert await wait_for(lambda: len(ep.state.refusals) >= 1, 15)
    assert "held by vmhost (first come wins)" in ep.state.refusals[0].reason

    async def second_unlinked() -> bool:
        return await second.redir_links() == {DEV: False}

    # refused after a completed handshake: QEMU's chardev is connected for the
    # moment until the endpoint closes it (and again at each 1 s reconnect)
    assert await wait_for(second_unlinked, 5), await second.redir_links()
    assert (await first.redir_links()) == {DEV: True}
    # the first lets go: the second's reconnect takes it
    await first.detach(DEV)
    assert await wait_for(lambda: ep.state.holder == "vmhost-b", 15)
    assert await wait_for(second.redir_links, 5) == {DEV: True}


async def test_no_certificates_no_link(tmp_path: Path, peer: UsbredirPeer) -> None:
    with pytest.raises(UsageError, match="insecure = true"):
        ExportEndpoint("dev", TcpSource("127.0.0.1", peer.port), host="127.0.0.1", port=0, tls=None)
    spec = UsbRedirSpec("127.0.0.1", 7000, "devhost")
    assert spec.problem() is not None and "insecure = true" in spec.problem()  # type: ignore[operator]
    vm = QmpVm("vm", str(tmp_path / "none.sock"))
    with pytest.raises(VmConfigError, match="needs TLS credentials"):
        await vm.attach(DEV, spec)


@pytest.mark.timeout(180)
async def test_libvirt_redirdev_over_tls_streams_adopts_and_detaches(
    pki: Pki, make_endpoint: Callable[..., Any]
) -> None:
    """libvirt's way, with a real private libvirtd and the QEMU it starts: a
    ``<redirdev type='tcp'>`` with ``tls='yes'`` in the domain XML, the
    credentials from qemu.conf (``chardev_tls_x509_cert_dir``).  It streams
    over mutual TLS; vmplug adopts it by alias and detaches it.  A hot-plug
    of a TLS redirdev is refused (libvirt 9.0 would send it in plaintext)."""
    import json as _json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from tests.support.usbredir_device import UsbredirDevice  # noqa: PLC0415
    from tests.support.vmrig import domain_xml, private_libvirtd  # noqa: PLC0415
    from vmplug.generate.libvirt import qemu_conf_tls_lines, redirdev_element  # noqa: PLC0415

    try:
        from vmplug.vms.libvirt import LibvirtVm, usb_redirdevs  # noqa: PLC0415

        LibvirtVm("probe", "probe")
    except VmConfigError as exc:
        pytest.skip(str(exc))
    device = UsbredirDevice()
    await device.start()
    ep = await make_endpoint(pki.devhost, TcpSource("127.0.0.1", device.port))
    dev_id = "vmplug-remote0002"
    with private_libvirtd("vmplug-lvr-") as lv:
        tls = lv.root / "tls"
        shutil.copytree(pki.qemu_dir(pki.vmhost, "vmhost"), tls)
        conf = lv.root / "config" / "libvirt" / "qemu.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(qemu_conf_tls_lines(str(tls)))
        xml_path = lv.root / "redir.xml"
        element = redirdev_element(dev_id, "127.0.0.1", ep.address[1])
        xml_path.write_text(domain_xml("redir").replace("</devices>", element + "</devices>"))
        for path in [tls, *tls.iterdir(), conf.parent, conf, xml_path]:
            os.chown(path, lv.uid, lv.uid)
        lv.restart()
        lv.virsh("define", str(xml_path))
        lv.virsh("start", "redir")
        assert await wait_for(lambda: device.connects_sent == 1, 30), ep.state.refusals
        assert ep.state.holder == "vmhost" and ep.state.streaming and not ep.state.refusals

        def attached() -> bool:
            cmd = {
                "execute": "qom-get",
                "arguments": {"path": f"/machine/peripheral/ua-{dev_id}", "property": "attached"},
            }
            out = lv.virsh("qemu-monitor-command", "redir", _json.dumps(cmd)).stdout
            return bool(_json.loads(out)["return"])

        assert await wait_for(lambda: asyncio.to_thread(attached), 20)
        vm = LibvirtVm("w", "redir", uri=lv.uri)
        await vm.start()
        try:
            assert await vm.wait_connected(30)
            (red,) = usb_redirdevs(await vm.domain_xml())
            assert (red.host, red.port, red.tls) == ("127.0.0.1", ep.address[1], True)
            seen = await vm.observe()
            assert set(seen) == {dev_id} and seen[dev_id].driver == "usb-redir"
            assert device.connections == 1  # adopted, not re-plugged
            # a hot-plug of another TLS remote device: refused, with the element to use
            other = "vmplug-remote0003"
            with pytest.raises(VmConfigError, match="without its TLS credentials"):
                await vm.attach(
                    other, UsbRedirSpec("127.0.0.1", ep.address[1], "devhost", str(tls))
                )
            assert set(await vm.observe()) == {dev_id}
            await vm.detach(dev_id)
            assert await vm.observe() == {}
            assert await wait_for(lambda: ep.state.holder is None, 15)
        finally:
            await vm.stop()
    await device.stop()
