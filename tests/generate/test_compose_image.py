"""`generate compose` on dockurr/windows' own USB controller, USB storage left for after
boot, and rootless Podman's note.

The image's scripts (qemus/qemu src/config.sh configureUsb) add ``-device $USB``
(``qemu-xhci,id=xhci,p2=7,p3=7`` when USB is empty) and ``-device usb-tablet``
before ``$ARGUMENTS``; a real QEMU gets exactly that command line, with ARGUMENTS
split by a real bash as the image's entry.sh splits it, and must take every device
on that one controller, at the ports the plan says, the tablet keeping port 1.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.support.devices import AUDIO, DISK, KEYLAB, SERIAL_A, SERIAL_B
from vmplug.cli.app import cli
from vmplug.config import parse_config
from vmplug.generate import compose
from vmplug.generate.common import CannotExpress

from .conftest import QemuRun
from .test_compose import env_of, image_split, validate

BASE = Path("/srv/windows")
MIXED = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs" / "mixed"
#: What configureUsb adds for an empty USB and the default MOUSE (usb-tablet).
IMAGE_USB_OPTS = ["-device", compose.IMAGE_XHCI, "-device", "usb-tablet"]


def usb_hosts(arguments: list[str]) -> list[dict[str, str]]:
    out = []
    for opt, value in itertools.pairwise(arguments):
        if opt == "-device" and value.startswith("usb-host,"):
            out.append(dict(p.partition("=")[::2] for p in value.split(",")[1:]))
    return out


def test_devices_go_on_the_images_own_xhci() -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB], base_dir=BASE, qmp_env=True)
    assert not any("xhci" in a.split(",")[0] for a in plan.arguments)  # no second controller
    hosts = usb_hosts(plan.arguments)
    assert [h["bus"] for h in hosts] == ["xhci.0", "xhci.0"]
    assert sorted(int(h["port"]) for h in hosts) == [2, 3]  # port 1 is the image's tablet
    assert plan.image is not None and plan.image.set_usb is None
    # no usb-tablet (MOUSE=none): from port 1
    plan = compose.plan_compose([AUDIO], base_dir=BASE, image_env={"MOUSE": "none"})
    assert [h["port"] for h in usb_hosts(plan.arguments)] == ["1"]


def test_a_real_qemu_takes_the_image_command_line(
    start_qemu: Callable[[list[str]], QemuRun], tmp_path: Path
) -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB], base_dir=BASE, qmp_env=True)
    service = validate(compose.render_new(plan))["services"]["windows"]
    arguments = image_split(compose.compose_unescape(env_of(service)["ARGUMENTS"]), tmp_path)
    run = start_qemu([*IMAGE_USB_OPTS, *arguments])
    for host in plan.qemu.devices:
        path = f"/machine/peripheral/{host.id}"
        assert run.qmp.qom_get(path, "port") == str(host.port)
        assert run.qmp.qom_get(path, "parent_bus").endswith("/xhci.0")
    usb = run.qmp.cmd("human-monitor-command", **{"command-line": "info usb"})
    assert re.search(r"Port 1, .*Tablet", usb), usb
    pci = run.qmp.cmd("human-monitor-command", **{"command-line": "info pci"})
    assert pci.count("USB controller") == 1, pci  # the image's, and no other


def test_more_devices_than_the_image_has_ports_set_its_usb() -> None:
    many = [AUDIO, KEYLAB, SERIAL_A, SERIAL_B]
    with pytest.raises(CannotExpress, match=r"4 devices at boot.*2 free ports"):
        compose.plan_compose(
            many, base_dir=BASE, by_port=True, image_env={"USB": "qemu-xhci,id=xhci,p2=3,p3=3"}
        )
    plan = compose.plan_compose(
        many, base_dir=BASE, by_port=True, image_env={"USB": "qemu-xhci,id=myusb,p2=5,p3=5"}
    )
    assert {h["bus"] for h in usb_hosts(plan.arguments)} == {"myusb.0"}
    assert sorted(int(h["port"]) for h in usb_hosts(plan.arguments)) == [2, 3, 4, 5]
    assert compose.image_usb({}, 7).set_usb == compose.IMAGE_XHCI_15  # 7 > 6 free ports
    assert compose.image_usb({}, 6).set_usb is None


def test_image_usb_settings() -> None:
    with pytest.raises(CannotExpress, match="USB=no"):
        compose.plan_compose([AUDIO], base_dir=BASE, image_env={"USB": "no"})
    with pytest.raises(CannotExpress, match="no id="):
        compose.image_usb({"USB": "qemu-xhci"}, 1)
    legacy = compose.image_usb({"VERSION": "7u"}, 1)
    assert legacy.bus == "ehci.0" and legacy.ports == compose.EHCI_PORTS
    assert compose.image_usb({"USB": "yes", "VERSION": "11"}, 1).setting == compose.IMAGE_XHCI
    assert compose.image_usb({"USB": '"qemu-xhci,id=xhci,p2=15,p3=15"'}, 1).ports == 15


def test_usb_storage_is_attached_after_boot_by_default() -> None:
    plan = compose.plan_compose([AUDIO, DISK], base_dir=BASE)
    assert [h.id for h in plan.qemu.devices] == [AUDIO.qemu_id]  # the disk is not at boot
    assert any("Windows Setup may format" in n for n in plan.notes)
    assert any(f"vmplug attach {DISK.port} --vm windows" in n for n in plan.notes)
    snippet = compose.vmplug_snippet(plan)
    config = parse_config(snippet, "snippet.toml")
    assert config.decide(DISK) is None  # commented out until Windows is installed
    enabled = snippet.replace("# [[rule]]\n# attach", "[[rule]]\nattach").replace(
        "\n# match = 'id 46f4:0001'", "\nmatch = 'id 46f4:0001'"
    )
    later = parse_config(enabled, "snippet.toml").decide(DISK)
    assert later is not None and later.attach == "windows"  # uncommented, it attaches
    text = compose.render_new(plan)
    assert "not here, USB storage" in text and DISK.qemu_id not in text
    # live: an active rule, still not at boot
    live = compose.plan_compose([AUDIO, DISK], base_dir=BASE, storage="live")
    assert [h.id for h in live.qemu.devices] == [AUDIO.qemu_id]
    assert parse_config(compose.vmplug_snippet(live), "s.toml").decide(DISK) is not None
    # boot: in ARGUMENTS, with the warning
    boot = compose.plan_compose([AUDIO, DISK], base_dir=BASE, storage="boot")
    assert {h.id for h in boot.qemu.devices} == {AUDIO.qemu_id, DISK.qemu_id}
    assert any("present at boot" in n for n in boot.notes)


def test_merge_uses_the_files_usb_setting(tmp_path: Path) -> None:
    text = (
        "services:\n  windows:\n    image: dockurr/windows\n    environment:\n"
        "      USB: qemu-xhci,id=ctl,p2=4,p3=4\n      MOUSE: none\n"
    )
    env = compose.service_env(text, "windows")
    plan = compose.plan_compose([AUDIO, KEYLAB], base_dir=tmp_path, image_env=env)
    merged, _ = compose.merge_text(text, plan)
    svc = validate(merged)["services"]["windows"]
    assert env_of(svc)["USB"] == "qemu-xhci,id=ctl,p2=4,p3=4"  # left as it is
    hosts = usb_hosts(env_of(svc)["ARGUMENTS"].split(" "))
    assert {h["bus"] for h in hosts} == {"ctl.0"} and sorted(h["port"] for h in hosts) == ["1", "2"]
    # a plan made without the file's setting is refused, not merged onto the wrong bus
    wrong = compose.plan_compose([AUDIO], base_dir=tmp_path)
    with pytest.raises(CannotExpress, match=r"ctl\.0"):
        compose.merge_text(text, wrong)


def test_cli_merge_reads_the_service_and_notes_rootless_podman(tmp_path: Path) -> None:
    file = tmp_path / "docker-compose.yml"
    file.write_text(
        'services:\n  windows:\n    image: dockurr/windows\n    environment:\n      VERSION: "xp"\n'
    )
    res = CliRunner().invoke(
        cli,
        ["--sysfs-root", str(MIXED), "generate", "compose", "2-2.1", "3-1", "--merge", str(file)],
        env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
    )
    assert res.exit_code == 0, res.output
    svc = yaml.safe_load(file.read_text())["services"]["windows"]
    hosts = usb_hosts(svc["environment"]["ARGUMENTS"].split(" "))
    assert [h["bus"] for h in hosts] == ["ehci.0"]  # legacy Windows: the image's EHCI
    assert "note: 3-1" in res.stderr and "Windows Setup may format" in res.stderr
    assert "rootless Podman" not in res.stderr
    plan = compose.plan_compose([AUDIO], base_dir=tmp_path, rootless_podman=True)
    assert any("device_cgroup_rules does nothing" in n for n in plan.notes)
    assert any("keep-groups" in n for n in plan.notes)
