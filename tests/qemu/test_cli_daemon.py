"""The daemon's CLI end to end: a real ``vmplug run`` process, real QEMU VMs.

``vmplug run`` runs as a subprocess over a captured sysfs tree (uevents
replayed through a FIFO, see :class:`fakekernel.FakeKernel`), with two real
QEMU processes.  The one-shot commands (``status``, ``attach``, ``detach``,
``reload``, ``history``) are run as a user would run them, and what QEMU
really holds is read through a second QMP socket of each VM, never from
vmplug's own answers.  The daemon is stopped by PID at teardown, whatever
the test did.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakekernel import FakeKernel
from tests.support.qemu_proc import QemuProcess
from vmplug.vms.qmp import QmpVm

pytestmark = pytest.mark.qemu

VMPLUG = [sys.executable, "-m", "vmplug"]

RULES = """
[[rule]]
attach = "a"
match = 'via-port "2-2.4.2"'
"""


class Cli:
    """A config, two QEMUs, a fake kernel, and ``vmplug`` commands against them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kernel = FakeKernel(tmp)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-c", dir="/tmp"))
        self.api_sock = self.sock_dir / "api.sock"
        self.db = tmp / "vmplug.db"
        self.config = tmp / "vmplug.toml"
        self.qemus = {
            name: QemuProcess(tmp, qmp_sockets=2, name=name, sock_dir=self.sock_dir)
            for name in ("a", "b")
        }
        vms = "".join(f'[vm.{n}]\nqmp = "{q.qmp_paths[0]}"\n\n' for n, q in self.qemus.items())
        daemon = f'[daemon]\nsocket = "{self.api_sock}"\ndatabase = "{self.db}"\n\n'
        self.config.write_text(vms + daemon + RULES)
        self.daemon: subprocess.Popen[str] | None = None
        self.daemon_log = tmp / "daemon.log"

    def env(self) -> dict[str, str]:
        return os.environ | {
            "VMPLUG_SYSFS_ROOT": str(self.kernel.root),
            "VMPLUG_CONFIG": str(self.config),
            "COLUMNS": "200",
        }

    def vmplug(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VMPLUG, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        res = self.vmplug(*args, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def start_daemon(self, *extra: str) -> None:
        with self.daemon_log.open("a") as log:
            self.daemon = subprocess.Popen(
                [*VMPLUG, "run", "--events", f"replay:{self.kernel.fifo}", *extra],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.wait(self.api_sock.exists, "the daemon's API socket")

    def stop_daemon(self, sig: int = signal.SIGTERM) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        try:
            return self.daemon.wait(timeout=30)
        finally:
            self.daemon = None

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(f"daemon exited: {self.daemon_log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def held(self, vm: str) -> dict[str, str]:
        """{qemu id: "bus-port"} of the usb-host devices QEMU ``vm`` really holds."""

        async def read() -> dict[str, str]:
            obs = QmpVm(f"obs-{vm}", str(self.qemus[vm].qmp_paths[1]), shared=True)
            await obs.start()
            try:
                found = await obs.observe()
            finally:
                await obs.stop()
            return {k: f"{o.hostbus}-{o.hostport}" for k, o in found.items()}

        return asyncio.run(read())

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(timeout=10)
        for q in self.qemus.values():
            q.cleanup()
        self.kernel.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        for q in c.qemus.values():
            q.start()
        yield c
    finally:
        c.close()


def test_status_attach_detach_and_history_through_the_daemon(cli: Cli) -> None:
    cli.start_daemon()
    cli.wait(lambda: cli.held("a") == {_id(cli, "2-2.4.2"): "2-2.4.2"}, "the rule's attach")

    status = cli.json("status")
    assert cli.daemon is not None
    assert status["daemon"]["pid"] == cli.daemon.pid
    assert {n: v["connected"] for n, v in status["vms"].items()} == {"a": True, "b": True}
    assert status["vms"]["a"]["kind"] == "qmp"
    assert status["vms"]["a"]["where"] == str(cli.qemus["a"].qmp_paths[0])
    [att] = status["attachments"]
    assert (att["port"], att["vm"], att["state"]) == ("2-2.4.2", "a", "attached")

    human = cli.vmplug("status")
    assert human.returncode == 0, human.stderr
    assert "2-2.4.2" in human.stdout
    assert "attached" in human.stdout

    # a one-shot attach goes through the daemon, and QEMU really gets the device
    out = cli.json("attach", "1-3", "--vm", "b")
    assert out["via"] == "daemon"
    cli.wait(lambda: _id(cli, "1-3") in cli.held("b"), "1-3 in VM b")
    assert cli.held("b")[_id(cli, "1-3")] == "1-3"

    # detach: gone from QEMU, and the daemon keeps it off (no re-attach by the rule)
    out = cli.json("detach", "2-2.4.2")
    assert out["via"] == "daemon"
    cli.wait(lambda: _id(cli, "2-2.4.2") not in cli.held("a"), "2-2.4.2 detached")
    time.sleep(0.5)
    assert _id(cli, "2-2.4.2") not in cli.held("a")

    history = cli.json("history", "1-3")
    kinds = [(e["kind"], e.get("vm"), e.get("result")) for e in history]
    assert ("attach", "b", "ok") in kinds
    assert all(e.get("identity") in (None, _identity(cli, "1-3")) for e in history)

    # SIGTERM leaves attached devices attached
    assert cli.stop_daemon() == 0
    assert _id(cli, "1-3") in cli.held("b")
    assert not cli.api_sock.exists()
    everything = cli.json("history", "-n", "1000")
    assert [e["kind"] for e in everything][-1] == "daemon-stop"
    assert "daemon-start" in {e["kind"] for e in everything}


def test_ambiguous_and_unknown_devices_are_errors_that_list_candidates(cli: Cli) -> None:
    cli.start_daemon()
    # two tablets share 0627:0001 in the capture
    res = cli.vmplug("attach", "0627:0001", "--vm", "b")
    assert res.returncode == 2
    assert "1-3" in res.stderr
    assert "2-2.4.1" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli.vmplug("attach", "9-9.9", "--vm", "b")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    res = cli.vmplug("attach", "1-3", "--vm", "nosuchvm")
    assert res.returncode == 2
    assert "nosuchvm" in res.stderr
    assert cli.held("b") == {}


def test_persist_writes_the_rule_and_the_daemon_keeps_it(cli: Cli) -> None:
    cli.start_daemon()
    out = cli.json("attach", "1-1", "--vm", "b", "--persist")
    assert out["rule"] == 'id 46f4:0001 serial "LABSTICK0002"'
    text = cli.config.read_text()
    assert text.index("LABSTICK0002") < text.index("2-2.4.2")  # first rule, first match
    cli.wait(lambda: _id(cli, "1-1") in cli.held("b"), "1-1 in VM b")
    check = cli.vmplug("check-config", "--json")
    assert check.returncode == 0, check.stderr
    # a daemon started again from the file alone keeps it there
    assert cli.stop_daemon() == 0
    cli.start_daemon()
    cli.wait(lambda: cli.json("status")["attachments"] != [], "status")
    states = {a["port"]: a["state"] for a in cli.json("status")["attachments"]}
    cli.wait(
        lambda: (
            {a["port"]: a["state"] for a in cli.json("status")["attachments"]}
            == {"1-1": "attached", "2-2.4.2": "attached"}
        ),
        f"both attached (was {states})",
    )


def test_reload_refuses_a_bad_config_and_keeps_the_running_one(cli: Cli) -> None:
    cli.start_daemon()
    cli.wait(lambda: _id(cli, "2-2.4.2") in cli.held("a"), "the rule's attach")
    good = cli.config.read_text()
    cli.config.write_text(good + "\n[[rule]]\nattach = 'a'\nmatch = 'id 1234:'\n")
    res = cli.vmplug("reload")
    assert res.returncode == 2
    assert "vmplug.toml:" in res.stderr
    assert "bad match rule" in res.stderr
    assert "None" not in res.stderr
    # status still answers while the file is broken, and says the file is broken
    res = cli.vmplug("status", "--json")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr
    assert "keeps the config it loaded" in res.stderr
    assert json.loads(res.stdout)["attachments"][0]["port"] == "2-2.4.2"
    assert _id(cli, "2-2.4.2") in cli.held("a")

    # a good change moves the device, through `vmplug reload` and through SIGHUP
    cli.config.write_text(good.replace('attach = "a"', 'attach = "b"'))
    res = cli.vmplug("reload")
    assert res.returncode == 0, res.stderr
    assert "reloaded" in res.stdout
    cli.wait(lambda: _id(cli, "2-2.4.2") in cli.held("b"), "moved to b")
    assert _id(cli, "2-2.4.2") not in cli.held("a")
    cli.config.write_text(good)
    assert cli.daemon is not None
    cli.daemon.send_signal(signal.SIGHUP)
    cli.wait(lambda: _id(cli, "2-2.4.2") in cli.held("a"), "moved back to a by SIGHUP")


def test_without_a_daemon_commands_say_so_or_go_straight_to_qmp(cli: Cli) -> None:
    res = cli.vmplug("status")
    assert res.returncode == 1
    assert "no vmplug daemon" in res.stderr
    res = cli.vmplug("status", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["daemon"] is None
    res = cli.vmplug("reload")
    assert res.returncode != 0
    assert "no vmplug daemon" in res.stderr

    out = cli.json("attach", "2-2.1", "--vm", "b")
    assert out["via"] == "direct"
    assert cli.held("b") == {_id(cli, "2-2.1"): "2-2.1"}
    out = cli.json("detach", "2-2.1")
    assert out["via"] == "direct"
    assert cli.held("b") == {}


def test_detach_on_exit_gives_devices_back(cli: Cli) -> None:
    cli.start_daemon("--detach-on-exit")
    cli.wait(lambda: _id(cli, "2-2.4.2") in cli.held("a"), "the rule's attach")
    assert cli.stop_daemon(signal.SIGINT) == 0
    assert cli.held("a") == {}


def test_a_second_daemon_on_the_same_socket_is_refused(cli: Cli) -> None:
    cli.start_daemon()
    res = cli.vmplug("run", "--events", f"replay:{cli.kernel.fifo}")
    assert res.returncode != 0
    assert "already answers" in res.stderr
    assert cli.daemon is not None
    assert cli.daemon.poll() is None


def _device(cli: Cli, port: str) -> dict[str, Any]:
    for dev in cli.json("list"):
        if dev["port"] == port:
            return dict(dev)
    raise AssertionError(f"no device at {port}")


_cache: dict[tuple[str, str], dict[str, Any]] = {}


def _cached(cli: Cli, port: str) -> dict[str, Any]:
    key = (str(cli.kernel.root), port)
    if key not in _cache:
        _cache[key] = _device(cli, port)
    return _cache[key]


def _id(cli: Cli, port: str) -> str:
    return str(_cached(cli, port)["qemu_id"])


def _identity(cli: Cli, port: str) -> str:
    return str(_cached(cli, port)["identity"])
