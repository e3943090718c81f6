"""`vmplug generate compose`: the Compose spec schema, the image's own word splitting,
comment-preserving merge, and vmplug's config snippet."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.devices import AUDIO, DISK, KEYLAB, SERIAL_A, SERIAL_B
from vmplug.config import parse_config
from vmplug.errors import UsageError
from vmplug.generate import compose
from vmplug.generate.common import CannotExpress

BASE = Path("/srv/windows")


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema as vendored by check-jsonschema
    (python-jsonschema project; refreshed from compose-spec/compose-spec)."""
    res = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((res / "compose-spec.json").read_text(encoding="utf-8"))
    return schema


def validate(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert isinstance(data, dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def image_split(arguments: str, cwd: Path) -> list[str]:
    """What dockurr/windows' entry.sh makes of ARGUMENTS: ``exec … ${ARGS:+ $ARGS}``
    (unquoted: split on IFS and globbed), run in a real bash."""
    bash = shutil.which("bash")
    assert bash is not None
    res = subprocess.run(
        [bash, "-c", 'set -- ${ARGS:+ $ARGS}; printf "%s\\0" "$@"'],
        env={"ARGS": arguments, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        cwd=cwd,
        check=True,
    )
    return res.stdout.decode().split("\0")[:-1]


def test_golden_new(golden: Callable[[str, str], None]) -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB, DISK], base_dir=BASE)
    golden("compose-new.yaml", compose.render_new(plan))
    golden("compose-vmplug.toml", compose.vmplug_snippet(plan))


def test_golden_qmp_env_by_port(golden: Callable[[str, str], None]) -> None:
    plan = compose.plan_compose(
        [SERIAL_A, SERIAL_B], base_dir=BASE, by_port=True, qmp_env=True, service="win11"
    )
    golden("compose-qmp-env.yaml", compose.render_new(plan))


@pytest.mark.parametrize("qmp_env", [False, True])
def test_new_file_is_valid_compose(qmp_env: bool, tmp_path: Path) -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB, DISK], base_dir=BASE, qmp_env=qmp_env)
    data = validate(compose.render_new(plan))
    svc = data["services"]["windows"]
    assert "/dev/bus/usb:/dev/bus/usb" in svc["volumes"]
    assert svc["device_cgroup_rules"] == ["c 189:* rwm"]
    assert "/dev/kvm" in svc["devices"]
    assert not any(str(d).startswith("/dev/bus/usb") for d in svc["devices"])
    assert "./qmp:/qmp" in svc["volumes"]
    env = env_of(svc)
    # The image splits ARGUMENTS into exactly the intended options.
    assert image_split(compose.compose_unescape(env["ARGUMENTS"]), tmp_path) == plan.arguments
    assert env["ARGUMENTS"].split(" ") == plan.arguments
    qmp_opt = "unix:/qmp/qmp.sock,server=on,wait=off"
    if qmp_env:
        assert env["QMP"] == qmp_opt and "-qmp" not in plan.arguments
    else:
        assert "QMP" not in env and plan.arguments[-2:] == ["-qmp", qmp_opt]
    for arg in plan.arguments:
        assert not arg.startswith("/run") and "/dev/shm" not in arg


def test_snippet_is_a_valid_vmplug_config() -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB], base_dir=BASE, qmp_dir="./qmp")
    config = parse_config(compose.vmplug_snippet(plan), "snippet.toml")
    vm = config.vms["windows"]
    assert vm.qmp == "/srv/windows/qmp/qmp.sock"
    assert vm.usb_bus == "xhci.0"  # the image's own xHCI (its USB setting), not a second one
    assert [r.attach for r in config.rules] == ["windows", "windows"]
    assert [config.decide(d).attach for d in (AUDIO, KEYLAB)] == ["windows", "windows"]  # type: ignore[union-attr]
    assert config.decide(DISK) is None


def test_snippet_by_port_matches_the_port() -> None:
    plan = compose.plan_compose([SERIAL_A, SERIAL_B], base_dir=BASE, by_port=True, vm="win")
    config = parse_config(compose.vmplug_snippet(plan), "snippet.toml")
    assert [config.decide(d).attach for d in (SERIAL_A, SERIAL_B)] == ["win", "win"]  # type: ignore[union-attr]


USER_FILE = """\
# My Windows box.  Keep this comment.
name: studio
services:
  # the VM
  windows:
    image: dockurr/windows   # pinned later
    environment:
      - VERSION=11
      - RAM_SIZE=8G
      - ARGUMENTS=-device usb-host,vendorid=0x46f4,productid=0x0002 -cpu host
    devices:
      - /dev/kvm
      - /dev/bus/usb   # old way
    volumes:
      - ./storage:/storage
    ports:
      - 8006:8006
    stop_grace_period: 2m
  samba:
    image: dockurr/samba
# trailing comment
"""


def test_merge_keeps_comments_order_and_is_idempotent(tmp_path: Path) -> None:
    plan = compose.plan_compose([AUDIO, KEYLAB], base_dir=tmp_path)
    merged, changes = compose.merge_text(USER_FILE, plan)
    for line in USER_FILE.splitlines():
        if "#" in line and "/dev/bus/usb" not in line:
            assert line.strip() in merged, line
    data = validate(merged)
    assert list(data) == ["name", "services"]
    assert list(data["services"]) == ["windows", "samba"]
    assert list(data["services"]["windows"])[:4] == ["image", "environment", "devices", "volumes"]
    svc = data["services"]["windows"]
    env = env_of(svc)
    assert env["VERSION"] == "11" and env["RAM_SIZE"] == "8G"
    args = env["ARGUMENTS"].split(" ")
    # The user's own option stays; their old usb-host for the same device goes.
    assert args[:2] == ["-cpu", "host"]
    assert args[2:] == plan.arguments
    assert "/dev/bus/usb" not in svc["devices"]
    assert any("removed /dev/bus/usb" in c for c in changes)
    assert any("removed -device usb-host,vendorid=0x46f4" in c for c in changes)
    assert data["services"]["samba"] == {"image": "dockurr/samba"}
    again, changes2 = compose.merge_text(merged, plan)
    assert again == merged and changes2 == []


def test_merge_replaces_earlier_vmplug_devices(tmp_path: Path) -> None:
    first = compose.plan_compose([AUDIO, KEYLAB], base_dir=tmp_path)
    text, _ = compose.merge_text(USER_FILE, first)
    second = compose.plan_compose([DISK], base_dir=tmp_path)
    text2, changes = compose.merge_text(text, second)
    args = env_of(validate(text2)["services"]["windows"])["ARGUMENTS"].split(" ")
    assert args == ["-cpu", "host", *second.arguments]
    assert any(AUDIO.qemu_id in c and "removed" in c for c in changes)


def test_merge_mapping_env_with_dollar_and_double_quotes(tmp_path: Path) -> None:
    text = (
        "services:\n"
        "    windows:\n"
        "        image: dockurr/windows\n"
        "        environment:\n"
        '            ARGUMENTS: "-device virtio-rng-pci,id=rng$${X}"\n'
    )
    plan = compose.plan_compose([KEYLAB], base_dir=tmp_path, qmp_dir="/srv/$HOME:x")
    merged, _ = compose.merge_text(text, plan)
    assert "        image: dockurr/windows\n" in merged  # 4-space indentation kept
    svc = validate(merged)["services"]["windows"]
    assert svc["environment"]["ARGUMENTS"].startswith("-device virtio-rng-pci,id=rng$${X} -device")
    assert '            ARGUMENTS: "-device' in merged  # quoting style kept
    vol = [v for v in svc["volumes"] if isinstance(v, dict)]
    assert vol == [
        {
            "type": "bind",
            "source": "/srv/$$HOME:x",
            "target": "/qmp",
            "bind": {"create_host_path": True},
        }
    ]


def test_merge_errors(tmp_path: Path) -> None:
    plan = compose.plan_compose([KEYLAB], base_dir=tmp_path, service="win")
    with pytest.raises(UsageError, match=r"no service 'win'.*windows, samba"):
        compose.merge_text(USER_FILE, plan)
    with pytest.raises(UsageError, match="not a valid YAML"):
        compose.merge_text("services: [\n", plan)
    qmp_plan = compose.plan_compose([KEYLAB], base_dir=tmp_path, qmp_env=True)
    taken = USER_FILE.replace("RAM_SIZE=8G", "QMP=tcp:0.0.0.0:4444")
    with pytest.raises(CannotExpress, match="one client at a time"):
        compose.merge_text(taken, qmp_plan)


def test_values_that_cannot_be_expressed() -> None:
    with pytest.raises(CannotExpress, match="white space"):
        compose.arguments_value(["-device", "usb-host,serial=a b"])
    with pytest.raises(CannotExpress, match=r"\* \? \["):
        compose.arguments_value(["-device", "x,id=a*"])
    with pytest.raises(CannotExpress, match="service name"):
        compose.plan_compose([KEYLAB], service="my service")
    with pytest.raises(CannotExpress, match="VM name"):
        compose.plan_compose([KEYLAB], service="_win")
    with pytest.raises(CannotExpress, match="--by-port"):
        compose.plan_compose([SERIAL_A, SERIAL_B])


def test_service_names_that_yaml_would_retype() -> None:
    plan = compose.plan_compose([KEYLAB], service="1.10", base_dir=BASE)
    data = validate(compose.render_new(plan))
    assert list(data["services"]) == ["1.10"]
