"""``vmplug demo``: the daemon keeping USB devices in a VM, live, on any machine.

Everything happens inside the lab guest (:mod:`vmplug_lab`): a Linux kernel
under QEMU/TCG with an emulated hub, keyboard and tablet.  Inside it run

* a second QEMU, the "VM" (no disk: only its USB controller matters),
  with two QMP sockets: ``vm.sock`` for vmplug, ``check.sock`` for us;
* ``vmplug run`` with a config whose one rule sends ``0627:0001`` (both the
  keyboard and the tablet) to that VM;
* a tiny watcher (system ``python3 -I -S``, no imports beyond the standard
  library: it starts in ~0.1 s where the venv's Python takes seconds over 9p)
  that polls the VM's QOM through ``check.sock`` every 0.1 s and writes what
  the VM really holds to ``state.json`` in the shared work directory.

From the host we unplug and replug the keyboard (the guest QEMU's QMP), kill
``-9`` and restart the VM, restart the daemon, and time how long the VM takes
to hold again what it should.  The same steps (:class:`DemoLab`) drive
``tests/lab/test_lab_daemon.py``; :func:`run_demo` is what the ``vmplug demo``
command (a click shim in vmplug, which imports this package only when run)
calls.
"""

from __future__ import annotations

import contextlib
import json
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

from vmplug_lab.guest import GuestProcess, LabDevice, LabError, LabGuest, lab_unavailable_reason

#: Where the sockets live inside the guest (/tmp is a tmpfs there; unix sockets
#: on the 9p work directory would not work).
GUEST_DIR = "/tmp/vmplug-demo"
VM_NAME = "demo"

HUB = LabDevice("usb-hub", "xhci.0", "2", "hub1")
KBD = LabDevice("usb-kbd", "xhci.0", "2.1", "kbd1")
TABLET = LabDevice("usb-tablet", "xhci.0", "2.2", "tablet1")
DEVICES = (HUB, KBD, TABLET)
#: Guest kernel port paths (EHCI is bus 1, xHCI's USB 2 root hub bus 2).
PORTS = {KBD.id: "2-2.1", TABLET.id: "2-2.2"}

CONFIG = f"""\
[vm.{VM_NAME}]
qmp = "{GUEST_DIR}/vm.sock"

[[rule]]
attach = "{VM_NAME}"
match = 'id 0627:0001'
"""

VM_COMMAND = (
    # No -S: QEMU's usb-host only grabs host devices while the VM runs
    # (usb_host_auto_check skips its scan when the run state is not running);
    # with no disk the firmware just waits for a bootable device.
    "qemu-system-x86_64 -machine q35 -nodefaults -display none -accel tcg -m 64"
    " -device qemu-xhci,id=xhci"
    f" -qmp unix:{GUEST_DIR}/vm.sock,server=on,wait=off"
    f" -qmp unix:{GUEST_DIR}/check.sock,server=on,wait=off"
    f" -qmp unix:{GUEST_DIR}/timing.sock,server=on,wait=off"
)


def _env_prefix(env: Mapping[str, str] | None) -> str:
    """``env K=V ... `` for a guest command, or nothing."""
    if not env:
        return ""
    return "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "


#: where :meth:`DemoLab.unpack_revision` puts another revision's package (the guest's tmpfs)
REVISION_DIR = "/tmp/vmplug-revision"
#: A third QMP socket of the VM, for the hot-plug timing tool (one client per socket).
TIMING_SOCK = f"{GUEST_DIR}/timing.sock"

#: The programs the guest runs with its system ``python3 -I -S`` (standard
#: library only), shipped as package data in ``vmplug_lab/scripts/``:
#: ``watcher.py`` polls the VM's usb-host devices and rewrites ``state.json``;
#: ``hotplug_tool.py`` times hot-plug with the guest's one clock (see each
#: file's docstring).
WATCHER_NAME = "watcher.py"
HOTPLUG_TOOL_NAME = "hotplug_tool.py"


def script(name: str) -> str:
    """The text of one of the guest's scripts (``watcher.py``, ``hotplug_tool.py``)."""
    return (resources.files("vmplug_lab") / "scripts" / name).read_text(encoding="utf-8")


@dataclass
class DemoVmState:
    """What the VM holds, as the watcher last saw it."""

    up: bool = False
    conn: int = 0
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ports(self, attached: bool = True) -> list[str]:
        """Guest port paths of vmplug's usb-host devices (sorted; duplicates kept)."""
        return sorted(
            f"{d.get('hostbus')}-{d.get('hostport')}"
            for name, d in self.devices.items()
            if name.startswith("vmplug-") and bool(d.get("attached")) is attached
        )

    def holds(self, expected: Sequence[str]) -> bool:
        """Exactly ``expected`` attached, once each, and nothing of ours pending."""
        return self.up and self.ports() == sorted(expected) and not self.ports(attached=False)

    def describe(self) -> str:
        if not self.up:
            return "VM down"
        held = ", ".join(self.ports()) or "nothing"
        waiting = self.ports(attached=False)
        return f"VM holds {held}" + (f" (waiting: {', '.join(waiting)})" if waiting else "")


@dataclass
class StepResult:
    name: str
    expected: list[str]
    ok: bool
    seconds: float | None
    held: list[str]
    detail: str = ""


class DemoLab:
    """The lab guest with a VM, the daemon and a watcher inside; the demo's steps.

    ``say`` receives every line worth showing (steps, daemon attach/detach
    lines).  Always call :meth:`close` (a ``finally``): it stops the guest by
    PID, which ends everything inside it.
    """

    def __init__(self, workdir: Path, say: Callable[[str], None] = lambda _l: None) -> None:
        self.workdir = Path(workdir).absolute()
        self.say = say
        self.guest = LabGuest(DEVICES, self.workdir / "lab")
        self.state_path = self.workdir / "lab" / "state.json"
        self.vm: GuestProcess | None = None
        self.daemon: GuestProcess | None = None
        self.watcher: GuestProcess | None = None
        self.daemon_starts = 0
        self.vm_starts = 0
        self.daemon_lines: list[str] = []
        self._log_path: Path | None = None
        self._log_offset = 0
        self.python = "/usr/bin/python3 -I -S" if Path("/usr/bin/python3").exists() else None

    # ------------------------------------------------------------- life cycle

    def boot(self) -> float:
        self.guest.start()
        g = self.guest
        g.run(f"rm -rf {GUEST_DIR} && mkdir -p {GUEST_DIR}", check=True)
        (self.guest.workdir / "vmplug.toml").write_text(CONFIG)
        for name in (WATCHER_NAME, HOTPLUG_TOOL_NAME):
            (self.guest.workdir / name).write_text(script(name))
        # Wait until the guest kernel has enumerated both devices.
        g.wait_for(" && ".join(f"test -e /sys/bus/usb/devices/{p}" for p in PORTS.values()))
        return g.boot_seconds or 0.0

    def start_watcher(self) -> None:
        python = self.python or f"{sys.executable} -I -S"
        self.state_path.unlink(missing_ok=True)
        self.watcher = self.guest.spawn(
            f"{python} {self.guest.workdir}/{WATCHER_NAME}"
            f" {GUEST_DIR}/check.sock {self.state_path}",
            log=f"{self.guest.workdir}/watcher.log",
        )

    def start_vm(self) -> None:
        self.vm_starts += 1
        self.vm = self.guest.spawn(VM_COMMAND, log=f"{self.guest.workdir}/vm-{self.vm_starts}.log")

    def kill_vm(self) -> None:
        if self.vm is not None:
            self.guest.kill(self.vm, signal.SIGKILL)
            self.vm = None

    def start_daemon(self, timeout: float = 240.0, env: Mapping[str, str] | None = None) -> float:
        """Start ``vmplug run`` in the guest; return seconds until its first rescan.
        ``env``: variables for it (``PYTHONPATH`` runs another package, see
        :meth:`unpack_revision`)."""
        self.daemon_starts += 1
        log = self.guest.workdir / f"daemon-{self.daemon_starts}.log"
        vmplug = Path(sys.executable).parent / "vmplug"
        t0 = time.monotonic()
        self.daemon = self.guest.spawn(
            f"{_env_prefix(env)}{vmplug} --config {self.guest.workdir}/vmplug.toml run"
            f" --socket {GUEST_DIR}/vmplug.sock --db {GUEST_DIR}/vmplug.db --events kernel",
            log=str(log),
        )
        self._log_path, self._log_offset = log, 0
        deadline = t0 + timeout
        while not any("rescan:" in line for line in self.daemon_log()):
            if self.guest.poll(self.daemon) is not None:
                raise LabError(f"vmplug run exited:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise LabError(f"vmplug run did not rescan in {timeout}s")
            self.tail()
            time.sleep(0.2)
        self.tail()
        return time.monotonic() - t0

    def unpack_revision(self, rev: str, dest: str = REVISION_DIR) -> str:
        """vmplug's package as git ``rev`` has it, unpacked and compiled in the
        guest's tmpfs at ``dest`` (run it with ``env PYTHONPATH=dest``: ahead
        of the bundle and the share); its short hash.  For before/after
        benchmarks in one boot."""
        root = Path(__file__).resolve().parents[2]
        short = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", rev],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        tar = self.guest.workdir / f"revision-{short}.tar"
        with tar.open("wb") as out:
            subprocess.run(["git", "-C", str(root), "archive", short, "src/vmplug"], stdout=out,
                           check=True)  # fmt: skip
        q = shlex.quote(dest)
        self.guest.run(
            f"rm -rf {q} && mkdir -p {q} && tar -xf {shlex.quote(str(tar))} -C {q}"
            f" --strip-components=1 && {sys.executable} -m compileall -q {q}",
            timeout=600, check=True,
        )  # fmt: skip
        tar.unlink()
        return short

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.guest.kill(self.daemon, signal.SIGTERM)
            self.daemon = None
            self.tail()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for proc in (self.daemon, self.vm, self.watcher):
                if proc is not None and self.guest.qemu_pid is not None:
                    self.guest.kill(proc, signal.SIGKILL, timeout=5)
        self.guest.stop()

    # ------------------------------------------------------------- observing

    def daemon_log(self) -> list[str]:
        if self._log_path is None:
            return []
        try:
            return self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self) -> None:
        """Show the daemon's new attach/detach/VM lines."""
        if self._log_path is None:
            return
        try:
            with self._log_path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        for raw in data[:end].decode(errors="replace").splitlines():
            if any(w in raw for w in (" attach ", " detach ", "vm ", "failed", "Error", "rescan")):
                self.daemon_lines.append(raw)
                self.say(f"daemon: {raw.strip()}")

    def state(self) -> DemoVmState:
        try:
            raw = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return DemoVmState()
        return DemoVmState(
            bool(raw.get("up")), int(raw.get("conn", 0)), dict(raw.get("devices", {}))
        )

    def wait(
        self, pred: Callable[[DemoVmState], bool], timeout: float, t0: float | None = None
    ) -> float | None:
        """Seconds from ``t0`` until ``pred`` holds (None on timeout); tails the daemon log."""
        t0 = time.monotonic() if t0 is None else t0
        while True:
            self.tail()
            now = time.monotonic()
            if pred(self.state()):
                return now - t0
            if now - t0 > timeout:
                return None
            time.sleep(0.05)

    def expect(
        self,
        name: str,
        expected: Sequence[str],
        t0: float,
        timeout: float = 30.0,
        after: Callable[[DemoVmState], bool] = lambda _s: True,
    ) -> StepResult:
        secs = self.wait(lambda s: after(s) and s.holds(expected), timeout, t0)
        st = self.state()
        return StepResult(name, sorted(expected), secs is not None, secs, st.ports(), st.describe())

    # ------------------------------------------------------------- timing

    def _tool(self, mode: str, sock: str, out: Path, dev_id: str, port: str) -> str:
        python = self.python or f"{sys.executable} -I -S"
        tool = self.guest.workdir / HOTPLUG_TOOL_NAME
        return f"{python} {tool} {mode} {port} {sock} {out} {shlex.quote(dev_id)}"

    def tool_spawn(
        self, mode: str, sock: str, out: str, dev_id: str, port: str = PORTS[KBD.id]
    ) -> tuple[GuestProcess, dict[str, Any]]:
        """Start ``scripts/hotplug_tool.py`` in the background (``watch`` or ``floor``);
        return it with its first line (``ready``, the resolved ``id``).  Stop it
        with ``guest.kill``."""
        path = self.guest.workdir / out
        path.unlink(missing_ok=True)
        proc = self.guest.spawn(
            self._tool(mode, sock, path, dev_id, port), log=f"{self.guest.workdir}/{out}.err"
        )
        try:
            first = self.wait_record(path, lambda r: "ready" in r or "error" in r, 60.0)
            if "error" in first:
                raise LabError(f"{mode}: {first['error']}")
        except BaseException:
            self.guest.kill(proc, signal.SIGKILL, timeout=5)
            raise
        return proc, first

    def tool_run(
        self, mode: str, sock: str, dev_id: str, *extra: str, port: str = PORTS[KBD.id]
    ) -> dict[str, Any]:
        """Run one ``add``/``del``/``find`` of ``scripts/hotplug_tool.py``; its JSON line."""
        out = self.guest.workdir / f"tool-{mode}.log"
        out.unlink(missing_ok=True)
        args = " ".join(shlex.quote(e) for e in extra)
        self.guest.run(f"{self._tool(mode, sock, out, dev_id, port)} {args}", timeout=60)
        records = self.records(out)
        return records[-1] if records else {}

    @staticmethod
    def records(path: Path) -> list[dict[str, Any]]:
        """The complete JSON lines a tool wrote so far."""
        try:
            text = path.read_text()
        except OSError:
            return []
        return [json.loads(x) for x in text.splitlines() if x.strip().endswith("}")]

    def wait_record(
        self,
        path: Path,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float,
        skip: int = 0,
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for rec in self.records(path)[skip:]:
                if pred(rec):
                    return rec
            time.sleep(0.05)
        raise LabError(f"no matching line in {path.name} within {timeout:g} s")

    def timed_replug(
        self, watch_log: Path, dev: LabDevice = KBD, pause: tuple[float, float] = (0.5, 2.5)
    ) -> dict[str, Any]:
        """Unplug ``dev``, wait until the watcher saw the VM let it go, replug it
        after a random pause (0.5-2.5 s: a random phase against QEMU's 2 s scan,
        which restarts when QEMU lets the device go) and return
        the watcher's line for it (``dt``: seconds from sysfs to ``attached``)."""
        skip = len(self.records(watch_log))
        self.guest.unplug(dev.id)
        self.wait_record(watch_log, lambda r: "removed" in r, 40.0, skip)
        time.sleep(random.uniform(*pause))  # noqa: S311 - not crypto
        skip = len(self.records(watch_log))
        self.guest.hotplug(dev)
        return self.wait_record(watch_log, lambda r: "dt" in r, 45.0, skip)

    # ------------------------------------------------------------- the steps

    def step_start(self) -> StepResult:
        """VM and daemon start: both devices attached."""
        self.start_watcher()
        self.start_vm()
        self.wait(lambda s: s.up, 30.0)
        self.start_daemon()
        # From the daemon's first rescan: its start-up (58 s seen on a loaded
        # machine under TCG) has its own timeout and must not eat this one.
        t0 = time.monotonic()
        return self.expect("daemon start: attach both", list(PORTS.values()), t0, timeout=60.0)

    def step_unplug(self, dev: LabDevice = KBD) -> StepResult:
        """Unplug a device: it leaves the VM."""
        t0 = time.monotonic()
        self.guest.unplug(dev.id)
        rest = [p for i, p in PORTS.items() if i != dev.id]
        res = self.expect(f"unplug {dev.id} ({PORTS[dev.id]})", rest, t0)
        # "gone": not even a waiting usb-host device for it is left
        if PORTS[dev.id] in self.state().ports(attached=False):
            res.ok = False
        return res

    def step_replug(self, dev: LabDevice = KBD) -> StepResult:
        """Plug it back in: it returns to the VM."""
        t0 = time.monotonic()
        self.guest.hotplug(dev)
        return self.expect(f"replug {dev.id} ({PORTS[dev.id]})", list(PORTS.values()), t0)

    def step_restart_vm(self) -> StepResult:
        """Kill -9 the VM and start it again: its devices come back."""
        conn = self.state().conn
        t0 = time.monotonic()
        self.kill_vm()
        self.start_vm()
        return self.expect(
            "kill -9 VM, restart it",
            list(PORTS.values()),
            t0,
            timeout=60.0,
            after=lambda s: s.conn > conn,
        )

    def step_restart_daemon(self, hold: float = 3.0) -> StepResult:
        """Restart vmplug: it adopts what the VM holds, no double attach."""
        t0 = time.monotonic()
        self.stop_daemon()
        self.start_daemon()
        res = self.expect("restart vmplug: adopt, no double attach", list(PORTS.values()), t0)
        # the new daemon has read the VM (connected, observed) before we judge it
        end = time.monotonic() + 30.0
        while not any(f"vm {VM_NAME}: connected" in ln for ln in self.daemon_log()):
            if time.monotonic() > end:
                res.ok, res.detail = False, "the new daemon never connected to the VM"
                break
            time.sleep(0.1)
        # and it stays that way once the new daemon has looked
        end = time.monotonic() + hold
        while res.ok and time.monotonic() < end:
            self.tail()
            st = self.state()
            if not st.holds(list(PORTS.values())):
                res.ok, res.held, res.detail = False, st.ports(), f"changed: {st.describe()}"
            time.sleep(0.1)
        return res

    def steps(self) -> list[Callable[[], StepResult]]:
        return [self.step_unplug, self.step_replug, self.step_restart_vm, self.step_restart_daemon]


# ---------------------------------------------------------------------------
# the run behind `vmplug demo`


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_demo(
    n_steps: int = 4,
    keep_going: bool = True,
    pause: float = 2.0,
    as_json: bool = False,
    workdir: Path | None = None,
) -> int:
    """``vmplug demo``: boot the lab, run the steps, show them; the exit status.

    0 when every expected attach happened, 1 otherwise (also when the lab
    cannot run here: the reason is printed).  With ``as_json`` a summary goes
    to stdout and the progress lines to stderr.
    """
    from rich.console import Console  # noqa: PLC0415

    console = Console(stderr=as_json, highlight=False, soft_wrap=True)
    reason = lab_unavailable_reason()
    if reason:
        console.print(f"[red]vmplug demo cannot run here:[/red] {reason}")
        console.print("Run scripts/install.sh (it installs QEMU, qemu-guest-agent, virtme-ng).")
        return 1
    start = time.monotonic()

    def say(line: str, style: str = "") -> None:
        stamp = f"[{time.monotonic() - start:6.1f}s] "
        console.print(stamp + (f"[{style}]{line}[/{style}]" if style else line), markup=bool(style))

    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="vmplug-demo-", dir="/tmp")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    lab = DemoLab(wd, say=lambda line: say(line, "dim"))
    results: list[StepResult] = []
    summary: dict[str, Any] = {"workdir": str(wd)}
    interrupted = False

    def show(res: StepResult) -> None:
        results.append(res)
        if res.ok:
            say(f"  ✓ {res.detail} after {res.seconds:.2f} s", "green")
        else:
            say(f"  ✗ expected {', '.join(res.expected) or 'nothing'}; {res.detail}", "red")

    try:
        with _sigterm_interrupts():
            say("booting the lab guest (TCG, ~35 s)…", "bold")
            summary["boot_s"] = round(lab.boot(), 1)
            say(f"guest up in {summary['boot_s']} s; devices {PORTS}", "bold")
            say("step 0: start the VM and `vmplug run` in the guest", "bold")
            show(lab.step_start())
            schedule = lab.steps()
            for i in range(n_steps):
                if results and not results[-1].ok and not keep_going:
                    break
                time.sleep(pause)
                step = schedule[i % len(schedule)]
                say(f"step {i + 1}/{n_steps}: {(step.__doc__ or step.__name__).strip()}", "bold")
                show(step())
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted", "yellow")
    except LabError as exc:
        say(f"lab error: {exc}", "red")
        results.append(StepResult("lab", [], False, None, [], str(exc)))
    finally:
        say("stopping the lab guest…")
        lab.close()
    ok = bool(results) and all(r.ok for r in results) and not interrupted
    summary.update(
        ok=ok,
        interrupted=interrupted,
        steps=[asdict(r) for r in results],
        daemon_lines=lab.daemon_lines,
        seconds=round(time.monotonic() - start, 1),
    )
    say(f"{'all expected attaches happened' if ok else 'FAILED'} ({summary['seconds']} s)")
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    if own_dir and ok:
        shutil.rmtree(wd, ignore_errors=True)
    elif not ok:
        say(f"logs kept in {wd}/lab")
    return 0 if ok else 1
