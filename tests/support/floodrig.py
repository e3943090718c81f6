"""A real ``vmplug run`` under a connection flood, and how fast it still routes a replug.

The daemon is a subprocess (``vmplug run --events replay:FIFO``) over a captured
sysfs tree (:class:`~tests.support.fakekernel.FakeKernel`), with a real QEMU and
its API on a unix socket and on loopback TCP.  The flood is another process
(``python -m tests.support.floodrig flood ...``): it holds event streams and
half-open requests open and keeps opening new connections and sending
over-long request lines until it is stopped.  A replug is timed from the
moment the device's directory is back and its uevents are sent to the moment
QEMU itself holds it (read through the VM's second QMP socket, never from
vmplug's answers).

Used by bench/bench_flood.py and tests/api/test_flood.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.fakekernel import FakeKernel
from tests.support.qemu_proc import QemuProcess
from vmplug.vms.qmp import QmpVm

KBD = "2-2.4.2"
TOKEN = "flood-test-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of process ``pid``."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir()))


class FloodRig:
    """Kernel, one QEMU, a daemon process, and a flood process when asked."""

    def __init__(self, tmp: Path, api: str = "") -> None:
        self.tmp = tmp
        self.kernel = FakeKernel(tmp)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-f", dir="/tmp"))
        self.api_sock = self.sock_dir / "api.sock"
        self.qemu = QemuProcess(tmp, qmp_sockets=2, name="a", sock_dir=self.sock_dir)
        self.port = free_port()
        token_file = tmp / "api-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.config = tmp / "vmplug.toml"
        self.config.write_text(
            f'[vm.a]\nqmp = "{self.qemu.qmp_paths[0]}"\n\n'
            f'[daemon]\nsocket = "{self.api_sock}"\ndatabase = "{tmp / "vmplug.db"}"\n\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\ntoken_file = "{token_file}"\n{api}\n'
            f'[[rule]]\nattach = "a"\nmatch = \'via-port "{KBD}"\'\n'
        )
        self.log = tmp / "daemon.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.flooder: subprocess.Popen[str] | None = None
        self.loop = asyncio.new_event_loop()
        self.observer = QmpVm("obs", str(self.qemu.qmp_paths[1]), shared=True)

    # -- processes ------------------------------------------------------------------

    def start(self) -> None:
        self.qemu.start()
        env = os.environ | {
            "VMPLUG_SYSFS_ROOT": str(self.kernel.root),
            "VMPLUG_CONFIG": str(self.config),
        }
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "vmplug", "run", "--events", f"replay:{self.kernel.fifo}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(self._listening, "the daemon's TCP port", 30)
        self.loop.run_until_complete(self.observer.start())
        self.wait(lambda: KBD in self.held(), "the keyboard in QEMU", 30)

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def _listening(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise AssertionError(f"daemon exited: {self.log.read_text(errors='replace')}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def flood(self, streams: int, half_open: int) -> None:
        """Start the flood process; returns once its standing connections are up."""
        self.flooder = subprocess.Popen(
            [
                sys.executable, "-m", "tests.support.floodrig", "flood",
                str(self.port), str(streams), str(half_open),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.flooder.stdout is not None
        line = self.flooder.stdout.readline()
        if not line.startswith("ready"):
            raise AssertionError(f"the flood did not start: {line!r}")
        self.flood_report = line.strip()

    def stop_flood(self) -> str:
        """Stop the flood (SIGTERM, by PID); its last line says what it did."""
        if self.flooder is None:
            return ""
        self.flooder.send_signal(signal.SIGTERM)
        out, _ = self.flooder.communicate(timeout=30)
        self.flooder = None
        return out.strip().splitlines()[-1] if out.strip() else ""

    def close(self) -> None:
        if self.flooder is not None:
            self.flooder.kill()
            self.flooder.wait(10)
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.observer.stop())
        self.loop.close()
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    self.daemon.wait(20)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(10)
            self.daemon = None
        self.qemu.cleanup()
        self.kernel.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    # -- measuring ------------------------------------------------------------------

    def held(self) -> set[str]:
        try:
            found = self.loop.run_until_complete(self.observer.observe())
        except Exception:
            return set()
        return {f"{o.hostbus}-{o.hostport}" for o in found.values()}

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            time.sleep(0.01)

    def replug(self) -> float:
        """Unplug the keyboard, wait until QEMU lets go, plug it back: seconds until
        QEMU holds it again."""
        self.kernel.unplug(KBD)
        self.wait(lambda: KBD not in self.held(), "the keyboard out of QEMU")
        t0 = time.perf_counter()
        self.kernel.plug(KBD, devnum=None)
        self.wait(lambda: KBD in self.held(), "the keyboard back in QEMU")
        return time.perf_counter() - t0

    def replugs(self, n: int) -> list[float]:
        return [self.replug() for _ in range(n)]


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------
# the flood process


async def _flood(port: int, streams: int, half_open: int) -> None:
    held: list[asyncio.StreamWriter] = []
    stats = {"streams": 0, "half_open": 0, "refused": 0, "churn": 0, "errors": 0}
    sse = (
        f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    half = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    async def one(data: bytes, kind: str) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["errors"] += 1
            return
        writer.write(data)
        held.append(writer)
        try:
            head = await asyncio.wait_for(reader.read(12), 0.5)
        except (TimeoutError, OSError):
            head = b""
        if head.startswith(b"HTTP/1.1 503") or reader.at_eof():
            stats["refused"] += 1
            held.remove(writer)
            writer.close()
        else:
            stats[kind] += 1

    for start in range(0, streams, 100):
        await asyncio.gather(*(one(sse, "streams") for _ in range(min(100, streams - start))))
    for start in range(0, half_open, 100):
        await asyncio.gather(*(one(half, "half_open") for _ in range(min(100, half_open - start))))
    print("ready", " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    long_line = b"GET /?" + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    while not stop.is_set():  # churn: new connections and over-long request lines, nonstop
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(long_line)
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(reader.read(64), 1.0)
            writer.close()
            stats["churn"] += 1
        except OSError:
            stats["errors"] += 1
            await asyncio.sleep(0.01)
    for w in held:
        w.close()
    print("done", " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["flood"]:
        asyncio.run(_flood(int(argv[1]), int(argv[2]), int(argv[3])))
    else:
        raise SystemExit("usage: python -m tests.support.floodrig flood PORT STREAMS HALF_OPEN")


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["KBD", "FloodRig", "median", "proc_figures"]
