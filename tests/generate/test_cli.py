"""`vmplug generate …` through the real `vmplug` entry point, reading the sysfs
fixtures captured from a real kernel (tests/fixtures/sysfs)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from vmplug.cli import main

from .conftest import QemuRun
from .test_compose import USER_FILE, validate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, root: str, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("VMPLUG_SYSFS_ROOT", str(FIXTURES / root))
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def vmplug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    def call(root: str, *argv: str) -> tuple[int, str, str]:
        return run(capsys, monkeypatch, root, *argv)

    return call


def test_qemu_from_real_sysfs(vmplug: Run, start_qemu: Callable[[list[str]], QemuRun]) -> None:
    code, out, err = vmplug("mixed", "generate", "qemu", "2-2.1", "3-1")
    assert code == 0, err
    args = [w for ln in out.splitlines() if not ln.startswith("#") for w in shlex.split(ln)]
    assert "isochronous" in out  # 2-2.1 is QEMU's usb-audio: iso OUT endpoint
    assert any("vendorid=0x46f4,productid=0x0002,isobufs=16,isobsize=8" in a for a in args)
    assert any("port=1,vendorid=0x46f4,productid=0x0001" in a for a in args)  # USB 3 first
    run_ = start_qemu(args)
    names = {p["name"] for p in run_.qmp.cmd("qom-list", path="/machine/peripheral")}
    assert "vmplug-xhci" in names and len([n for n in names if n.startswith("vmplug-")]) == 3


def test_qemu_readconfig_json(vmplug: Run) -> None:
    code, out, _ = vmplug("identical", "generate", "qemu", "2-1", "2-3", "--by-port", "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["match"] for d in data["devices"]] == [
        {"hostbus": "2", "hostport": "1"},
        {"hostbus": "2", "hostport": "3"},
    ]
    code, out, _ = vmplug("identical", "generate", "qemu", "2-1", "--format", "readconfig")
    assert code == 0 and '[device "vmplug-xhci"]' in out


@pytest.mark.parametrize(
    ("root", "argv", "message"),
    [
        ("mixed", ["qemu", "2-2"], "hub"),
        ("mixed", ["qemu", "9-9"], "no USB device matches '9-9'"),
        ("mixed", ["qemu", "3-1", "1-1"], "3-1 and 1-1 share 46f4:0001"),
        ("identical", ["libvirt", "0627:0001"], "--by-address"),
        ("identical", ["compose", "0627:0001"], "--by-port"),
        ("mixed", ["compose", "2-2.1", "--service", "my windows"], "service name"),
        ("mixed", ["udev", "2-2.1", "--group", "a b"], "group"),
        ("mixed", ["spice", "2-2.4"], "hub"),
        ("mixed", ["qemu"], "at least one device"),
    ],
)
def test_errors_exit_2(vmplug: Run, root: str, argv: list[str], message: str) -> None:
    code, out, err = vmplug(root, "generate", *argv)
    assert code == 2
    assert message in err and out == ""
    assert "Traceback" not in err


def test_missing_device_lists_candidates(vmplug: Run) -> None:
    _, _, err = vmplug("minimal", "generate", "udev", "1235:821a")
    assert "candidates:" in err and "2-1  0627:0001" in err


def test_compose_new_and_merge(vmplug: Run, tmp_path: Path) -> None:
    code, out, err = vmplug("mixed", "generate", "compose", "2-2.1", "3-1")
    assert code == 0, err
    validate(out)
    assert "[vm.windows]" in err and "[[rule]]" in err

    path = tmp_path / "compose.yaml"
    path.write_text(USER_FILE)
    path.chmod(0o640)
    code, out, err = vmplug(
        "mixed", "generate", "compose", "2-2.1", "--merge", str(path), "--stdout"
    )
    assert code == 0 and path.read_text() == USER_FILE  # --stdout writes nothing
    assert "would change" in err
    printed = out

    code, out, err = vmplug("mixed", "generate", "compose", "2-2.1", "--merge", str(path))
    assert code == 0 and out == ""
    assert path.read_text() == printed
    assert path.stat().st_mode & 0o777 == 0o640
    assert "updated:" in err and "removed /dev/bus/usb" in err
    data = validate(path.read_text())
    assert f'qmp = "{tmp_path}/qmp/qmp.sock"' in err
    assert "/dev/bus/usb:/dev/bus/usb" in data["services"]["windows"]["volumes"]

    code, _, err = vmplug("mixed", "generate", "compose", "2-2.1", "--merge", str(path))
    assert code == 0 and "already up to date" in err

    code, out, _ = vmplug("mixed", "generate", "compose", "2-2.1", "--json", "--qmp-env")
    data = json.loads(out)
    assert data["qmp_env"] == "unix:/qmp/qmp.sock,server=on,wait=off"
    assert yaml.safe_load(data["compose"])["services"]["windows"]["environment"]["QMP"]


def test_libvirt_domain(vmplug: Run) -> None:
    code, out, _ = vmplug(
        "mixed", "generate", "libvirt", "2-2.1", "--qmp", "/run/x.qmp", "--domain", "win"
    )
    assert code == 0 and out.startswith("<domain") and "startupPolicy" in out
    code, out, _ = vmplug("identical", "generate", "libvirt", "0627:0001", "--by-address")
    assert code == 0 and out.count("<address") == 2


def test_udev_install(vmplug: Run, tmp_path: Path) -> None:
    log = tmp_path / "log"
    fake = tmp_path / "udevadm"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    rules = tmp_path / "rules.d"
    code, out, err = vmplug(
        "mixed", "generate", "udev", "2-2.1", "3-1",
        "--install", "--rules-dir", str(rules), "--udevadm", str(fake),
    )  # fmt: skip
    assert code == 0, err
    assert out == ""
    assert len(list(rules.iterdir())) == 2
    assert "wrote" in err and "reloaded" in err
    assert f"trigger --action=change {FIXTURES / 'mixed'}/bus/usb/devices/3-1" in log.read_text()


def test_spice_and_systemd(vmplug: Run, tmp_path: Path) -> None:
    code, out, _ = vmplug("mixed", "generate", "spice", "2-2.1", "--format", "qemu")
    assert code == 0 and out == "-1:0x46f4:0x0002:-1:1|-1:-1:-1:-1:0\n"
    code, out, _ = vmplug("mixed", "generate", "spice", "2-2.1", "--json")
    assert json.loads(out)["spice"] == "-1,0x46f4,0x0002,-1,1|-1,-1,-1,-1,0"
    code, out, _ = vmplug(
        "minimal", "--config", "/etc/v.toml", "generate", "systemd", "--exec", "/usr/bin/vmplug"
    )
    assert code == 0 and "ExecStart=/usr/bin/vmplug --config /etc/v.toml run" in out
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    code, out, err = vmplug(
        "minimal", "generate", "systemd", "--exec", "/usr/bin/vmplug", "--install",
        "--unit-dir", str(tmp_path), "--systemctl", str(fake),
    )  # fmt: skip
    assert code == 0 and (tmp_path / "vmplug.service").exists()
    assert "enable --now vmplug.service" in err
