"""Polls the VM's usb-host devices over one of its QMP sockets and rewrites
the state file (atomically) whenever what it sees changes.

Runs in the lab guest under the system ``python3 -I -S`` (standard library
only: it starts in ~0.1 s where the venv's Python takes seconds over 9p).
Usage: watcher.py QMP_SOCKET STATE_FILE
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

TYPE_CHECKING = False  # no typing import at run time: the guest starts this fast
if TYPE_CHECKING:
    from io import BufferedIOBase
    from typing import Any

sock_path, out = sys.argv[1], sys.argv[2]
conn = 0
last: dict[str, Any] | None = None


def write(state: dict[str, Any]) -> None:
    global last  # noqa: PLW0603 - a script's one piece of state
    if state == last:
        return
    last = state
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(state, t=time.time()), f)
    os.replace(tmp, out)  # noqa: PTH105 - str paths, as the guest's argv gives them


def ask(f: BufferedIOBase, cmd: str, **args: Any) -> Any:
    msg: dict[str, Any] = {"execute": cmd}
    if args:
        msg["arguments"] = args
    f.write(json.dumps(msg).encode() + b"\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            raise OSError("QMP closed")
        reply = json.loads(line)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            return None


s: socket.socket | None = None
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        f = s.makefile("rwb")
        f.readline()
        ask(f, "qmp_capabilities")
        conn += 1
        while True:
            devs: dict[str, dict[str, Any]] = {}
            for item in ask(f, "qom-list", path="/machine/peripheral") or []:
                if item.get("type") != "child<usb-host>":
                    continue
                path = "/machine/peripheral/" + item["name"]
                devs[item["name"]] = {
                    "attached": bool(ask(f, "qom-get", path=path, property="attached")),
                    "hostbus": ask(f, "qom-get", path=path, property="hostbus"),
                    "hostport": ask(f, "qom-get", path=path, property="hostport"),
                }
            write({"up": True, "conn": conn, "devices": devs})
            time.sleep(0.1)
    except (OSError, ValueError):
        write({"up": False, "conn": conn, "devices": {}})
        with contextlib.suppress(Exception):
            s.close()  # type: ignore[union-attr]  # None: suppressed like any failure
        time.sleep(0.1)
