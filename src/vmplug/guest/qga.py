"""A QEMU guest agent client for the doctor: run programs, read files, see USB devices.

The agent (``qemu-ga``) listens on a virtio-serial port named
``org.qemu.guest_agent.0``; on the host that port is a unix socket
(``-chardev socket,path=…`` + ``-device virtserialport,…``).  The protocol
is QMP-shaped JSON lines without a greeting; ``guest-sync-delimited`` once
per connection discards any stale output (see qemu-ga-ref).

* :meth:`GuestAgent.exec` is ``guest-exec`` + ``guest-exec-status`` polling;
* :meth:`GuestAgent.read_file` is ``guest-file-open``/``-read``/``-close``;
* :func:`linux_usb_devices` walks a Linux guest's ``/sys/bus/usb/devices``
  with file reads only (the agent cannot list directories): root hubs
  ``usbN``, then each hub's ports up to its ``maxchild``, recursively.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AgentError(RuntimeError):
    """The agent did not answer, or answered with an error."""


class AgentCommandError(AgentError):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class GuestAgent:
    """One connection to ``qemu-ga``; use as a context manager."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise
        self._buf = b""
        try:
            self._sync()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ wire

    def _readline(self, deadline: float) -> bytes | None:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AgentError(f"{self.path}: connection closed by the agent")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.replace(b"\xff", b"").strip()

    def _sync(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            tag = secrets.randbelow(2**31)
            req = {"execute": "guest-sync-delimited", "arguments": {"id": tag}}
            self._sock.sendall(b"\xff" + json.dumps(req).encode() + b"\n")
            attempt = min(deadline, time.monotonic() + 2.0)
            while True:
                line = self._readline(attempt)
                if line is None:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("return") == tag:
                    return
        raise AgentError(
            f"{self.path}: no answer from a guest agent in {self.timeout:g} s "
            "(is qemu-ga installed and running in the guest?)"
        )

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            line = self._readline(deadline)
            if line is None:
                raise AgentError(f"guest agent: no answer to {command}")
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise AgentCommandError(command, msg["error"])
            if "return" in msg:
                return msg["return"]

    # ------------------------------------------------------------ commands

    def info(self) -> dict[str, Any]:
        return dict(self.execute("guest-info"))

    def supported(self) -> set[str]:
        return {
            c["name"] for c in self.info().get("supported_commands", []) if c.get("enabled", True)
        }

    def osinfo(self) -> dict[str, Any]:
        try:
            return dict(self.execute("guest-get-osinfo"))
        except AgentCommandError:
            return {}

    def read_file(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """The file's bytes, or None when the guest cannot open it."""
        try:
            handle = self.execute("guest-file-open", {"path": path, "mode": "r"})
        except AgentCommandError:
            return None
        data = b""
        try:
            while len(data) < limit:
                ret = self.execute("guest-file-read", {"handle": handle, "count": 65536})
                data += base64.b64decode(ret.get("buf-b64", ""))
                if ret.get("eof") or not ret.get("count"):
                    break
        except AgentCommandError:
            return data or None
        finally:
            with contextlib.suppress(AgentCommandError):
                self.execute("guest-file-close", {"handle": handle})
        return data

    def read_text(self, path: str) -> str | None:
        data = self.read_file(path)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def exec(self, path: str, args: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a program in the guest and wait: (exit code, stdout, stderr)."""
        ret = self.execute(
            "guest-exec", {"path": path, "arg": args, "capture-output": True}, timeout=timeout
        )
        pid = int(ret["pid"])
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            st = self.execute("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise AgentError(f"guest-exec {path}: still running after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
        err = base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace")
        rc = int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
        return rc, out, err


# ---------------------------------------------------------------- Linux guest USB


@dataclass(frozen=True)
class GuestInterface:
    number: int
    cls: int
    subclass: int
    protocol: int
    driver: str | None


@dataclass(frozen=True)
class GuestUsbDevice:
    port: str
    vendor_id: int
    product_id: int
    device_class: int
    speed: str | None
    product: str | None
    driver: str | None
    interfaces: tuple[GuestInterface, ...] = field(default=())

    @property
    def vidpid(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    @property
    def is_root_hub(self) -> bool:
        return self.port.startswith("usb")

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "id": self.vidpid,
            "class": self.device_class,
            "speed": self.speed,
            "product": self.product,
            "driver": self.driver,
            "interfaces": [
                {"number": i.number, "class": i.cls, "driver": i.driver} for i in self.interfaces
            ],
        }


def _uevent(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def _triple(text: str) -> tuple[int, int, int]:
    """``TYPE=``/``INTERFACE=`` of a uevent: decimal ``class/subclass/protocol``."""
    parts = [int(p, 10) for p in text.split("/")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


SYS_USB = "/sys/bus/usb/devices"


def _read_device(agent: GuestAgent, name: str) -> GuestUsbDevice | None:
    ev = _uevent(agent.read_text(f"{SYS_USB}/{name}/uevent"))
    if ev.get("DEVTYPE") != "usb_device" or "PRODUCT" not in ev:
        return None
    vid, pid, _ = ev["PRODUCT"].split("/")
    cls = _triple(ev.get("TYPE", "0/0/0"))[0]
    ifaces: list[GuestInterface] = []
    cfg = agent.read_text(f"{SYS_USB}/{name}/bConfigurationValue")
    count = agent.read_text(f"{SYS_USB}/{name}/bNumInterfaces")
    # a root hub "usbN" names its interfaces "N-0:C.I"
    iname = f"{name[3:]}-0" if name.startswith("usb") else name
    if cfg and count and count.strip().isdigit():
        for i in range(int(count)):
            iev = _uevent(agent.read_text(f"{SYS_USB}/{iname}:{cfg}.{i}/uevent"))
            if "INTERFACE" in iev:
                c, s, p = _triple(iev["INTERFACE"])
                ifaces.append(GuestInterface(i, c, s, p, iev.get("DRIVER")))
    return GuestUsbDevice(
        port=name,
        vendor_id=int(vid, 16),
        product_id=int(pid, 16),
        device_class=cls,
        speed=agent.read_text(f"{SYS_USB}/{name}/speed"),
        product=agent.read_text(f"{SYS_USB}/{name}/product"),
        driver=ev.get("DRIVER"),
        interfaces=tuple(ifaces),
    )


def linux_usb_devices(agent: GuestAgent, max_bus: int = 16) -> list[GuestUsbDevice]:
    """Every USB device of a Linux guest, root hubs included, by walking hub ports."""
    out: list[GuestUsbDevice] = []

    def walk(hub: str, bus: int) -> None:
        maxchild = agent.read_text(f"{SYS_USB}/{hub}/maxchild")
        if not maxchild or not maxchild.isdigit():
            return
        for port in range(1, int(maxchild) + 1):
            child = f"{bus}-{port}" if hub.startswith("usb") else f"{hub}.{port}"
            dev = _read_device(agent, child)
            if dev is None:
                continue
            out.append(dev)
            if dev.device_class == 9:
                walk(child, bus)

    for bus in range(1, max_bus + 1):
        root = _read_device(agent, f"usb{bus}")
        if root is None:
            continue
        out.append(root)
        walk(f"usb{bus}", bus)
    return out
