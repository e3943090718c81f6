"""vmplug's own reader of the kernel's uevent netlink socket
(:class:`vmplug.host.events.KernelUevents`), on real sockets: in a network
namespace of its own (``unshare --net``), a veth pair the test makes is a real
burst of kernel uevents, which the socket must read as properties; a message
another process sends to the same multicast group must not pass for the
kernel's; a socket asking for some properties (``only``) gets those messages
alone.  And the wire format parsed as the kernel writes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmplug.host.events import HostEvent, parse_uevent

ROOT = Path(__file__).parents[2]

#: a kernel usb_device "bind" uevent as lib/kobject_uevent.c sends it
USB_BIND = (
    b"bind@/devices/pci0000:00/0000:00:04.0/usb2/2-2/2-2.1\0ACTION=bind\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:04.0/usb2/2-2/2-2.1\0SUBSYSTEM=usb\0"
    b"DEVNAME=bus/usb/002/003\0DEVTYPE=usb_device\0DRIVER=usb\0PRODUCT=627/1/0\0"
    b"TYPE=0/0/0\0BUSNUM=002\0DEVNUM=003\0SEQNUM=1234\0"
)


def test_a_kernel_usb_uevent_is_read_as_the_daemon_reads_it() -> None:
    props = parse_uevent(USB_BIND)
    assert props is not None
    event = HostEvent.from_properties(props)
    assert event == HostEvent(
        action="bind",
        port="2-2.1",
        devpath="/devices/pci0000:00/0000:00:04.0/usb2/2-2/2-2.1",
        busnum=2,
        devnum=3,
        product="627/1/0",
        seqnum=1234,
    )


def test_libudev_messages_and_headerless_data_are_no_kernel_uevents() -> None:
    assert parse_uevent(b"libudev\0\xfe\xed\xca\xfe" + USB_BIND) is None
    assert parse_uevent(b"ACTION=add\0SUBSYSTEM=usb\0") is None


_PROBE = """
import json, os, socket, subprocess, sys, time
from vmplug.host.events import KERNEL_GROUP, NETLINK_KOBJECT_UEVENT, KernelUevents
k = KernelUevents(1 << 20)
# the daemon's kind of filter: only messages carrying these properties are parsed
only = KernelUevents(1 << 20, only=(b"SUBSYSTEM=net", b"INTERFACE=kua0"))
# another process's message on the kernel's group (root may send to it)
fake = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
fake.bind((0, 0))
fake.sendto(bytes.fromhex(sys.argv[1]), (0, KERNEL_GROUP))
subprocess.run(["ip", "link", "add", "kua0", "type", "veth", "peer", "name", "kub0"], check=True)
got, deadline = [], time.monotonic() + 10
while time.monotonic() < deadline and not {"kua0", "kub0"} <= {p.get("INTERFACE") for p in got}:
    props = k.receive()
    if props is None:
        time.sleep(0.02)
    else:
        got.append(props)
time.sleep(0.5)  # the whole burst is in the filtered socket's queue by now
picked = []
while (props := only.receive()) is not None:
    picked.append(props)
print(json.dumps({"fd_is_socket": os.path.exists(f"/proc/self/fd/{k.fileno()}"), "got": got,
                  "picked": picked}))
k.close()
only.close()
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip (a network namespace of its own)",
)
def test_real_kernel_uevents_pass_and_another_senders_do_not() -> None:
    res = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", _PROBE, USB_BIND.hex()],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0 and "unshare failed" in res.stderr:
        pytest.skip(f"no network namespace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fd_is_socket"]
    got = out["got"]
    net_adds = {p.get("INTERFACE") for p in got if p.get("SUBSYSTEM") == "net"}
    assert {"kua0", "kub0"} <= net_adds, got
    assert all(p.get("ACTION") == "add" for p in got if p.get("INTERFACE") in ("kua0", "kub0"))
    assert all(p.get("SEQNUM", "").isdigit() for p in got), got
    assert not any(p.get("SUBSYSTEM") == "usb" for p in got), "a forged uevent passed"
    # the filter: kua0's net uevent passes, the rest of the burst (kub0, their
    # queues) is dropped before it is parsed, and so is the forged message
    assert {p.get("SUBSYSTEM") for p in got} - {"net"}, "the burst had one subsystem only"
    picked = out["picked"]
    assert picked, "the filtered socket dropped the message it asks for"
    assert all(p.get("SUBSYSTEM") == "net" and p.get("INTERFACE") == "kua0" for p in picked)
