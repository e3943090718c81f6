"""Real Docker and Podman inside the lab guest, with a dockurr/windows-like image.

No registry holds an image we may pull here, so :func:`build_image_tar`
makes one from this machine's own files: ``qemu-system-x86_64`` and what
``ldd`` lists for it, Debian's QEMU modules ``accel-tcg-x86_64.so`` and
``hw-usb-host.so`` (QEMU 7.2 will not start TCG or ``usb-host`` without
them) with their libraries, ``/usr/share/qemu`` and ``/usr/share/seabios``
(firmware), a static busybox as ``/bin/sh`` and an ``/etc/passwd``.  Its
entry script (:data:`ENTRY_SCRIPT`) starts QEMU the way the dockurr/windows
entry scripts do: a private HMP monitor on ``/run/shm/monitor.sock``, the
image's ``USB`` variable (default ``qemu-xhci,id=xhci,p2=7,p3=7``, ``no``
for none), ``-qmp $QMP`` when ``QMP`` is set, then ``ARGUMENTS`` appended
and the whole line split on white space, unquoted: ``exec qemu-system-x86_64
${ARGS:+ $ARGS}``.  (No Windows and no KVM: ``-accel tcg`` and no disk; only
the USB side of the image matters here.)

The tarball is written on the host into the lab work directory (shared
with the guest over 9p) and loaded in the guest by ``docker import`` /
``podman import``.

:class:`Engines` starts ``dockerd`` (which runs its own ``containerd``) or
``podman system service`` in the guest, with every bit of state on the
guest's ``/tmp`` (a tmpfs: the guest's root is this machine's, read-only),
no iptables and no bridge, and stops them by PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmplug_lab.guest import GuestProcess, LabError, LabGuest

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"
#: QEMU's modules the image needs: TCG itself and usb-host (built as modules on Debian).
QEMU_MODULES = ("accel-tcg-x86_64.so", "hw-usb-host.so")
SHARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios")
BUSYBOX = "/bin/busybox"
IMAGE = "vmplug-lab/windows:latest"
APPARMOR_FLAG = "/sys/module/apparmor/parameters/enabled"
#: Debian's own clients (``/usr/local/bin`` may hold another docker CLI).
DOCKER_CLI = "/usr/bin/docker"
#: The image's private HMP monitor (dockurr/windows: ``/run/shm/monitor.sock``).
IMAGE_MONITOR = "/run/shm/monitor.sock"

#: The image's entry point, after dockurr/windows' ``entry.sh`` + ``config.sh``:
#: options collected in ARGS, ``ARGUMENTS`` last, white space squeezed, then
#: expanded unquoted.  busybox ``sh`` instead of bash; the Windows parts left out.
ENTRY_SCRIPT = """\
#!/bin/sh
# vmplug lab: a dockurr/windows-like entry point (QEMU only, no Windows).
set -eu
: "${RAM_SIZE:=64M}"
: "${USB:=}"
case "$(echo "$USB" | tr A-Z a-z)" in
  ""|y|yes|1|on|true|enabled) USB="qemu-xhci,id=xhci,p2=7,p3=7" ;;
esac
USB_OPTS=""
case "$(echo "$USB" | tr A-Z a-z)" in
  n|no|0|off|false|disabled|none) ;;
  *) USB_OPTS="-device $USB" ;;
esac
mkdir -p /run/shm
MON_OPTS="-monitor unix:/run/shm/monitor.sock,server,nowait"
QMP_OPTS=""
[ -n "${QMP:-}" ] && QMP_OPTS="-qmp $QMP"
DEF_OPTS="-nodefaults -display none -machine q35 -accel tcg -m $RAM_SIZE -name windows"
ARGS="$DEF_OPTS $MON_OPTS $QMP_OPTS $USB_OPTS ${ARGUMENTS:-}"
ARGS=$(echo "$ARGS" | sed 's/\\t/ /g' | tr -s ' ')
echo "entry: qemu-system-x86_64 $ARGS"
exec qemu-system-x86_64 ${ARGS:+ $ARGS}
"""


def ldd(path: str) -> list[str]:
    """The shared libraries ``ldd`` names for ``path`` (absolute paths, loader included)."""
    try:
        out = subprocess.run(
            ["ldd", path], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(f"ldd {path} failed: {exc}") from exc
    libs: list[str] = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def image_files() -> list[str]:
    """Every host file the image holds (binaries, libraries, modules), absolute."""
    modules = [f"{QEMU_MODULE_DIR}/{m}" for m in QEMU_MODULES]
    missing = [p for p in (QEMU_BINARY, BUSYBOX, *modules) if not Path(p).exists()]
    if missing:
        raise LabError(
            f"cannot build the lab image: missing {', '.join(missing)} "
            "(apt-get install qemu-system-x86 busybox-static)"
        )
    files = [QEMU_BINARY, *modules]
    for binary in (QEMU_BINARY, *modules):
        files += ldd(binary)
    return list(dict.fromkeys(files))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _add_text(tar: tarfile.TarFile, name: str, text: str, mode: int = 0o644) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def _parents(paths: Iterable[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        parent = Path(p).parent
        while str(parent) not in ("/", "."):
            dirs.add(str(parent).lstrip("/"))
            parent = parent.parent
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def build_image_tar(dest: Path) -> Path:
    """Write the image's root file system as a tarball at ``dest``; return it.

    Files are stored dereferenced (a library's symlink becomes the file), the
    share directories as they are (their firmware symlinks are relative).
    The usr-merged layout (``/lib`` -> ``usr/lib``) is kept as symlinks.
    """
    files = image_files()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with tarfile.open(tmp, "w") as tar:
        for top in ("usr", "usr/bin", "usr/lib", "usr/lib64", "usr/share", "etc", "run"):
            _add_dir(tar, top)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            _add_symlink(tar, link, target)
        for d in ("tmp", "run/shm", "qmp", "storage", "proc", "sys", "dev"):
            _add_dir(tar, d, 0o1777 if d in ("tmp", "run/shm") else 0o755)
        real = [_usr(f) for f in files]
        for d in _parents(real):
            if d not in ("usr", "usr/bin", "usr/lib", "usr/lib64", "usr/share"):
                _add_dir(tar, d)
        for src, name in zip(files, real, strict=True):
            tar.add(os.path.realpath(src), arcname=name.lstrip("/"), recursive=False)
        for share in SHARE_DIRS:
            tar.add(share, arcname=share.lstrip("/"))
        tar.add(os.path.realpath(BUSYBOX), arcname="usr/bin/busybox")
        for applet in ("sh", "echo", "tr", "sed", "mkdir", "cat", "ls", "sleep"):
            _add_symlink(tar, f"usr/bin/{applet}", "busybox")
        _add_text(tar, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        _add_text(tar, "etc/group", "root:x:0:\n")
        _add_text(tar, "run/entry.sh", ENTRY_SCRIPT, 0o755)
    tmp.replace(dest)
    return dest


def _usr(path: str) -> str:
    """``/lib/...`` as ``/usr/lib/...`` (the image is usr-merged like Debian 12)."""
    for top in ("/lib64/", "/lib/", "/bin/", "/sbin/"):
        if path.startswith(top):
            return "/usr" + path
    return path


#: ``docker import --change``: the image runs its entry script.
IMPORT_CHANGES = ('ENTRYPOINT ["/run/entry.sh"]',)


# ---------------------------------------------------------------------------
# engines in the guest


@dataclass(frozen=True)
class EngineSpec:
    """One engine's command lines and sockets in the guest, all under ``root``."""

    kind: str  # "docker" or "podman"
    root: str

    @property
    def socket(self) -> str:
        return f"{self.root}/{self.kind}.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def containerd_socket(self) -> str:
        return f"{self.root}/containerd.sock"

    def containerd_command(self) -> str:
        t = self.root
        sock = self.containerd_socket
        return f"containerd --root {t}/containerd --state {t}/cstate --address {sock}"

    def daemon_command(self) -> str:
        """The issue's flags.  dockerd is given a containerd we start ourselves:
        the one it starts on its own took longer than its start-up timeout
        under TCG on a loaded machine ("timeout waiting for containerd")."""
        t = self.root
        if self.kind == "docker":
            return (
                f"dockerd --containerd {self.containerd_socket}"
                f" --data-root {t}/docker --exec-root {t}/dexec -H {self.host}"
                f" --pidfile {t}/docker.pid"
                " --iptables=false --ip-masq=false --bridge=none --storage-driver=overlay2"
                " --exec-opt native.cgroupdriver=cgroupfs"
            )
        return f"{self.podman_base()} system service --time=0 {self.host}"

    def podman_base(self) -> str:
        t = self.root
        return (
            f"podman --root {t}/ps --runroot {t}/pr --tmpdir {t}/pt"
            " --cgroup-manager=cgroupfs --events-backend=file"
        )

    def cli(self) -> str:
        """The engine's CLI, pointed at this engine."""
        if self.kind == "docker":
            return f"{DOCKER_CLI} -H {self.host}"
        return self.podman_base()

    def curl(self, method: str, path: str) -> str:
        """A shell command for one unversioned API call (curl is fast to start here)."""
        return f"curl -sf --unix-socket {self.socket} -X {method} http://engine{path}"


class Engines:
    """Start and stop one engine's daemon inside the lab guest, by PID."""

    def __init__(self, guest: LabGuest, kind: str, root: str = "/tmp/ct") -> None:
        if kind not in ("docker", "podman"):
            raise ValueError(f"engine {kind!r}: docker or podman")
        self.guest = guest
        self.spec = EngineSpec(kind, root)
        self.proc: GuestProcess | None = None
        self.containerd: GuestProcess | None = None
        self.starts = 0

    def prepare(self) -> None:
        """A tmpfs for the engine's state (the guest's /tmp is an overlay, which
        overlay2 cannot use as its upper layer), cgroup v2, and AppArmor shown as
        off: the guest kernel has it enabled but this machine has no
        ``apparmor_parser`` to load the engines' default profiles (as booting
        with ``apparmor=0`` would; the engines read the flag at start)."""
        g, t = self.guest, self.spec.root
        g.run(
            f"mkdir -p {t} && (mountpoint -q {t} || mount -t tmpfs -o size=1g,mode=755 ct {t})"
            " && (mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup)"
            f" && echo N > {t}/apparmor-off"
            f" && (grep -q N {APPARMOR_FLAG} || mount --bind {t}/apparmor-off {APPARMOR_FLAG})",
            check=True,
        )

    def _wait_socket(self, proc: GuestProcess, probe: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        script = (
            f"for i in $(seq {int(timeout * 2)}); do {probe} >/dev/null 2>&1 && exit 0;"
            " sleep 0.5; done; exit 1"
        )
        while self.guest.run(script, timeout=timeout + 30).rc != 0:
            if self.guest.poll(proc) is not None:
                raise LabError(f"{what} exited:\n{self.guest.read_log(proc)[-3000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{what} did not answer in {timeout:g} s")

    def start(self, timeout: float = 180.0) -> float:
        """Start the daemon (and for Docker its containerd, once); seconds until
        its API answered ``/_ping``."""
        self.starts += 1
        t0 = time.monotonic()
        g, spec, wd = self.guest, self.spec, self.guest.workdir
        if spec.kind == "docker" and (
            self.containerd is None or g.poll(self.containerd) is not None
        ):
            g.run(f"rm -f {spec.containerd_socket}", check=True)
            self.containerd = g.spawn(spec.containerd_command(), log=f"{wd}/containerd.log")
            self._wait_socket(
                self.containerd, f"test -S {spec.containerd_socket}", "containerd", timeout
            )
        g.run(f"rm -f {spec.socket}", check=True)
        self.proc = g.spawn(spec.daemon_command(), log=f"{wd}/{spec.kind}d-{self.starts}.log")
        self._wait_socket(self.proc, spec.curl("GET", "/_ping"), f"{spec.kind} service", timeout)
        return time.monotonic() - t0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (SIGKILL: an engine crash; containerd stays)."""
        if self.proc is not None:
            self.guest.kill(self.proc, sig, timeout=20)
            self.proc = None

    def close(self) -> None:
        for proc in (self.proc, self.containerd):
            if proc is not None:
                with contextlib.suppress(Exception):
                    self.guest.kill(proc, signal.SIGKILL, timeout=10)
        self.proc = self.containerd = None

    def load_image(self, tarball: Path, image: str = IMAGE) -> None:
        changes = " ".join(f"--change {shlex.quote(c)}" for c in IMPORT_CHANGES)
        self.guest.run(
            f"{self.spec.cli()} import {changes} {shlex.quote(str(tarball))} {image}",
            timeout=300,
            check=True,
        )

    def inspect(self, name: str) -> dict[str, Any]:
        """The engine's own inspect document (``GET /containers/NAME/json``)."""
        res = self.guest.run(self.spec.curl("GET", f"/containers/{name}/json"), timeout=120)
        if res.rc != 0:
            raise LabError(f"inspect {name}: curl rc={res.rc} {res.stderr}")
        doc = json.loads(res.stdout)
        if not isinstance(doc, dict):
            raise LabError(f"inspect {name}: not a document")
        return doc


# ---------------------------------------------------------------------------
# the compose file, made fit for the lab


def lab_compose(text: str, service: str = "windows", extra_qmp: Iterable[str] = ()) -> str:
    """The compose file ``vmplug generate compose`` wrote, changed only where the
    lab guest differs from a Windows host: our image instead of
    ``dockurr/windows``, no ``/dev/kvm`` or ``/dev/net/tun`` (TCG, no network:
    ``network_mode: none``, no ports, no NET_ADMIN), and more QMP sockets in
    the ``/qmp`` folder for the test's own watchers (one client per socket).
    Everything vmplug wrote (the USB bind mount, the cgroup rule, ARGUMENTS
    with its controller, usb-host devices and QMP socket) stays as written."""
    from ruamel.yaml import YAML  # noqa: PLC0415

    yaml = YAML()
    yaml.width = 1 << 16
    doc = yaml.load(text)
    svc = doc["services"][service]
    svc["image"] = IMAGE
    svc["network_mode"] = "none"
    for key in ("ports", "cap_add"):
        svc.pop(key, None)
    devices = [d for d in svc.get("devices") or [] if str(d) not in ("/dev/kvm", "/dev/net/tun")]
    if devices:
        svc["devices"] = devices
    else:
        svc.pop("devices", None)
    env = svc["environment"]
    extra = " ".join(f"-qmp unix:/qmp/{name},server=on,wait=off" for name in extra_qmp)
    if extra:
        env["ARGUMENTS"] = f"{env['ARGUMENTS']} {extra}"
    env["RAM_SIZE"] = "64M"
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


__all__ = [
    "ENTRY_SCRIPT",
    "IMAGE",
    "EngineSpec",
    "Engines",
    "build_image_tar",
    "image_files",
    "lab_compose",
    "ldd",
]
