"""Run in a network namespace of its own (``unshare --net``): the daemon's real
netlink uevent socket overflowed by the real kernel, and the rescan after it.

The kernel sends the uevents of a network namespace's devices to the uevent
sockets opened in that namespace only, so creating veth pairs here makes a
burst of real uevents (net, queues) that no other process sees.  The daemon
reads devices from a captured sysfs tree (tests/support/fakekernel.py); its
event source is the real ``NetlinkEventSource("kernel")`` with the receive
buffer ``VMPLUG_UEVENT_RCVBUF`` gives.  While its loop is blocked the test
unplugs a device in the tree (a change whose uevent never comes: lost, as in
an overflow) and makes PAIRS veth pairs.  Printed as JSON: ENOBUFS seen, the
journal's overflow/rescan entries, and whether the daemon's inventory is the
tree's.  Usage: ``python -m tests.support.netns_overflow TMP RCVBUF PAIRS``
(RCVBUF 0: the default buffer).

``python -m tests.support.netns_overflow daemon FIFO VMPLUG-ARGS...`` (under
``unshare --net``) is ``vmplug ARGS...`` whose ``run --events replay+kernel``
reads two sources (:class:`ReplayAndNetlink`): the captured tree's uevents
from FIFO, and the real netlink uevent socket of its network namespace, whose
ENOBUFS is the daemon's overflow.  The soak (bench/soak.py) runs its daemon so
and overflows that socket with a burst of veth pairs made in the namespace
(:func:`veth_burst`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vmplug.host.events
from tests.support.fakekernel import FakeKernel
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.history.store import Store
from vmplug.host.events import (
    EventCallback,
    EventSource,
    NetlinkEventSource,
    OverflowCallback,
    ReplayEventSource,
)
from vmplug.host.inventory import read_devices

PORT = "2-2.4.2"


async def run(tmp: Path, rcvbuf: int, pairs: int) -> dict[str, Any]:
    if rcvbuf:
        os.environ[NetlinkEventSource.RECEIVE_BUFFER_ENV] = str(rcvbuf)
    kernel = FakeKernel(tmp, "mixed")
    path = tmp / "vmplug.toml"
    path.write_text("")
    store = Store(tmp / "journal.db")
    source = NetlinkEventSource("kernel")
    d = Daemon(parse_config("", path), sysfs_root=kernel.root, source=source, store=store,
               config_path=path, devnodes=False)  # fmt: skip
    await d.start()
    await asyncio.sleep(0.2)
    mark = max(e.id for e in store.history(None, limit=None))
    present_before = PORT in d.inventory
    # the loop is blocked from here on: nothing reads the socket
    kernel.unplug(PORT)
    t0 = time.monotonic()
    for i in range(pairs):
        subprocess.run(["ip", "link", "add", f"va{i}", "type", "veth", "peer", "name", f"vb{i}"],
                       check=True)  # fmt: skip
    burst_s = time.monotonic() - t0
    for _ in range(40):
        await asyncio.sleep(0.05)
    kinds = [e.kind for e in store.history(None, limit=None) if e.id > mark]
    tree = {x.port: x.devnum for x in read_devices(kernel.root) if not x.is_root_hub}
    mine = {p: x.devnum for p, x in d.inventory.items()}
    await d.stop()
    store.close()
    kernel.close()
    return {
        "rcvbuf": rcvbuf, "pairs": pairs, "burst_s": burst_s, "overflows": source.overflows,
        "overflow_journaled": kinds.count("overflow"), "rescans": kinds.count("rescan"),
        "present_before": present_before, "present_after": PORT in d.inventory,
        "inventory_matches_tree": mine == tree,
    }  # fmt: skip


#: ``--events`` spec of :func:`daemon_main`: the FIFO given on its command line
BOTH = "replay+kernel"


class ReplayAndNetlink:
    """The captured tree's uevents (a FIFO) and the real netlink uevent socket.

    The devices the daemon manages are the captured tree's, so their uevents
    come from :class:`ReplayEventSource`; the netlink socket
    (``NetlinkEventSource("kernel")``, its buffer from ``VMPLUG_UEVENT_RCVBUF``)
    is the daemon's real one, and a real ENOBUFS on it is the daemon's
    overflow.  A real USB uevent on it names no device of the captured tree:
    it is not passed on.
    """

    def __init__(self, fifo: Path) -> None:
        self.replay = ReplayEventSource(fifo)
        self.netlink = NetlinkEventSource("kernel")
        self.description = f"{self.replay.description} + {self.netlink.description}"

    def start(self, on_event: EventCallback, on_overflow: OverflowCallback) -> None:
        self.replay.start(on_event, on_overflow)
        self.netlink.start(lambda _event: None, on_overflow)

    def stop(self) -> None:
        self.netlink.stop()
        self.replay.stop()

    def pause(self) -> None:
        self.replay.pause()
        self.netlink.pause()

    def resume(self) -> None:
        self.replay.resume()
        self.netlink.resume()


def daemon_main(fifo: Path, argv: list[str]) -> int:
    """``vmplug ARGV`` with ``--events replay+kernel`` meaning :class:`ReplayAndNetlink`."""
    from vmplug.cli import main as vmplug_main  # noqa: PLC0415

    plain = vmplug.host.events.make_source

    def make_source(spec: str | None) -> EventSource:
        return ReplayAndNetlink(fifo) if spec == BOTH else plain(spec)

    vmplug.host.events.make_source = make_source
    vmplug_main(argv)
    return 0


def veth_burst(pid: int, pairs: int, batch_dir: Path) -> None:
    """Add and delete ``pairs`` veth pairs in the network namespace of ``pid``:
    a burst of real uevents (net, queues) to every uevent socket opened there."""
    adds, dels = batch_dir / "veth-add.batch", batch_dir / "veth-del.batch"
    adds.write_text("".join(f"link add sv{i} type veth peer name sw{i}\n" for i in range(pairs)))
    dels.write_text("".join(f"link del sv{i}\n" for i in range(pairs)))
    for batch in (adds, dels):
        subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-batch", str(batch)],
                       check=True, capture_output=True, timeout=120)  # fmt: skip


def main() -> int:
    if sys.argv[1] == "daemon":
        return daemon_main(Path(sys.argv[2]), sys.argv[3:])
    tmp, rcvbuf, pairs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(run(tmp, rcvbuf, pairs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
