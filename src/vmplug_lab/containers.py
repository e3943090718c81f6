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
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmplug_lab.demo import WATCHER_NAME, DemoVmState, script
from vmplug_lab.guest import GuestProcess, LabDevice, LabError, LabGuest

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


# ---------------------------------------------------------------------------
# the whole path: engine, compose, container, vmplug, watcher

HUB = LabDevice("usb-hub", "xhci.0", "2", "hub1")
KBD = LabDevice("usb-kbd", "xhci.0", "2.1", "kbd1")
TABLET = LabDevice("usb-tablet", "xhci.0", "2.2", "tablet1")
PORTS = {KBD.id: "2-2.1", TABLET.id: "2-2.2"}
SERVICE = "windows"
CT_ROOT = "/tmp/ct"
PROJECT = f"{CT_ROOT}/proj"
QMP_DIR = f"{PROJECT}/qmp"
CHECK_SOCK = f"{QMP_DIR}/check.sock"
TIMING_SOCK = f"{QMP_DIR}/timing.sock"
VMPLUG = Path(sys.executable).parent / "vmplug"
#: Debian's docker-compose (system Python): without the PYTHONPATH the lab gives
#: the venv's Python (vmplug_lab.pybundle's modules are 3.11.7's, not 3.11.2's).
COMPOSE = "env -u PYTHONPATH /usr/bin/docker-compose"
CTSTART_NAME = "ctstart.py"


class ContainerLab:
    """The lab guest with one engine, the generated compose service, ``vmplug
    run`` (container backend: the VM found through the engine's API) and the
    demo's QOM watcher on a second QMP socket of the container's QEMU.

    Always :meth:`close` it (a ``finally``): it stops the guest by PID.
    """

    def __init__(self, workdir: Path, kind: str) -> None:
        self.workdir = Path(workdir).absolute()
        self.guest = LabGuest([HUB, KBD, TABLET], self.workdir / "lab", memory="1536M")
        self.engine = Engines(self.guest, kind, CT_ROOT)
        self.kind = kind
        self.state_path = self.guest.workdir / "state.json"
        self.daemon: GuestProcess | None = None
        self.watcher: GuestProcess | None = None
        self.daemon_starts = 0
        self.daemon_log_path = self.guest.workdir / "daemon-0.log"
        self.timings: dict[str, float] = {}
        self.generated = ""
        self.snippet = ""
        #: the ``podman run`` argv :meth:`up` last ran (Podman only)
        self.podman_run: list[str] = []

    def _time(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    @property
    def env(self) -> str:
        """docker-compose's environment: the engine, and a read timeout far above
        its default 60 s (Podman's service under TCG took longer for /version)."""
        return f"DOCKER_HOST={self.engine.spec.host} COMPOSE_HTTP_TIMEOUT=600"

    def boot(self) -> None:
        t0 = time.monotonic()
        tarball = build_image_tar(self.guest.workdir / "image.tar")
        self.guest.start()
        self._time("boot", t0)
        g = self.guest
        (g.workdir / WATCHER_NAME).write_text(script(WATCHER_NAME))
        g.wait_for(" && ".join(f"test -e /sys/bus/usb/devices/{p}" for p in PORTS.values()))
        t0 = time.monotonic()
        self.engine.prepare()
        self.engine.start()
        self._time("engine", t0)
        t0 = time.monotonic()
        self.engine.load_image(tarball)
        self._time("import", t0)

    def generate(self) -> str:
        """``vmplug generate compose --by-port`` in the project folder (the two
        devices share 0627:0001); the lab's copy of it written there too."""
        g = self.guest
        gen, err = g.workdir / "generated.yml", g.workdir / "generated.err"
        ports = " ".join(PORTS.values())
        g.run(
            f"mkdir -p {PROJECT} && cd {PROJECT} && {VMPLUG} generate compose --by-port {ports}"
            f" >{gen} 2>{err}",
            timeout=240,
            check=True,
        )
        self.generated, self.snippet = gen.read_text(), err.read_text()
        lab = g.workdir / "docker-compose.yml"
        lab.write_text(lab_compose(self.generated, SERVICE, ("check.sock", "timing.sock")))
        g.run(f"cp {lab} {PROJECT}/docker-compose.yml", check=True)
        return self.generated

    def up(self, recreate: bool = False, timeout: float = 900.0) -> float:
        """Bring the service up as a user of this engine would: Docker by the real
        ``docker-compose`` (``up -d``, ``--force-recreate``); Podman by the
        ``podman run`` flags :func:`vmplug.generate.compose.podman_run_command`
        makes of the same compose file (Podman drops a compose file's
        ``device_cgroup_rules``: :data:`vmplug.generate.compose.PODMAN_NOTE`),
        after ``podman rm -f`` when re-creating.  Seconds it took."""
        if self.kind == "docker":
            return self.compose("up -d --force-recreate" if recreate else "up -d", timeout)
        from vmplug.generate.compose import podman_run_command  # noqa: PLC0415

        text = (self.guest.workdir / "docker-compose.yml").read_text()
        argv = podman_run_command(text, SERVICE, Path(PROJECT))[2:]  # after "podman run"
        self.podman_run = [*self.engine.spec.cli().split(), "run", *argv]
        t0 = time.monotonic()
        cli = self.engine.spec.cli()
        rm = f"{cli} rm -f -t 10 {SERVICE} >/dev/null 2>&1; " if recreate else ""
        # podman run, unlike docker-compose, makes no missing bind source folder
        rm += f"mkdir -p {PROJECT}/qmp {PROJECT}/windows && "
        self.guest.run(
            f"cd {PROJECT} && {rm}{shlex.join(self.podman_run)}", timeout=timeout, check=True
        )
        return time.monotonic() - t0

    def compose(self, args: str, timeout: float = 900.0) -> float:
        t0 = time.monotonic()
        self.guest.run(
            f"cd {PROJECT} && {self.env} {COMPOSE} --no-ansi {args}", timeout=timeout, check=True
        )
        return time.monotonic() - t0

    def cli(self, args: str, timeout: float = 180.0) -> str:
        return self.guest.run(
            f"{self.engine.spec.cli()} {args}", timeout=timeout, check=True
        ).stdout

    def container_id(self) -> str:
        return str(self.engine.inspect(SERVICE).get("Id", ""))

    def config(self) -> str:
        """vmplug's config: the snippet's rules, the VM as a container found
        through the engine's API (``container =``, ``uri =``) on the snippet's bus."""
        rules = [
            ln for ln in self.snippet.splitlines() if ln.startswith(("[[rule]]", "attach", "match"))
        ]
        bus = next(
            (
                ln.split("=", 1)[1].strip()
                for ln in self.snippet.splitlines()
                if ln.startswith("usb_bus")
            ),
            '"vmplug-xhci.0"',
        )
        vm = (
            f'[vm.{SERVICE}]\ncontainer = "{SERVICE}"\nuri = "{self.engine.spec.host}"\n'
            f"usb_bus = {bus}\n\n"
        )
        return vm + "\n".join(rules).replace("[[rule]]", "\n[[rule]]") + "\n"

    def start_watcher(self) -> None:
        self.state_path.unlink(missing_ok=True)
        self.watcher = self.guest.spawn(
            f"/usr/bin/python3 -I -S {self.guest.workdir}/{WATCHER_NAME}"
            f" {CHECK_SOCK} {self.state_path}",
            log=f"{self.guest.workdir}/watcher.log",
        )

    def start_daemon(self, timeout: float = 600.0) -> None:
        self.daemon_starts += 1
        cfg = self.guest.workdir / "vmplug.toml"
        cfg.write_text(self.config())
        self.daemon_log_path = self.guest.workdir / f"daemon-{self.daemon_starts}.log"
        self.daemon = self.guest.spawn(
            f"{VMPLUG} --config {cfg} run --socket {CT_ROOT}/vmplug.sock --db {CT_ROOT}/vmplug.db"
            " --events kernel",
            log=str(self.daemon_log_path),
        )
        self.wait_log(f"vm {SERVICE}: connected", timeout)

    def daemon_log(self) -> str:
        try:
            return self.daemon_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, needle: str, timeout: float, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.daemon_log()[after:]:
            if self.daemon is not None and self.guest.poll(self.daemon) is not None:
                raise LabError(f"vmplug run exited:\n{self.daemon_log()[-3000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"no {needle!r} in the daemon's log in {timeout:g} s")
            time.sleep(0.2)

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.guest.kill(self.daemon, signal.SIGTERM)
            self.daemon = None

    def state(self) -> DemoVmState:
        try:
            raw = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return DemoVmState()
        return DemoVmState(
            bool(raw.get("up")), int(raw.get("conn", 0)), dict(raw.get("devices", {}))
        )

    def expect(
        self, expected: Iterable[str], timeout: float = 60.0, min_conn: int = 0
    ) -> tuple[float | None, DemoVmState]:
        """Seconds until the container's QEMU holds exactly ``expected`` (each
        once, nothing of vmplug's waiting), seen on a watcher connection
        numbered above ``min_conn`` (a QEMU started after the event)."""
        want = sorted(expected)
        t0 = time.monotonic()
        while True:
            st = self.state()
            if st.conn > min_conn and st.holds(want):
                return time.monotonic() - t0, st
            if time.monotonic() - t0 > timeout:
                return None, st
            time.sleep(0.1)

    # ------------------------------------------------------------- timing

    def _ctstart(self, args: str) -> dict[str, Any]:
        tool = self.guest.workdir / CTSTART_NAME
        if not tool.exists():
            tool.write_text(script(CTSTART_NAME))
        res = self.guest.run(f"/usr/bin/python3 -I -S {tool} {args}", timeout=180)
        line = res.stdout.strip().splitlines()[-1:] or ["{}"]
        try:
            rec = json.loads(line[0])
        except ValueError:
            rec = {}
        if not isinstance(rec, dict) or "dt" not in rec:
            raise LabError(f"ctstart {args}: rc={res.rc} {res.stdout} {res.stderr}")
        return rec

    def time_container_start(self) -> dict[str, Any]:
        """Stop the container, then time ``POST /containers/NAME/start`` -> both
        devices attached in its QEMU (guest clock; :file:`scripts/ctstart.py`)."""
        sock = self.engine.spec.socket
        return self._ctstart(f"container {sock} {SERVICE} {TIMING_SOCK} {len(PORTS)}")

    def qemu_argv(self) -> list[str]:
        """The container's QEMU command line, as its entry script printed it."""
        out = self.cli(f"logs {SERVICE}")
        lines = [ln for ln in out.splitlines() if ln.startswith("entry: qemu-system-x86_64 ")]
        if not lines:
            raise LabError(f"no entry: line in the container's log:\n{out[-1000:]}")
        return lines[-1].removeprefix("entry: ").split()

    def time_bare_vm(self, argv: list[str], sockdir: str = f"{CT_ROOT}/bare") -> dict[str, Any]:
        """The same QEMU started directly in the guest (no container), timed the
        same way; the container must be stopped (it holds the devices)."""
        moved = [
            a.replace("unix:/qmp/", f"unix:{sockdir}/").replace("/run/shm/", f"{sockdir}/")
            for a in argv
        ]
        self.guest.run(f"mkdir -p {sockdir}", check=True)
        cmd = " ".join(shlex.quote(a) for a in moved)
        return self._ctstart(f"vm {sockdir}/timing.sock {len(PORTS)} -- {cmd}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for proc in (self.daemon, self.watcher):
                if proc is not None and self.guest.qemu_pid is not None:
                    self.guest.kill(proc, signal.SIGKILL, timeout=5)
            if self.guest.qemu_pid is not None and self.kind == "docker":
                self.guest.run(f"cd {PROJECT} && {self.env} {COMPOSE} kill", timeout=120)
            elif self.guest.qemu_pid is not None:
                self.guest.run(f"{self.engine.spec.cli()} kill -a", timeout=120)
            self.engine.close()
        self.guest.stop()


__all__ = [
    "ENTRY_SCRIPT",
    "IMAGE",
    "ContainerLab",
    "EngineSpec",
    "Engines",
    "build_image_tar",
    "image_files",
    "lab_compose",
    "ldd",
]
