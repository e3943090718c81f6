"""Times hot-plug in the lab guest with the guest's one clock.

Runs in the guest under the system ``python3 -I -S`` (standard library only).
``watch`` receives the kernel's (and udevd's) uevents on a netlink socket; on
the ``add`` of the device at PORT (the moment it appears in sysfs: the kernel
creates the directory before it announces it) it polls QOM ``attached`` of
the usb-host DEV_ID every 10 ms until it is true, and writes one JSON line:
``dt`` (seconds), the device number, the ``hostaddr`` QEMU holds, and when
the kernel's ``bind`` and udevd's broadcasts arrived.  ``floor`` is a bare
attacher (device_add the instant the ``add`` arrives, the same arguments
vmplug sends; device_del on ``remove``); ``add``/``del``/``find`` run one
command.  A DEV_ID ending in ``*`` names the one usb-host whose id starts so.

Usage: hotplug_tool.py MODE PORT QMP_SOCKET OUT_FILE DEV_ID [DEVICE_ADD_ARGS_JSON]
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time

TYPE_CHECKING = False  # no typing import at run time: the guest starts this fast
if TYPE_CHECKING:
    from typing import Any

NETLINK_KOBJECT_UEVENT = 15


def uevents(groups: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, groups))  # 1: the kernel's uevents, 2: udevd's broadcasts
    return s


def parse(data: bytes) -> tuple[str, dict[str, str]]:
    if data.startswith(b"libudev\0"):  # udevd's header: properties at properties_off
        src, body = "udev", data[int.from_bytes(data[16:20], sys.byteorder) :]
    else:
        src, body = "kernel", data.partition(b"\0")[2]
    props: dict[str, str] = {}
    for item in body.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            props[k.decode()] = v.decode(errors="replace")
    return src, props


class Qmp:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.events: list[dict[str, Any]] = []
        self.ask("qmp_capabilities")

    def ask(self, cmd: str, **args: Any) -> tuple[bool, Any]:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return True, reply["return"]
            if "error" in reply:
                return False, reply["error"].get("desc", "")
            self.events.append(reply)

    def wait_deleted(self, dev_id: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        self.s.settimeout(timeout)
        while time.monotonic() < end:
            if any(
                e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == dev_id
                for e in self.events
            ):
                return True
            line = self.f.readline()
            if not line:
                return False
            self.events.append(json.loads(line))
        return False


def usb_host_args(dev_id: str, busnum: int, devnum: int, port: str) -> dict[str, Any]:
    return {
        "driver": "usb-host",
        "id": dev_id,
        "bus": "xhci.0",
        "hostdevice": f"/dev/bus/usb/{busnum:03d}/{devnum:03d}",
        "hostbus": busnum,
        "hostport": port.partition("-")[2],
        "hostaddr": devnum,
    }


def attached(q: Qmp, dev_id: str) -> bool:
    ok, val = q.ask("qom-get", path="/machine/peripheral/" + dev_id, property="attached")
    return ok and val is True


mode, port, qmp_path, out, dev_id = sys.argv[1:6]
q = Qmp(qmp_path)
log = open(out, "a", buffering=1)  # noqa: SIM115 - open until the process ends


def emit(**kw: Any) -> None:
    print(json.dumps(kw), file=log)


def mine(props: dict[str, str]) -> bool:
    return props.get("DEVTYPE") == "usb_device" and props.get("DEVPATH", "").endswith("/" + port)


if dev_id.endswith("*"):  # the one usb-host whose id has this prefix
    ok, items = q.ask("qom-list", path="/machine/peripheral")
    found = [
        i["name"]
        for i in items or []
        if i.get("type") == "child<usb-host>" and i["name"].startswith(dev_id[:-1])
    ]
    if len(found) != 1:
        emit(error=f"expected one usb-host {dev_id}, found {found}")
        sys.exit(1)
    dev_id = found[0]

if mode == "find":
    emit(id=dev_id, attached=attached(q, dev_id))
    sys.exit(0)
if mode == "del":
    ok, err = q.ask("device_del", id=dev_id)
    emit(deleted=ok and q.wait_deleted(dev_id), err=None if ok else err)
    sys.exit(0)
if mode == "add":
    args = json.loads(sys.argv[6])
    ok, err = q.ask("device_add", id=dev_id, **args)
    emit(added=ok, err=None if ok else err)
    sys.exit(0 if ok else 1)

s = uevents(1 | 2 if mode == "watch" else 1)
emit(ready=mode, id=dev_id, pid=os.getpid())

if mode == "floor":
    while True:
        data = s.recv(65536)
        t = time.monotonic()
        src, props = parse(data)
        if not mine(props):
            continue
        if props.get("ACTION") == "add":
            args = usb_host_args(dev_id, int(props["BUSNUM"]), int(props["DEVNUM"]), port)
            args.pop("id")
            tries = 0
            errors: list[str] = []
            while True:
                tries += 1
                ok, err = q.ask("device_add", id=dev_id, **args)
                if ok:
                    break
                if len(errors) < 3:
                    errors.append(err)
                if tries > 20000:
                    break
            emit(floor_add_s=time.monotonic() - t, ok=ok, tries=tries, errors=errors)
        elif props.get("ACTION") == "remove":
            q.ask("device_del", id=dev_id)


def priority(realtime: bool) -> None:
    # Real-time while waiting for the uevent, so the stamp is taken when it
    # arrives, not when a busy 1-CPU guest gets round to running the watcher
    # (netlink messages carry no kernel timestamp); normal while polling, so
    # the polls do not preempt the attacher they time.
    try:
        if realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass


# watch: one line per replug: add -> attached, and what came in between
while True:
    priority(True)
    data = s.recv(65536)
    t_add = time.monotonic()
    priority(False)
    src, props = parse(data)
    if not mine(props):
        continue
    act = props.get("ACTION")
    if src == "kernel" and act == "remove":
        # wait until the attacher's device is no longer attached (or gone)
        end = t_add + 30
        while attached(q, dev_id) and time.monotonic() < end:
            time.sleep(0.01)
        emit(removed=True, still_attached=attached(q, dev_id))
        continue
    if src != "kernel" or act != "add":
        continue
    marks: dict[str, float] = {}
    polls = 0
    t_att = None
    while True:
        polls += 1
        if attached(q, dev_id):
            t_att = time.monotonic()
            break
        if time.monotonic() - t_add > 30:
            break
        ready, _, _ = select.select([s], [], [], 0.01)
        while ready:
            data = s.recv(65536)
            now = time.monotonic()
            src2, p2 = parse(data)
            if mine(p2):
                marks.setdefault(src2 + "_" + p2.get("ACTION", "?"), now - t_add)
            ready, _, _ = select.select([s], [], [], 0)
    ok, hostaddr = q.ask("qom-get", path="/machine/peripheral/" + dev_id, property="hostaddr")
    emit(
        dt=None if t_att is None else t_att - t_add,
        t_add=t_add,  # the guest's CLOCK_MONOTONIC: to line up with other processes' stamps
        polls=polls,
        devnum=int(props.get("DEVNUM", 0)),
        hostaddr=hostaddr if ok else None,
        marks=marks,
    )
