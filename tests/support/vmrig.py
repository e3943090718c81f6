"""Helpers for the VM backend tests: a Docker Engine API document store, a
private libvirtd's handle, the domain the tests define."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.qemu_proc import XHCI, QemuFactory, QemuProcess

DOCKER_FIXTURES = Path(__file__).parent.parent / "fixtures" / "docker"
SYSFS_FIXTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"


def docker_doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCKER_FIXTURES / f"{name}.json").read_text())
    return data


@dataclass
class DockerApiServer:
    """Serves ``GET /containers/{id}/json`` and ``/containers/json`` from ``docs``
    (by name without the leading slash, and by id), as the Docker Engine does."""

    socket: str
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def add(self, doc: dict[str, Any]) -> None:
        self.docs[str(doc["Name"]).lstrip("/")] = doc

    def find(self, ref: str) -> dict[str, Any] | None:
        if ref in self.docs:
            return self.docs[ref]
        for doc in self.docs.values():
            if len(ref) >= 12 and str(doc["Id"]).startswith(ref):
                return doc
        return None


@dataclass
class Libvirt:
    root: Path
    env: dict[str, str]
    uid: int
    proc: subprocess.Popen[str] | None = None

    def launch(self, timeout: float = 30.0) -> None:
        """Start libvirtd (as ``uid``) and wait for its socket."""
        sock = self.root / "run" / "libvirt" / "libvirt-sock"
        with (self.root / "libvirtd.log").open("a") as log:
            self.proc = proc = subprocess.Popen(
                ["libvirtd", "--timeout", "0"],
                env=self.env,
                user=self.uid,
                group=self.uid,
                extra_groups=[],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"libvirtd exited {proc.returncode}: {(self.root / 'libvirtd.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd did not create its socket")
            time.sleep(0.1)

    def restart(self) -> None:
        """Stop libvirtd by PID and start it again (its domains keep running)."""
        if self.proc is not None:
            stop_process(self.proc)
        self.launch()

    @property
    def uri(self) -> str:
        return f"qemu:///session?socket={self.root}/run/libvirt/libvirt-sock"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            env=self.env,
            user=self.uid,
            group=self.uid,
            extra_groups=[],
            timeout=120,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
        return res

    def define(self, name: str, *, start: bool = True) -> None:
        """A TCG q35 domain with a qemu-xhci controller and no OS."""
        path = self.root / f"{name}.xml"
        path.write_text(domain_xml(name))
        os.chown(path, self.uid, self.uid)
        self.virsh("define", str(path))
        if start:
            self.virsh("start", name)

    def qemu_pid(self, name: str) -> int | None:
        pidfile = self.root / "config" / "libvirt" / "qemu" / "run" / f"{name}.pid"
        for candidate in (pidfile, self.root / "run" / "libvirt" / "qemu" / "run" / f"{name}.pid"):
            with contextlib.suppress(OSError, ValueError):
                return int(candidate.read_text().strip())
        return None


def domain_xml(name: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"}</emulator>
    <controller type='usb' model='qemu-xhci'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@contextlib.contextmanager
def private_libvirtd(prefix: str = "vmplug-lv-") -> Iterator[Libvirt]:
    """A libvirtd of the test's own (``qemu:///session`` on a private socket),
    running as nobody when the tests run as root, its state in a fresh
    directory, never /run/libvirt or /etc/libvirt.  At the end its domains are
    destroyed through libvirt (their QEMUs are its children), libvirtd is
    stopped by PID and the directory removed."""
    import pytest  # noqa: PLC0415

    for tool in ("libvirtd", "virsh"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: libvirt-daemon, libvirt-clients)")
    uid = 65534 if os.geteuid() == 0 else os.geteuid()  # nobody, when the tests run as root
    # Not under pytest's tmp_path: its parents are private to root, and nobody
    # must reach this directory.
    root = Path(tempfile.mkdtemp(prefix=prefix))
    for sub in ("home", "run", "config", "cache", "data"):
        (root / sub).mkdir(parents=True)
    (root / "run").chmod(0o700)
    if os.geteuid() == 0:
        root.chmod(0o755)
        for dirpath, _dirs, _files in os.walk(root):
            os.chown(dirpath, uid, uid)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(root / "home"),
        "XDG_RUNTIME_DIR": str(root / "run"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_DATA_HOME": str(root / "data"),
        "LANG": "C.UTF-8",
    }
    lv = Libvirt(root, env, uid)
    try:
        lv.launch()
        yield lv
    finally:
        proc = lv.proc
        if proc is not None and proc.poll() is None:
            for name in lv.virsh("list", "--name", check=False).stdout.split():
                lv.virsh("destroy", name, check=False)
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)


__all__ = [
    "DOCKER_FIXTURES",
    "SYSFS_FIXTURES",
    "XHCI",
    "DockerApiServer",
    "Libvirt",
    "QemuFactory",
    "QemuProcess",
    "docker_doc",
    "domain_xml",
    "private_libvirtd",
    "stop_process",
]
