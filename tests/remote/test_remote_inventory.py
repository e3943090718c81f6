"""A remote device as a first-class device, end to end, with real processes.

A device host is a real ``vmplug run`` (a captured sysfs tree, uevents
replayed, see :class:`fakekernel.FakeKernel`) with ``[export]`` rules and its
API on mutual TLS; two VM hosts are real ``vmplug run`` processes, each with
a real QEMU, whose ``[host.devhost]`` names only the address, the API port
and the certificates.  All on loopback.

What QEMU really holds is read through a second QMP socket of each VM (never
from vmplug's answers); the device host's view through its API with a VM
host's certificate.  This machine has no USB, so usbredirect on the device
host cannot open the device: the link stops at the device host's endpoint
(QEMU's TLS chardev connected and holding the device, its hello read),
which is what arbitration and the inventory need.  The stream into a real
guest kernel is proven in the lab (tests/remote/test_lab_remote.py).
"""

from __future__ import annotations

import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.remoterig import PORT, RemoteRig
from tests.support.vmplugproc import wait
from vmplug.remote import certs
from vmplug.wire.qmp import SyncQmp

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("usbredirect") is None, reason="usbredirect not installed"),
]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RemoteRig]:
    r = RemoteRig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def _remote(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in devices if d.get("host") == "devhost"]


def test_remote_device_is_attached_arbitrated_and_visible(rig: RemoteRig) -> None:
    # The VM host starts first: its device host is down, so its devices are
    # simply absent, and that is journaled.
    a = rig.vmhost("vmhost-a")
    a.start()
    wait(
        lambda: any(e["kind"] == "remote-host-down" for e in a.json("history", "-n", "200")),
        "remote-host-down journaled",
        a,
    )
    assert rig.redirs("vmhost-a") == {}

    # The device host comes: its rule lets the device go, the VM host learns
    # of it and attaches it as a usb-redir whose TLS chardev connects.
    rig.devhost.start()
    connected = wait(
        lambda: {k: v for k, v in rig.redirs("vmhost-a").items() if v}, "usb-redir connected", a
    )
    [dev_id] = connected
    listing = wait(
        lambda: (x := rig.export_list("vmhost-a"))["devices"][0]["holder"] and x,
        "the device host's endpoint held",
    )
    [row] = listing["devices"]
    assert (row["holder"], row["present"], row["device"]["port"]) == ("vmhost-a", True, PORT)
    assert rig.ports[0] <= row["endpoint_port"] <= rig.ports[1]

    # The VM host's own views name the host: the API/status, list --json, history.
    status = a.json("status")
    [att] = [x for x in status["attachments"] if x["host"] == "devhost"]
    assert (att["qemu_id"], att["vm"], att["state"]) == (dev_id, "guest", "attached")
    assert [h["state"] for h in status["remote_hosts"]] == ["up"]
    shown = a.vmplug("status")
    assert shown.returncode == 0, shown.stderr
    assert "DEVICE HOST" in shown.stdout
    assert "devhost:2-2.4.2" in shown.stdout
    rows = _remote(a.json("list"))
    assert [(r["port"], r["host"], r["vm"], r["qemu_id"]) for r in rows] == [
        (PORT, "devhost", "guest", dev_id)
    ]
    assert rows[0]["identity"].endswith("@devhost")
    only = a.json("list", "--host", "devhost")
    assert [r["qemu_id"] for r in only] == [dev_id]
    human = a.vmplug("list")
    assert human.returncode == 0, human.stderr
    assert "HOST" in human.stdout
    assert "devhost" in human.stdout
    kinds = [e["kind"] for e in a.json("history", "-n", "200")]
    assert "remote-host-up" in kinds
    assert "attach" in kinds

    # A second VM host wanting the same device: the first holder keeps it; the
    # second does not attach it, journals why and shows it.
    b = rig.vmhost("vmhost-b")
    b.start()
    held = wait(lambda: b.json("status")["held"], "vmhost-b sees the device held", b)
    assert [(h["host"], h["holder"], h["vm"]) for h in held] == [("devhost", "vmhost-a", "guest")]
    events = b.json("history", "-n", "200")
    [told] = [e for e in events if e["kind"] == "device-held"]
    assert told["detail"]["reason"] == "held by vmhost-a"
    [brow] = _remote(b.json("list"))
    assert (brow["state"], brow["error"]) == ("held", "held by vmhost-a")
    assert "held by vmhost-a" in b.vmplug("status").stdout
    assert rig.redirs("vmhost-b") == {}
    assert rig.redirs("vmhost-a") == {dev_id: True}

    # The device is unplugged on the device host: the VM host lets the
    # usb-redir go; replugged (a new device number), it is attached again.
    rig.devhost.kernel.unplug(PORT)
    wait(lambda: rig.redirs("vmhost-a") == {}, "usb-redir detached after the unplug", a)
    rig.devhost.kernel.plug(PORT, devnum=77)
    wait(lambda: rig.redirs("vmhost-a") == {dev_id: True}, "usb-redir back after the replug", a)
    # same identity, same endpoint port: the device host kept its endpoint
    again = rig.export_list("vmhost-a")["devices"]
    assert [r["endpoint_port"] for r in again] == [row["endpoint_port"]]


def test_export_list_wants_a_client_certificate_of_the_ca(rig: RemoteRig, tmp_path: Path) -> None:
    rig.devhost.start()
    wait(lambda: rig.export_list("vmhost-a")["devices"], "the export list")
    url = f"https://127.0.0.1:{rig.api_port}/v1/export"
    # no client certificate: the handshake is refused
    bare = ssl.create_default_context(cafile=str(rig.certs["devhost"] / "ca-cert.pem"))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(url, context=bare, timeout=10)
    # a certificate of another CA: refused
    other = tmp_path / "other"
    certs.make_ca(other)
    stranger = certs.issue(other, "vmhost-a", tmp_path / "stranger")
    ctx = ssl.create_default_context(cafile=str(rig.certs["devhost"] / "ca-cert.pem"))
    ctx.load_cert_chain(stranger.cert, stranger.key)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(url, context=ctx, timeout=10)
    # plaintext on the TLS port: no answer
    with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
        urllib.request.urlopen(f"http://127.0.0.1:{rig.api_port}/v1/export", timeout=10)
    # the long poll answers 304 when nothing changed in the wait
    good = rig.client_context("vmhost-a")
    with urllib.request.urlopen(url, context=good, timeout=10) as resp:
        tag = resp.headers["ETag"]
    req = urllib.request.Request(f"{url}?wait=0.5", headers={"If-None-Match": tag})
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, context=good, timeout=10)
    assert info.value.code == 304
    assert time.monotonic() - t0 >= 0.4


def http_errors() -> type[Exception]:
    import http.client  # noqa: PLC0415

    return http.client.HTTPException


def test_a_restarted_vm_gets_its_remote_device_back(rig: RemoteRig) -> None:
    """The VM's QEMU killed -9 and started again (same QMP socket): the old TLS
    link died with it, so the device host's endpoint lets the device go, and
    the VM host attaches it again into the new QEMU; one attach per QEMU."""
    rig.devhost.start()
    a = rig.vmhost("vmhost-a")
    a.start()
    [dev_id] = wait(
        lambda: {k: v for k, v in rig.redirs("vmhost-a").items() if v}, "usb-redir connected", a
    )
    qemu = rig.qemus["vmhost-a"]
    qemu.kill()
    wait(lambda: not rig.export_list("vmhost-a")["devices"][0]["holder"], "the endpoint freed", a)
    qemu.start()
    with SyncQmp(str(qemu.qmp_paths[1])) as q:
        q.execute("cont")
    wait(lambda: rig.redirs("vmhost-a") == {dev_id: True}, "usb-redir in the new QEMU", a)
    [row] = wait(
        lambda: [d for d in rig.export_list("vmhost-a")["devices"] if d["holder"]],
        "the endpoint held again",
    )
    assert row["holder"] == "vmhost-a"
    events = a.json("history", "-n", "500")
    attaches = [e for e in events if e["kind"] == "attach" and e.get("qemu_id") == dev_id]
    assert [e["result"] for e in attaches] == ["ok", "ok"], attaches
