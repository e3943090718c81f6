"""A throwaway Linux guest with emulated USB devices, for lab tests and demos.

The guest is the host's own Debian kernel booted by virtme-ng under QEMU
(TCG: this machine's ``/dev/kvm`` cannot run a Linux guest) with the host's
root filesystem shared read-only, so ``/work/main/.venv`` and every system
binary are usable inside.  The guest's QEMU gets:

* a QMP socket of its own (``qmp.sock`` in the work directory) to hot-plug
  and unplug emulated USB devices into the running guest;
* a virtio-serial port ``org.qemu.guest_agent.0`` whose host end is a unix
  socket (``qga.sock``).  The boot script run by ``vng --exec`` loads the USB
  modules and then ``exec``s the real ``qemu-ga`` on that port, so the guest
  stays up for as long as we want and every command afterwards goes through
  ``guest-exec``/``guest-exec-status``: exit code, stdout and stderr, a
  timeout, background processes with a PID we can signal;
* ``-pidfile`` so :meth:`LabGuest.stop` kills QEMU by its own PID.

Command execution over qemu-ga was chosen over (a) a file-polling agent on the
9p ``--rwdir`` share (9p caching and polling make it slow and racy, and it
needs its own protocol) and (c) vng's ssh mode (needs sshd keys, networking
and a host-side ssh; more moving parts).  qemu-ga is a packaged,
well-specified agent that later lab tests need anyway.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from vmplug.wire.errors import CommandError, WireError
from vmplug.wire.qga import GuestAgent
from vmplug.wire.qmp import SyncQmp

#: Kernel modules the guest loads before it reports ready (udev would load most
#: of them on its own, but the lab must not depend on timing).  USB bus numbers
#: follow the order the host controllers register, so udev must not load the
#: controller drivers itself (see HCD_MODULES): EHCI first (bus 1), then xHCI
#: (bus 2 for USB 2, bus 3 for USB 3), as in the committed captures.
GUEST_MODULES = (
    "virtio_console",
    "ehci_pci",
    "xhci_pci",
    "usbhid",
    "hid_generic",
    "usb_storage",
    "uas",
    "sd_mod",
    "snd_usb_audio",
)

#: Kept from udev's alias-driven loading with ``modprobe.blacklist`` (which
#: does not stop an explicit ``modprobe NAME``): when udev and the boot script
#: both loaded them, the bus numbers changed from boot to boot.
HCD_MODULES = ("ehci_pci", "xhci_pci")

#: PATH inside the guest: this Python's bin directory (the project's venv, which
#: the guest sees at the same path) first, then the system.
GUEST_PATH = (
    f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

#: Where the guest unpacks :mod:`vmplug_lab.pybundle` (its /tmp is a tmpfs).
GUEST_BUNDLE_DIR = "/tmp/vmplug-python"

#: Seconds a QMP or guest-agent command may take (guest-exec of a busy TCG guest).
WIRE_TIMEOUT = 30.0

_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")
_QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_AUDIODEV_ID = "lab-audio"


class LabError(RuntimeError):
    """The lab guest could not be booted or driven."""


class LabUnavailable(LabError):
    """A prerequisite (kernel, QEMU, virtme-ng) is missing on this machine."""


def find_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest ``/boot/vmlinuz-*`` (by kernel version), readable by us."""
    candidates = [p for p in boot.glob("vmlinuz-*") if p.is_file()]
    if not candidates:
        raise LabUnavailable(
            f"no kernel image in {boot} (vmlinuz-*): "
            "apt-get install linux-image-amd64 (the lab boots the distribution kernel)"
        )

    def version_key(p: Path) -> list[int | str]:
        parts = re.split(r"[.-]", p.name.removeprefix("vmlinuz-"))
        return [int(x) if x.isdigit() else x for x in parts if x]

    newest = max(
        candidates, key=lambda p: [(0, x) if isinstance(x, int) else (1, x) for x in version_key(p)]
    )
    if not os.access(newest, os.R_OK):
        raise LabUnavailable(f"{newest} is not readable by this user (run as root or chmod it)")
    return newest


def find_vng() -> Path:
    """The ``vng`` executable: beside this Python first (the venv), then PATH."""
    here = Path(sys.executable).parent / "vng"
    if here.exists():
        return here
    found = shutil.which("vng")
    if found is None:
        raise LabUnavailable("virtme-ng (vng) not found: pip install 'vmplug[lab]'")
    return Path(found)


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can (for pytest skips)."""
    try:
        find_kernel()
        find_vng()
    except LabUnavailable as exc:
        return str(exc)
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
    if not Path("/usr/sbin/qemu-ga").exists():
        return "qemu-ga not found: apt-get install qemu-guest-agent"
    return None


@dataclass(frozen=True)
class LabDevice:
    """One emulated USB device in the lab guest.

    ``bus`` is a QEMU USB bus (``xhci.0``, ``ehci.0``); ``port`` the QEMU port
    path on it (``"2"``, ``"2.4"``: hub ports are appended with dots).
    ``qemu-xhci`` has QEMU ports 1-4; each is one physical socket wired to
    both a USB 2 and a USB 3 root-hub port.  Linux shows two root hubs, and a
    device lands on the one matching its speed: a SuperSpeed ``usb-storage``
    on QEMU port ``1`` is ``<usb3 bus>-1`` in the guest, a ``usb-kbd`` on the
    same port number would be ``<usb2 bus>-1``.
    ``props`` are extra ``-device`` properties (``serial``…).  A
    ``usb-storage`` without a ``drive`` prop gets a blank sparse image in the
    work directory; a ``usb-audio`` without ``audiodev`` gets a ``none``
    audio backend.
    """

    driver: str
    bus: str
    port: str
    id: str
    props: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not _QEMU_ID.match(self.id):
            raise ValueError(f"invalid QEMU device id {self.id!r}")
        for key, value in self.props.items():
            if "," in value or "," in key or " " in key:
                raise ValueError(f"{self.id}: property {key}={value!r} cannot contain ','")

    @property
    def node_name(self) -> str:
        return f"{self.id}-disk"

    def image_path(self, workdir: Path) -> Path:
        return workdir / f"{self.id}.img"

    def device_props(self) -> dict[str, str]:
        """Every ``-device``/``device_add`` property except the driver."""
        props: dict[str, str] = {"bus": self.bus, "port": self.port, "id": self.id}
        if self.driver == "usb-storage" and "drive" not in self.props:
            props["drive"] = self.node_name
        if self.driver == "usb-audio" and "audiodev" not in self.props:
            props["audiodev"] = _AUDIODEV_ID
        props.update(self.props)
        return props

    def needs_image(self) -> bool:
        return self.driver == "usb-storage" and "drive" not in self.props

    def blockdev(self, workdir: Path) -> dict[str, Any]:
        return {
            "driver": "raw",
            "node-name": self.node_name,
            "file": {"driver": "file", "filename": str(self.image_path(workdir))},
        }

    def qemu_args(self, workdir: Path) -> list[str]:
        args: list[str] = []
        if self.needs_image():
            args += [
                "-blockdev",
                f"driver=raw,node-name={self.node_name},file.driver=file,"
                f"file.filename={self.image_path(workdir)}",
            ]
        props = ",".join(f"{k}={v}" for k, v in self.device_props().items())
        args += ["-device", f"{self.driver},{props}"]
        return args

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "bus": self.bus,
            "port": self.port,
            "id": self.id,
            "props": dict(self.props),
        }


class RunResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


@dataclass
class GuestProcess:
    """A background process started in the guest by :meth:`LabGuest.spawn`."""

    pid: int
    command: str
    log: str  # path inside the guest with its stdout+stderr
    exitcode: int | None = None


_BOOT_SCRIPT = """\
#!/bin/sh
# vmplug lab guest init, run by `vng --exec`; its output goes to the console log.
echo "lab: kernel $(uname -r)"
for m in {modules}; do
    modprobe "$m" || echo "lab: modprobe $m failed"
done
udevadm settle --timeout=30 2>/dev/null || true
port=""
for i in $(seq 1 100); do
    for d in /sys/class/virtio-ports/*; do
        name=$(cat "$d/name" 2>/dev/null)
        if [ "$name" = org.qemu.guest_agent.0 ] && [ -e "/dev/${{d##*/}}" ]; then
            port="/dev/${{d##*/}}"
        fi
    done
    [ -n "$port" ] && break
    sleep 0.1
done
if [ -z "$port" ]; then
    echo "lab: no org.qemu.guest_agent.0 virtio port"; exit 1
fi
if pgrep -x systemd-udevd >/dev/null; then echo "lab: udevd running"; else echo "lab: no udevd"; fi
echo "lab: starting qemu-ga on $port"
mkdir -p /tmp/qga-state
exec /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /tmp/qga-state -f /tmp/qga-state/qga.pid
"""


class LabGuest:
    """A throwaway Linux guest under QEMU/TCG with emulated USB devices.

    Use as a context manager (``with LabGuest(devs, workdir) as g: g.run(...)``)
    or call :meth:`start` and :meth:`stop` (in a ``finally``).  Everything lives
    in ``workdir``: sockets, pidfile, console log, disk images.  ``workdir`` is
    also shared read-write with the guest at the same path (``vng --rwdir``).
    """

    def __init__(
        self,
        devices: Sequence[LabDevice],
        workdir: Path,
        memory: str = "1G",
        extra_qemu_opts: Sequence[str] = (),
        kernel: Path | None = None,
        cpus: int = 1,
        boot_timeout: float = 300.0,
        python_bundle: bool = True,
    ) -> None:
        self.devices: list[LabDevice] = list(devices)
        self.workdir = Path(workdir).absolute()
        if not _SAFE_PATH.match(str(self.workdir)):
            raise ValueError(f"lab workdir {self.workdir} must be a plain path (no spaces, commas)")
        ids = [d.id for d in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate device ids in {ids}")
        self.memory = memory
        self.extra_qemu_opts = tuple(extra_qemu_opts)
        self.kernel = kernel
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.qmp_path = self.workdir / "qmp.sock"
        self.qga_path = self.workdir / "qga.sock"
        self.pidfile = self.workdir / "qemu.pid"
        self.console_log = self.workdir / "console.log"
        self.boot_script = self.workdir / "lab-init.sh"
        self.boot_seconds: float | None = None
        #: Copy vmplug's Python modules into the guest's tmpfs at boot and put
        #: them first on the venv's sys.path (vmplug_lab.pybundle; VMPLUG_LAB_BUNDLE=0: off).
        self.python_bundle = python_bundle and os.environ.get("VMPLUG_LAB_BUNDLE") != "0"
        self.python_path: str | None = None  # the bundle's directory once unpacked
        self._vng: subprocess.Popen[bytes] | None = None
        self._qemu_pid: int | None = None
        self._qmp: SyncQmp | None = None
        self._qga: GuestAgent | None = None

    # ----------------------------------------------------------------- life cycle

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu_pid

    def qemu_args(self) -> list[str]:
        """The options added to the guest's QEMU command line."""
        args = [
            "-pidfile", str(self.pidfile),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=labqga,path={self.qga_path},server=on,wait=off",
            "-device", "virtio-serial-pci,id=labserial",
            "-device", "virtserialport,bus=labserial.0,chardev=labqga,name=org.qemu.guest_agent.0",
            "-audiodev", f"none,id={_AUDIODEV_ID}",
            "-device", "qemu-xhci,id=xhci",
            "-device", "usb-ehci,id=ehci",
        ]  # fmt: skip
        for dev in self.devices:
            args += dev.qemu_args(self.workdir)
        args += list(self.extra_qemu_opts)
        return args

    def vng_command(self) -> list[str]:
        kernel = self.kernel or find_kernel()
        return [
            str(find_vng()),
            "--run", str(kernel),
            "--disable-kvm",
            "--user", "root",
            "--cpus", str(self.cpus),
            "--memory", self.memory,
            "--rwdir", str(self.workdir),
            "--exec", f"sh {self.boot_script}",
            "--append", f"modprobe.blacklist={','.join(HCD_MODULES)}",
            # vng joins --qemu-opts into a shell command line: quote each word.
            f"--qemu-opts={shlex.join(self.qemu_args())}",
        ]  # fmt: skip

    def start(self) -> None:
        if self._vng is not None:
            raise LabError("lab guest already started")
        reason = lab_unavailable_reason()
        if reason and self.kernel is None:
            raise LabUnavailable(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.qmp_path, self.qga_path, self.pidfile):
            stale.unlink(missing_ok=True)
        for dev in self.devices:
            self._make_image(dev)
        self.boot_script.write_text(_BOOT_SCRIPT.format(modules=" ".join(GUEST_MODULES)))
        env = dict(os.environ)
        env["PATH"] = f"{find_vng().parent}:{env.get('PATH', '/usr/bin:/bin')}"
        bundle = self.workdir / "python-bundle.tar"
        builder = None
        if self.python_bundle:  # built on the host while the guest boots
            from vmplug_lab import pybundle  # noqa: PLC0415

            builder = threading.Thread(target=pybundle.build, args=(bundle,), daemon=True)
            builder.start()
        t0 = time.monotonic()
        with self.console_log.open("wb") as log:
            self._vng = subprocess.Popen(
                self.vng_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.workdir,
            )
        try:
            self._wait_boot(t0 + self.boot_timeout)
            if builder is not None:
                builder.join()
                self._install_bundle(bundle)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0

    def _install_bundle(self, bundle: Path) -> None:
        """Unpack the bundle into the guest's tmpfs: one sequential read of the
        share instead of Python's thousands of lookups over it."""
        if not bundle.exists():
            return  # the build failed on the host: the guest imports over the share
        from vmplug_lab import pybundle  # noqa: PLC0415

        site = pybundle.site_pth()
        if site is None:
            return  # no .pth to carry it: the guest imports over the share
        # Only the venv's Python reads its site-packages' .pth files (not PYTHONPATH:
        # a system Python given these modules breaks); the bind mount is the guest's.
        pth = self.workdir / "python-bundle.pth"
        pth.write_text(pybundle.pth_text(site.read_text(), GUEST_BUNDLE_DIR))
        target = GUEST_BUNDLE_DIR
        res = self.run(
            f"rm -rf {target} && mkdir -p {target} && tar -xf {bundle} -C {target}"
            f" && cp {pth} {target}.pth && mount --bind {target}.pth {site}"
        )
        if res.rc == 0:
            self.python_path = target

    def _make_image(self, dev: LabDevice) -> None:
        if dev.needs_image():
            with dev.image_path(self.workdir).open("wb") as img:
                img.truncate(16 * 1024 * 1024)

    def _check_alive(self) -> None:
        if self._vng is not None and self._vng.poll() is not None:
            raise LabError(
                f"lab guest exited early (vng rc={self._vng.returncode}):\n{self.console_tail()}"
            )

    def open_agent(self) -> GuestAgent:
        """A new connection to the guest's agent socket, not yet synced: call
        ``sync()`` before the first command (the agent may not be up yet)."""
        return GuestAgent(self.qga_path, timeout=WIRE_TIMEOUT, sync=False)

    def _wait_boot(self, deadline: float) -> None:
        while not (self.pidfile.exists() and self.qmp_path.exists() and self.qga_path.exists()):
            self._check_alive()
            if time.monotonic() > deadline:
                raise LabError(f"QEMU did not start in time:\n{self.console_tail()}")
            time.sleep(0.1)
        with contextlib.suppress(ValueError, OSError):
            self._qemu_pid = int(self.pidfile.read_text().strip())
        self._qmp = SyncQmp(self.qmp_path, timeout=WIRE_TIMEOUT, name="lab")
        self._qga = self.open_agent()
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"guest agent did not come up in time:\n{self.console_tail()}")
            try:
                self._qga.sync(timeout=min(remaining, 10.0))
                return
            except WireError:
                continue

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the guest: QMP ``quit``, then SIGTERM/SIGKILL to QEMU's PID, then vng's."""
        for client in (self._qga, self._qmp):
            if client is not None:
                with contextlib.suppress(OSError, WireError):
                    if client is self._qmp:
                        self._qmp.execute("quit", timeout=3.0)
                client.close()
        self._qga = self._qmp = None
        pid = self._qemu_pid
        if pid is None:
            with contextlib.suppress(ValueError, OSError):
                pid = int(self.pidfile.read_text().strip())
        if pid is not None and self._vng is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and _is_qemu(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if _wait_pid_gone(pid, 5.0):
                    break
        if self._vng is not None:
            try:
                self._vng.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # vng and its shell are our own session: the group id is vng's PID.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._vng.pid, signal.SIGKILL)
                self._vng.wait(timeout=10)
        self._vng = None
        self._qemu_pid = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------- in the guest

    @property
    def qga(self) -> GuestAgent:
        if self._qga is None:
            raise LabError("lab guest is not running")
        return self._qga

    @property
    def qmp(self) -> SyncQmp:
        if self._qmp is None:
            raise LabError("lab guest is not running")
        return self._qmp

    def _exec(self, cmd: str, capture: bool) -> int:
        # setsid (no fork: qemu-ga's child is not a group leader) makes the guest
        # PID a process-group id, so a timeout or kill() reaches the whole tree.
        ret = self.qga.execute(
            "guest-exec",
            {
                "path": "/usr/bin/setsid",
                "arg": ["/bin/sh", "-c", cmd],
                "env": [f"PATH={GUEST_PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"],
                "capture-output": capture,
            },
        )
        return int(ret["pid"])

    def _status(self, pid: int) -> dict[str, Any]:
        ret = self.qga.execute("guest-exec-status", {"pid": pid})
        if not isinstance(ret, dict):
            raise LabError(f"guest-exec-status: unexpected {ret!r}")
        return ret

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> RunResult:
        """Run ``sh -c cmd`` as root inside the guest; wait for it and return its output.

        Each command runs in its own session; on timeout its whole process group
        is killed (SIGKILL) and :class:`LabError` raised.
        """
        pid = self._exec(cmd, capture=True)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            st = self._status(pid)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(LabError, WireError):
                    self._exec(f"kill -KILL -{pid}", capture=False)
                    reap_deadline = time.monotonic() + 10.0
                    while not self._status(pid).get("exited"):
                        if time.monotonic() > reap_deadline:
                            break
                        time.sleep(0.1)
                raise LabError(f"guest command timed out after {timeout}s: {cmd}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
        err = base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace")
        rc = int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
        result = RunResult(rc, out, err)
        if check and rc != 0:
            raise LabError(f"guest command failed (rc={rc}): {cmd}\n{out}\n{err}")
        return result

    def wait_for(self, cmd: str, timeout: float = 60.0, interval: float = 0.5) -> RunResult:
        """Run ``cmd`` in the guest until it exits 0; LabError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(cmd, timeout=max(deadline - time.monotonic(), 5.0))
            if result.rc == 0:
                return result
            if time.monotonic() > deadline:
                raise LabError(f"condition not met in {timeout}s: {cmd}\n{result}")
            time.sleep(interval)

    def spawn(self, cmd: str, log: str | None = None) -> GuestProcess:
        """Start ``sh -c cmd`` in the background; its output goes to ``log`` in the guest."""
        log = log or f"/tmp/lab-bg-{time.monotonic_ns()}.log"
        pid = self._exec(f"exec >{shlex.quote(log)} 2>&1 </dev/null; exec {cmd}", capture=False)
        return GuestProcess(pid=pid, command=cmd, log=log)

    def poll(self, proc: GuestProcess) -> int | None:
        """The exit status of a background process, or None while it runs."""
        if proc.exitcode is not None:
            return proc.exitcode
        try:
            st = self._status(proc.pid)
        except CommandError:
            return proc.exitcode  # already reaped and reported
        if st.get("exited"):
            proc.exitcode = (
                int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
            )
        return proc.exitcode

    def kill(self, proc: GuestProcess, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal a background process's whole process group, escalating to SIGKILL
        after ``timeout``; return its exit status (128 + signal when killed)."""
        if self.poll(proc) is not None:
            return proc.exitcode or 0
        # dash's kill takes no "--": "-KILL -PID" signals process group PID.
        self.run(f"kill -{int(sig)} -{proc.pid}", timeout=10)
        deadline = time.monotonic() + timeout
        escalated = False
        while self.poll(proc) is None:
            if time.monotonic() > deadline:
                if escalated:
                    raise LabError(f"guest process {proc.pid} survived SIGKILL: {proc.command}")
                self.run(f"kill -KILL -{proc.pid}", timeout=10)
                deadline = time.monotonic() + 10
                escalated = True
            time.sleep(0.1)
        return proc.exitcode or 0

    def read_log(self, proc: GuestProcess) -> str:
        return self.run(f"cat {shlex.quote(proc.log)}").stdout

    # ------------------------------------------------------------- hot-plug

    def hotplug(self, dev: LabDevice) -> None:
        """Plug an emulated USB device into the running guest through its QMP socket."""
        if any(d.id == dev.id for d in self.devices):
            raise ValueError(f"device id {dev.id!r} already in use")
        if dev.needs_image():
            self._make_image(dev)
            self.qmp.execute("blockdev-add", dev.blockdev(self.workdir))
        args: dict[str, Any] = {"driver": dev.driver, **dev.device_props()}
        self.qmp.execute("device_add", args)
        self.devices.append(dev)

    def unplug(self, dev_id: str, timeout: float = 30.0) -> None:
        """Unplug a device by QEMU id and wait for QEMU's ``DEVICE_DELETED``."""
        self.qmp.execute("device_del", {"id": dev_id})
        self.qmp.wait_event("DEVICE_DELETED", timeout, device=dev_id)
        for dev in [d for d in self.devices if d.id == dev_id]:
            self.devices.remove(dev)
            if dev.needs_image():
                with contextlib.suppress(CommandError):
                    self.qmp.execute("blockdev-del", {"node-name": dev.node_name})

    def qemu_version(self) -> str:
        ver = self.qmp.execute("query-version")
        q = ver["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}{ver.get('package', '')}"


def _is_qemu(pid: int) -> bool:
    """Guard against PID reuse: only ever signal a QEMU process."""
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        time.sleep(0.1)
    return False
