"""`vmplug generate libvirt`: libvirt's own schema (virt-xml-validate) and a real
libvirtd that defines (and, without the hostdevs this host cannot have, starts) it."""

from __future__ import annotations

import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.devices import AUDIO, HUB, KEYLAB, SERIAL_A, SERIAL_B
from tests.support.vmrig import Libvirt
from vmplug.generate import libvirt
from vmplug.generate.common import CannotExpress

from .conftest import Qmp

NS = {"qemu": libvirt.QEMU_NS}


def _fragment_in_domain(fragment: str, name: str = "vmplug-frag") -> str:
    """Paste a fragment into a minimal domain the way a user does with `virsh edit`."""
    wrapped = ET.fromstring(f"<fragment>{fragment}</fragment>")
    dom = ET.fromstring(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        "<devices><controller type='usb' model='qemu-xhci'/></devices></domain>"
    )
    devices = dom.find("devices")
    assert devices is not None
    for el in wrapped:
        if el.tag == "hostdev":
            devices.append(el)
        else:
            dom.append(el)
    ET.register_namespace("qemu", libvirt.QEMU_NS)
    return ET.tostring(dom, encoding="unicode")


def virt_xml_validate(path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        pytest.skip("virt-xml-validate is not installed (Debian: libvirt-clients)")
    if shutil.which("xmllint") is None:
        pytest.skip(
            "virt-xml-validate needs xmllint, which is not installed (Debian: libxml2-utils)"
        )
    res = subprocess.run(
        [tool, str(path), "domain"], capture_output=True, text=True, check=False, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_golden(golden: Callable[[str, str], None]) -> None:
    plan = libvirt.plan_libvirt([AUDIO, KEYLAB], qmp="/var/lib/vmplug/win.qmp")
    golden("libvirt-fragment.xml", libvirt.render_fragment(plan))
    golden("libvirt-domain.xml", libvirt.render_domain(plan, "vmplug-demo"))
    by_addr = libvirt.plan_libvirt([SERIAL_A, SERIAL_B], by_address=True)
    golden("libvirt-by-address.xml", libvirt.render_fragment(by_addr))


def test_shape() -> None:
    plan = libvirt.plan_libvirt([AUDIO])
    frag = ET.fromstring(f"<f>{libvirt.render_fragment(plan)}</f>")
    (hostdev,) = frag.findall("hostdev")
    assert hostdev.attrib == {"mode": "subsystem", "type": "usb", "managed": "yes"}
    src = hostdev.find("source")
    assert src is not None and src.get("startupPolicy") == "optional"
    assert src.find("vendor").get("id") == "0x46f4"  # type: ignore[union-attr]
    assert src.find("product").get("id") == "0x0002"  # type: ignore[union-attr]
    assert src.find("address") is None  # only with --by-address
    assert frag.find("qemu:commandline", NS) is None


def test_errors() -> None:
    with pytest.raises(CannotExpress, match="--by-address"):
        libvirt.plan_libvirt([SERIAL_A, SERIAL_B])
    with pytest.raises(CannotExpress, match="hub"):
        libvirt.plan_libvirt([HUB])


@pytest.mark.parametrize("qmp", [None, "/tmp/vm.qmp"])
def test_virt_xml_validate(tmp_path: Path, qmp: str | None) -> None:
    plan = libvirt.plan_libvirt([AUDIO, KEYLAB], qmp=qmp)
    full = tmp_path / "domain.xml"
    full.write_text(libvirt.render_domain(plan, "vmplug-test"))
    virt_xml_validate(full)
    pasted = tmp_path / "pasted.xml"
    pasted.write_text(_fragment_in_domain(libvirt.render_fragment(plan)))
    virt_xml_validate(pasted)
    by_addr = tmp_path / "by-address.xml"
    plan2 = libvirt.plan_libvirt([SERIAL_A, SERIAL_B], by_address=True)
    by_addr.write_text(libvirt.render_domain(plan2, "vmplug-test2"))
    virt_xml_validate(by_addr)


def test_virsh_define_and_start(libvirtd: Libvirt) -> None:
    qmp_sock = libvirtd.root / "home" / "vmplug, own.qmp"
    plan = libvirt.plan_libvirt([AUDIO, KEYLAB], qmp=str(qmp_sock))
    xml_path = libvirtd.root / "home" / "domain.xml"
    xml_path.write_text(libvirt.render_domain(plan, "vmplug-define"))
    libvirtd.virsh("define", str(xml_path))
    dumped = ET.fromstring(libvirtd.virsh("dumpxml", "vmplug-define").stdout)
    hostdevs = dumped.findall("devices/hostdev")
    assert len(hostdevs) == 2
    for el, want in zip(hostdevs, ("0x46f4", "0x1c75"), strict=True):
        assert el.get("managed") == "yes"
        assert el.find("source").get("startupPolicy") == "optional"  # type: ignore[union-attr]
        assert el.find("source/vendor").get("id") == want  # type: ignore[union-attr]
        assert el.find("source/address") is None
    args = [a.get("value") for a in dumped.findall("qemu:commandline/qemu:arg", NS)]
    assert args == ["-qmp", f"unix:{str(qmp_sock).replace(',', ',,')},server=on,wait=off"]

    # The fragment pasted into an existing domain defines too.
    frag_path = libvirtd.root / "home" / "pasted.xml"
    frag_path.write_text(_fragment_in_domain(libvirt.render_fragment(plan), "vmplug-pasted"))
    libvirtd.virsh("define", str(frag_path))
    pasted = ET.fromstring(libvirtd.virsh("dumpxml", "vmplug-pasted").stdout)
    assert len(pasted.findall("devices/hostdev")) == 2
    assert len(pasted.findall("qemu:commandline/qemu:arg", NS)) == 2

    # Start it.  This host's kernel has no USB at all (libvirt cannot even list
    # /sys/bus/usb), so the hostdevs come out; the QMP socket is what is proven.
    for el in dumped.findall("devices/hostdev"):
        dumped.find("devices").remove(el)  # type: ignore[union-attr]
    ET.register_namespace("qemu", libvirt.QEMU_NS)
    run_path = libvirtd.root / "home" / "run.xml"
    run_path.write_text(ET.tostring(dumped, encoding="unicode"))
    libvirtd.virsh("define", str(run_path))
    libvirtd.virsh("start", "vmplug-define")
    try:
        deadline = time.monotonic() + 30
        while not qmp_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        qmp = Qmp(qmp_sock)
        assert qmp.cmd("query-status")["status"] in ("running", "paused", "prelaunch")
        peripherals = {p["name"] for p in qmp.cmd("qom-list", path="/machine/peripheral")}
        assert "usb" in peripherals  # libvirt's own qemu-xhci controller
        qmp.close()
    finally:
        libvirtd.virsh("destroy", "vmplug-define", check=False)
