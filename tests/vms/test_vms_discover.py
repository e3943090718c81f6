"""`vmplug vms` and `vmplug init` end to end: real QEMU processes (one with
-qmp, one with -chardev socket + -mon mode=control, one as a dockurr/windows
container's QEMU behind a Docker API socket, one on a Proxmox socket path) and
a real libvirtd with a running domain.  The commands run through the vmplug
entry point.  Names are unique per test run and the commands are given them
as patterns, so the other QEMUs on this machine are never asked anything."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.vmrig import (
    SYSFS_FIXTURES,
    XHCI,
    DockerApiServer,
    Libvirt,
    QemuFactory,
    docker_doc,
)
from vmplug.cli import cli
from vmplug.config import load_config

pytestmark = pytest.mark.qemu

MIXED = SYSFS_FIXTURES / "mixed"


@dataclass
class Host:
    tag: str
    sock_dir: Path
    run_dir: Path
    env: dict[str, str]
    libvirtd: Libvirt
    docker: DockerApiServer
    pids: dict[str, int]

    def name(self, short: str) -> str:
        return f"{self.tag}-{short}"

    def args(self) -> list[str]:
        return [
            "--libvirt-uri", self.libvirtd.uri,
            "--docker-socket", self.docker.socket,
            "--proxmox-run", str(self.run_dir),
        ]  # fmt: skip

    async def vmplug(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the vmplug command (in a thread: this loop serves the Docker API)."""
        return await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "vmplug"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )


@pytest.fixture
async def host(
    qemu: QemuFactory, libvirtd: Libvirt, docker_api: DockerApiServer, tmp_path: Path
) -> AsyncIterator[Host]:
    tag = f"vmplugdisc{uuid.uuid4().hex[:6]}"
    sock_dir = Path(tempfile.mkdtemp(prefix="vmplug-dc", dir="/tmp"))
    run_dir = sock_dir / "qemu-server"
    run_dir.mkdir()
    (sock_dir / "win").mkdir()
    pids = {}
    # a VM started by a script, with a usb-host device already in it
    a = qemu(
        [*XHCI, "-device", "usb-host,id=vmplug-0123456789ab,hostbus=2,hostport=4.1"],
        name=f"{tag}-a",
        sock_dir=sock_dir,
        qmp_sockets=2,
    )
    a.start()
    pids["a"] = a.pid
    # QMP through -chardev + -mon, and an EHCI bus only
    b = qemu(
        [
            "-device", "usb-ehci,id=ehci",
            "-chardev", f"socket,id=mon0,path={sock_dir}/b-mon.sock,server=on,wait=off",
            "-mon", "chardev=mon0,mode=control",
        ],
        name=f"{tag}-b",
        sock_dir=sock_dir,
        qmp_sockets=0,
    )  # fmt: skip
    with contextlib.suppress(IndexError):  # started; it has no socket of the fixture's kind
        b.start()
    pids["b"] = b.pid
    # the QEMU of a dockurr/windows container: its -qmp on the /qmp bind mount
    win = qemu(
        [*XHCI, "-qmp", f"unix:{sock_dir}/win/qmp.sock,server=on,wait=off"],
        name="windows",  # the image's own -name
        sock_dir=sock_dir,
    )
    win.start()
    pids["win"] = win.pid
    doc = copy.deepcopy(docker_doc("windows-qmp"))
    doc["Name"] = f"/{tag}-win"
    for mount in doc["Mounts"]:
        if mount["Destination"] == "/qmp":
            mount["Source"] = str(sock_dir / "win")
    docker_api.add(doc)
    plain = copy.deepcopy(docker_doc("windows-no-qmp"))
    plain["Name"] = f"/{tag}-plain"
    docker_api.add(plain)
    # a Proxmox VM
    pve = qemu(
        [*XHCI, "-qmp", f"unix:{run_dir}/105.qmp,server=on,wait=off"],
        name="pve105",
        sock_dir=sock_dir,
    )
    pve.start()
    pids["pve"] = pve.pid
    # a libvirt domain
    libvirtd.define(f"{tag}-lv")
    env = dict(os.environ)
    env.update(
        VMPLUG_SYSFS_ROOT=str(MIXED),
        VMPLUG_CONFIG=str(tmp_path / "vmplug.toml"),
        VMPLUG_PROXMOX_RUN=str(run_dir),
    )
    env.pop("DOCKER_HOST", None)
    for path in (f"{sock_dir}/b-mon.sock", f"{sock_dir}/win/qmp.sock", f"{run_dir}/105.qmp"):
        _wait_listening(path)
    try:
        yield Host(tag, sock_dir, run_dir, env, libvirtd, docker_api, pids)
    finally:
        libvirtd.virsh("destroy", f"{tag}-lv", check=False)
        libvirtd.virsh("undefine", f"{tag}-lv", check=False)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_listening(path: str, timeout: float = 10.0) -> None:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.02)


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


async def test_vms_finds_every_kind(host: Host) -> None:
    t = host.tag
    Path(host.env["VMPLUG_CONFIG"]).write_text(
        f'[vm.mine]\nqmp = "{host.sock_dir}/{t}-a-qmp0.sock"\n'
    )
    # another client (a running vmplug daemon) holds the config's socket: the
    # VM is read through the other socket on its command line
    with socket.socket(socket.AF_UNIX) as held:
        held.connect(f"{host.sock_dir}/{t}-a-qmp0.sock")
        assert b"QMP" in held.recv(4096)
        res = await host.vmplug("vms", f"{t}*", "pve105", "mine", *host.args(), "--json")
    assert res.returncode == 0, res.stderr
    rows = by_name(json.loads(res.stdout)["vms"])
    assert set(rows) == {"mine", f"{t}-b", f"{t}-win", f"{t}-plain", "pve105", f"{t}-lv"}

    mine = rows["mine"]  # the config's VM, seen as a process too: one row
    assert (mine["source"], mine["config"], mine["state"]) == ("config", "mine", "prelaunch")
    assert mine["pids"] == [host.pids["a"]]
    assert mine["qmp"] == f"{host.sock_dir}/{t}-a-qmp1.sock"
    assert mine["usb_buses"] == ["xhci.0 (qemu-xhci)"]
    assert mine["devices"] == [
        {
            "id": "vmplug-0123456789ab", "managed": True, "attached": False,
            "hostbus": 2, "hostport": "4.1", "hostaddr": None, "vidpid": None,
        }
    ]  # fmt: skip

    b = rows[f"{t}-b"]
    assert b["where"] == f"{host.sock_dir}/b-mon.sock" and b["source"] == "process"
    assert b["usb_buses"] == ["ehci.0 (usb-ehci)"] and b["state"] == "prelaunch"

    win = rows[f"{t}-win"]
    assert win["kind"] == "container" and win["where"] == f"container:{t}-win"
    assert win["qmp"] == f"{host.sock_dir}/win/qmp.sock"
    assert win["state"] == "prelaunch" and win["pids"] == [host.pids["win"]]
    plain = rows[f"{t}-plain"]
    assert plain["qmp"] is None and "no QMP socket" in plain["problem"]

    pve = rows["pve105"]
    assert (pve["kind"], pve["where"], pve["state"]) == ("proxmox", "proxmox:105", "prelaunch")
    assert pve["pids"] == [host.pids["pve"]]

    lv = rows[f"{t}-lv"]
    assert (lv["kind"], lv["state"], lv["usb_buses"]) == ("libvirt", "running", ["qemu-xhci"])
    assert lv["uri"] == host.libvirtd.uri and lv["pids"] == []

    # the table for people
    res = await host.vmplug("vms", f"{t}*", "mine", *host.args())
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "*2-4.1" in lines["mine"] and "prelaunch" in lines["mine"]
    assert "libvirt:" in lines[f"{t}-lv"] and "running" in lines[f"{t}-lv"]


async def test_init_from_flags_writes_a_config_that_checks(host: Host, tmp_path: Path) -> None:
    t = host.tag
    out = tmp_path / "etc" / "vmplug.toml"
    res = await host.vmplug(
        "init", "-o", str(out), *host.args(), "--match", f"{t}*",
        "--vm", f"a={host.sock_dir}/{t}-a-qmp0.sock",
        "--vm", f"lv=libvirt:{t}-lv",
        "--vm", f"win=container:{t}-win",
        "--vm", "pve=proxmox:105",
        "--vm", f"{t}-b",  # found by its name
        "--device", "a=2-2.4.2",
        "--device", "lv=0627:0001",
        "--device", "win=rule:with-interface 03:01:01",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: 5 VMs" in res.stderr
    config = load_config(out)
    assert {n: v.kind for n, v in config.vms.items()} == {
        "a": "qmp", "lv": "libvirt", "win": "container", "pve": "proxmox", f"{t}-b": "qmp",
    }  # fmt: skip
    assert config.vms["lv"].uri == host.libvirtd.uri
    assert config.vms["win"].uri == f"unix://{host.docker.socket}"
    assert config.vms[f"{t}-b"].qmp == f"{host.sock_dir}/b-mon.sock"
    assert [(r.attach, r.rule.source) for r in config.rules][:2] == [
        ("a", "id 0627:0001"),
        ("lv", "id 0627:0001"),
    ]
    check = await host.vmplug("check-config", str(out), "--json")
    assert check.returncode == 0, check.stderr
    decided = {d["port"]: d["vm"] for d in json.loads(check.stdout)["devices"]}
    assert decided["2-2.4.2"] == "a"
    # an existing file is kept, unless --force
    again = await host.vmplug("init", "-o", str(out), "--vm", "x=/run/x.sock")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert load_config(out).vms.keys() == config.vms.keys()
    forced = await host.vmplug("init", "-o", str(out), "--force", "--vm", "x=/run/x.sock")
    assert forced.returncode == 0 and list(load_config(out).vms) == ["x"]
    # clear errors for what cannot be
    new = str(tmp_path / "n.toml")
    bad = await host.vmplug("init", "-o", new, "--match", f"{t}*", *host.args(), "--vm", "nosuch")
    assert bad.returncode == 2 and "no VM named 'nosuch' found" in bad.stderr
    two = await host.vmplug(
        "init", "-o", new, "--vm", "a=/a.sock", "--vm", "b=/b.sock", "--device", "1-3"
    )
    assert two.returncode == 2 and "say which VM" in two.stderr


async def test_init_interactive(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompts, answered as a person would (the same code runs when stdin is a tty)."""
    t = host.tag
    for key in ("VMPLUG_SYSFS_ROOT", "VMPLUG_PROXMOX_RUN"):
        monkeypatch.setenv(key, host.env[key])
    out = tmp_path / "vmplug.toml"
    runner = CliRunner()
    # VMs are listed in discovery order: libvirt, containers, processes
    listing = await asyncio.to_thread(
        runner.invoke,
        cli,
        ["init", "-o", str(out), "--interactive", "--match", f"{t}-lv", "--match", f"{t}-a",
         *host.args()],
        input="\n",
    )  # fmt: skip
    assert listing.exit_code == 2, listing.output  # nothing picked: no VM
    shown = listing.stderr if hasattr(listing, "stderr") else listing.output
    assert f"1. {t}-lv  libvirt:{t}-lv" in shown and f"2. {t}-a  " in shown
    answers = "1,2\nwin11\n\n2 5\n" + "win11\n" + f"{t}-a\n"
    res = await asyncio.to_thread(
        runner.invoke,
        cli,
        ["init", "-o", str(out), "--interactive", "--match", f"{t}-lv", "--match", f"{t}-a",
         *host.args()],
        input=answers,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = load_config(out)
    assert config.vms["win11"].libvirt == f"{t}-lv"
    assert config.vms[f"{t}-a"].qmp == f"{host.sock_dir}/{t}-a-qmp0.sock"
    assert [r.attach for r in config.rules] == ["win11", f"{t}-a"]
    # a terminal on stdin is enough: no --interactive needed
    tty_out = tmp_path / "tty.toml"
    master, slave = pty.openpty()
    try:
        os.write(master, b"1\n\n\n")  # the libvirt domain, its name, no device
        res2 = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "vmplug"), "init", "-o", str(tty_out),
             "--match", f"{t}-lv", *host.args()],
            stdin=slave, capture_output=True, text=True, env=host.env, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
        os.close(master)
    assert res2.returncode == 0, res2.stderr
    assert "VMs to manage" in res2.stderr
    assert list(load_config(tty_out).vms) == [f"{t}-lv"]
