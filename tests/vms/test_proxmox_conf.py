"""Proxmox VE's VM configs (tests/fixtures/proxmox, written from qm.conf(5): see its
README) against the devices of a sysfs tree captured from a real kernel: VM names,
usbN lines, resource mappings, `vmplug generate proxmox` and the doctor's finding
for a device that both Proxmox and a vmplug rule claim."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmplug.cli.app import cli
from vmplug.host.inventory import read_devices
from vmplug.model import UsbDevice
from vmplug.vms.discover import scan_proxmox
from vmplug.vms.proxmox_conf import (
    claims,
    parse_mappings,
    parse_vm_conf,
    read_mappings,
    read_vm_confs,
    vm_names,
)

REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "tests" / "fixtures" / "proxmox" / "etc" / "qemu-server"
MAPPINGS = ETC.parent / "mapping" / "usb.cfg"
MIXED = REPO / "tests" / "fixtures" / "sysfs" / "mixed"


@pytest.fixture(autouse=True)
def pve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPLUG_PROXMOX_ETC", str(ETC))
    monkeypatch.setenv("VMPLUG_PROXMOX_NODE", "pve1")


def devices() -> dict[str, UsbDevice]:
    return {d.port: d for d in read_devices(MIXED) if not d.is_root_hub}


def test_reads_names_and_usb_lines_of_the_current_config_only() -> None:
    vms = {vm.vmid: vm for vm in read_vm_confs()}
    assert sorted(vms) == [101, 102, 103]
    win = vms[101]
    assert win.name == "win11"
    # usb3 is only in the [before-drivers] snapshot: not the running config
    assert [e.key for e in win.usb] == ["usb0", "usb1", "usb2"]
    assert win.usb[0].host is not None and win.usb[0].host.text() == "46f4:0002"
    assert win.usb[1].host is not None and win.usb[1].host.port == "3-1" and win.usb[1].usb3
    assert win.usb[2].host is not None and win.usb[2].host.spice
    assert win.lines["usb0"] == 24
    build = vms[102]
    assert build.name == "build-box"
    assert build.usb[0].mapping == "dock-keyboard" and build.usb[0].host is None
    assert build.usb[1].host is not None and build.usb[1].host.text() == "046d:c52b"  # 0x forms
    assert [e.key for e in build.usb] == ["usb0", "usb1"]  # [PENDING] usb2 is not applied yet
    assert vms[103].name is None and vms[103].usb == ()
    assert vm_names() == {101: "win11", 102: "build-box"}
    assert win.free_usb_index() == 3


def test_claims_match_the_captured_devices() -> None:
    devs = devices()
    vms = {vm.vmid: vm for vm in read_vm_confs()}
    maps = read_mappings(MAPPINGS)
    assert [e.key for e in claims(vms[101], devs["2-2.1"], maps)] == ["usb0"]  # by id
    assert [e.key for e in claims(vms[101], devs["3-1"], maps)] == ["usb1"]  # by port
    # the other stick has the same id as 3-1 but sits elsewhere: usb1 is by port
    assert devs["1-1"].vidpid == devs["3-1"].vidpid and claims(vms[101], devs["1-1"], maps) == []
    # the mapping's map line for this node (pve1) names port 2-2.4.2, not the tablets
    assert [e.key for e in claims(vms[102], devs["2-2.4.2"], maps)] == ["usb0"]
    assert claims(vms[102], devs["2-2.4.1"], maps) == []
    # on a node no map line names, any of the mapping's devices
    other = parse_mappings(MAPPINGS.read_text(), "pve3")["dock-keyboard"]
    assert {d.port for d in other} == {"2-2.4.2", "1-4"}
    assert [d.text() for d in parse_mappings(MAPPINGS.read_text(), "pve2")["dock-keyboard"]] == [
        "1-4"
    ]


def test_parse_edge_cases() -> None:
    vm = parse_vm_conf(
        "usb0: host=1-2.3.4\nusb1: host=bogus\nusb2:host=1235:821A,usb3=yes\nusb20x: x\n", 200
    )
    assert vm.usb[0].host is not None and vm.usb[0].host.port == "1-2.3.4"
    assert vm.usb[1].host is None  # qemu-server refuses it; vmplug matches nothing
    assert vm.usb[2].host is not None and vm.usb[2].host.text() == "1235:821a" and vm.usb[2].usb3
    assert len(vm.usb) == 3


def test_vms_are_named_as_proxmox_names_them(tmp_path: Path) -> None:
    for vmid in (101, 103):
        (tmp_path / f"{vmid}.qmp").write_text("")  # list_vmids looks at the names only
    found = {vm.where: vm.name for vm in scan_proxmox(tmp_path)}
    assert found == {"proxmox:101": "win11", "proxmox:103": "pve103"}


def generate(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["--sysfs-root", str(MIXED), "generate", "proxmox", *args])
    assert "Traceback" not in res.output
    return res.exit_code, res.stdout, res.stderr


def test_generate_writes_qm_set_lines_in_free_slots() -> None:
    rc, out, err = generate("2-2.4.2", "3-1", "--vmid", "101", "--by-port")
    assert rc == 0, err
    commands = [shlex.split(x) for x in out.splitlines() if not x.startswith("#")]
    assert commands == [
        ["qm", "set", "101", "--usb3", "host=2-2.4.2"],
        ["qm", "set", "101", "--usb4", "host=3-1,usb3=1"],
    ]
    assert "usb1 already takes 3-1" in err
    # what the lines write, read back as Proxmox's config, takes exactly those devices
    conf = parse_vm_conf("\n".join(f"{c[3][2:]}: {c[4]}" for c in commands), 101)
    devs = devices()
    taken = {p for p, d in devs.items() for _ in claims(conf, d, {})}
    assert taken == {"2-2.4.2", "3-1"}


def test_generate_by_id_refuses_identical_devices_and_makes_mappings() -> None:
    rc, _, err = generate("0627:0001", "--vmid", "102")
    assert rc == 2 and "--by-port" in err
    rc, out, _ = generate("2-2.1", "--vmid", "103", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["commands"] == ["qm set 103 --usb0 host=46f4:0002"]
    rc, out, _ = generate("2-2.4.2", "--vmid", "102", "--mapping", "desk-kbd", "--by-port")
    lines = [x for x in out.splitlines() if not x.startswith("#")]
    assert rc == 0 and lines == [
        "pvesh create /cluster/mapping/usb --id desk-kbd --map node=pve1,id=0627:0001,path=2-2.4.2",
        "qm set 102 --usb2 mapping=desk-kbd",
    ]
    rc, _, err = generate("2-2.1", "--vmid", "102", "--mapping", "9bad")
    assert rc == 2 and "mapping id" in err
    rc, _, _ = generate("2-2.1", "--vmid", "42")
    assert rc == 2  # not a VMID


def doctor(tmp_path: Path, rule: str) -> Any:
    config = tmp_path / "vmplug.toml"
    config.write_text(f'[vm.windows]\nqmp = "{tmp_path}/none.sock"\n\n[[rule]]\n{rule}\n')
    (tmp_path / "proc").mkdir(exist_ok=True)
    res = CliRunner().invoke(
        cli,
        [
            "--sysfs-root", str(MIXED), "--config", str(config), "doctor", "--json",
            "--proc-root", str(tmp_path / "proc"), "--dev-root", str(tmp_path),
            "--docker-socket", str(tmp_path / "no.sock"),
            "--kernel-log", str(config),
        ],
    )  # fmt: skip
    doc = json.loads(res.stdout)
    assert res.exit_code == doc["exit_status"]
    return doc


def test_doctor_finds_a_device_claimed_by_proxmox_and_by_a_rule(tmp_path: Path) -> None:
    doc = doctor(tmp_path, "attach = \"windows\"\nmatch = 'id 46f4:0002'")
    found = [f for f in doc["findings"] if f["check"] == "qemu.proxmox-claims"]
    assert len(found) == 1 and found[0]["severity"] == "error"
    assert found[0]["subject"] == "2-2.1"
    assert "Proxmox VM 101 (win11) usb0" in found[0]["title"]
    assert found[0]["evidence"][0] == f"{ETC}/101.conf:24: usb0: host=46f4:0002"
    assert "qm set 101 --delete usb0" in found[0]["fix"]
    assert doc["exit_status"] == 1
    # through a resource mapping too
    doc = doctor(tmp_path, 'attach = "windows"\nmatch = \'via-port "2-2.4.2"\'')
    found = [f for f in doc["findings"] if f["check"] == "qemu.proxmox-claims"]
    assert [f["severity"] for f in found] == ["error"]
    assert "VM 102 (build-box) usb0 through mapping dock-keyboard" in found[0]["title"]


def test_doctor_is_quiet_when_nothing_is_claimed_twice(tmp_path: Path) -> None:
    # 1-1 has the stick's id, but usb1 takes port 3-1 only; block rules claim nothing
    doc = doctor(tmp_path, 'attach = "windows"\nmatch = \'via-port "1-1"\'')
    found = [f for f in doc["findings"] if f["check"] == "qemu.proxmox-claims"]
    assert [f["severity"] for f in found] == ["ok"] and "3 Proxmox VM configs" in found[0]["title"]
    doc = doctor(tmp_path, "block = true\nmatch = 'id 46f4:0002'")
    found = [f for f in doc["findings"] if f["check"] == "qemu.proxmox-claims"]
    assert [f["severity"] for f in found] == ["ok"]
