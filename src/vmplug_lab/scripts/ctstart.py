"""Times container start -> USB devices attached in the container's QEMU, with
the guest's one clock.  Runs in the lab guest under the system ``python3 -I -S``
(standard library only: it starts in ~0.1 s).

Usage:
  ctstart.py container ENGINE_SOCK NAME CHECK_SOCK COUNT
      stop the container (if running), wait until its QEMU is gone, then
      POST /containers/NAME/start and poll CHECK_SOCK (a QMP socket of the
      container's QEMU) until COUNT usb-host devices named vmplug-* are
      attached;
  ctstart.py vm CHECK_SOCK COUNT -- QEMU ARGV...
      the same QEMU started directly (no container), timed the same way,
      then killed.
Prints one JSON line: {"dt": seconds or null, "api": seconds the start call
took, "mode": ...}.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TIMEOUT = 60.0


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("engine", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(self.path)
        self.sock = s


def api(sock: str, method: str, path: str) -> tuple[int, Any]:
    conn = UnixHTTP(sock)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body) if body.strip() else None
    except ValueError:
        return resp.status, body.decode("utf-8", "replace")


def attached(check: str) -> int | None:
    """How many vmplug-* usb-host devices are attached; None: QEMU not reachable."""
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5.0)
        s.connect(check)
    except OSError:
        return None
    try:
        f = s.makefile("rwb")

        def ask(cmd: str, **args: Any) -> Any:
            msg: dict[str, Any] = {"execute": cmd}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise OSError("QMP closed")
                r = json.loads(line)
                if "event" not in r:
                    if "error" in r:
                        return None
                    return r["return"]

        f.readline()
        ask("qmp_capabilities")
        n = 0
        for child in ask("qom-list", path="/machine/peripheral") or []:
            name = child.get("name", "")
            if name.startswith("vmplug-") and child.get("type") == "child<usb-host>":
                path = "/machine/peripheral/" + name
                if ask("qom-get", path=path, property="attached") is True:
                    n += 1
        return n
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def wait_count(check: str, count: int, t0: float) -> float | None:
    while time.monotonic() - t0 < TIMEOUT:
        n = attached(check)
        if n is not None and n >= count:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def main() -> None:
    mode = sys.argv[1]
    if mode == "container":
        sock, name, check, count = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        api(sock, "POST", f"/containers/{name}/stop?t=5")
        end = time.monotonic() + TIMEOUT
        while attached(check) is not None and time.monotonic() < end:
            time.sleep(0.05)
        t0 = time.monotonic()
        status, body = api(sock, "POST", f"/containers/{name}/start")
        took = time.monotonic() - t0
        if status not in (204, 304):
            print(json.dumps({"mode": mode, "dt": None, "error": f"HTTP {status}: {body}"}))
            return
        print(json.dumps({"mode": mode, "dt": wait_count(check, count, t0), "api": took}))
    elif mode == "vm":
        check, count = sys.argv[2], int(sys.argv[3])
        argv = sys.argv[sys.argv.index("--") + 1 :]
        if os.path.exists(check):  # noqa: PTH110 - str paths
            os.unlink(check)  # noqa: PTH108
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            dt = wait_count(check, count, t0)
        finally:
            proc.kill()
            proc.wait()
        print(json.dumps({"mode": mode, "dt": dt}))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


main()
