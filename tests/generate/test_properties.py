"""Property tests: whatever a device calls itself (names and serials are chosen by
firmware authors: any text, quotes, newlines, ``$``, ``%``, backslashes, NULs,
U+2028...), no format can be broken out of.  Each output is read back with the
consumer's parser (or a mirror of it) and must mean exactly what was planned."""

from __future__ import annotations

import dataclasses
import os
import shlex
import tomllib
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.devices import AUDIO, DISK, KEYLAB
from tests.support.parsers import parse_exec_start, parse_readconfig, usbredir_string_to_rules
from tests.support.udev_parse import parse_rules, udev_match
from vmplug.generate import compose, libvirt, qemu, spice, systemd, udev
from vmplug.generate.common import CannotExpress, comment_text
from vmplug.model import UsbDevice

SETTINGS = settings(
    max_examples=int(os.environ.get("VMPLUG_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Every code point, surrogates and separators included, and the nasty ASCII.
any_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, blacklist_categories=()),
        st.sampled_from(list("\"'`$%\\\n\r\t,:;|*?[]{}<>&#=- \x00\x85\u2028\u2029")),
    ),
    max_size=80,
)
#: Serials without lone surrogates: the sysfs reader decodes with "replace", so
#: they cannot occur, and UsbDevice.qemu_id (model.py) UTF-8-encodes the identity.
serial_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", blacklist_categories=()),
        st.sampled_from(list("\"'`$%\\\n\r\t,:;|*?[]{}<>&#=- \x00\x85\u2028\u2029")),
    ),
    max_size=80,
)


@st.composite
def devices(draw: st.DrawFn) -> list[UsbDevice]:
    templates = draw(st.lists(st.sampled_from([AUDIO, KEYLAB, DISK]), min_size=1, max_size=4))
    out: list[UsbDevice] = []
    for i, tmpl in enumerate(templates):
        out.append(
            dataclasses.replace(
                tmpl,
                port=f"{tmpl.busnum}-{i + 1}.{draw(st.integers(1, 15))}",
                vendor_id=draw(st.integers(0, 0xFFFF)),
                product_id=0x1000 + i,  # distinct ids: vendor/product matching is valid
                manufacturer=draw(st.none() | any_text),
                product=draw(st.none() | any_text),
                serial=draw(st.none() | serial_text),
            )
        )
    return out


def _non_comment_args(text: str) -> list[str]:
    lines = text.splitlines()
    assert all(line.startswith(("#", "-")) for line in lines), lines
    return [w for line in lines if not line.startswith("#") for w in shlex.split(line)]


@SETTINGS
@given(devices(), st.booleans())
def test_qemu_args_and_readconfig(devs: list[UsbDevice], by_port: bool) -> None:
    plan = qemu.plan_qemu(devs, by_port=by_port)
    assert _non_comment_args(qemu.render_args(plan)) == plan.args()
    groups = parse_readconfig(qemu.render_readconfig(plan))
    expected = [
        ("device", plan.controller_id, [kv for kv in plan.controller_properties() if kv[0] != "id"])
    ]
    expected += [
        ("device", d.id, [kv for kv in d.properties(plan.bus) if kv[0] != "id"])
        for d in plan.devices
    ]
    assert groups == expected


@SETTINGS
@given(devices(), st.booleans())
def test_libvirt_xml(devs: list[UsbDevice], with_qmp: bool) -> None:
    plan = libvirt.plan_libvirt(devs, qmp="/run/vm.qmp" if with_qmp else None)
    frag = ET.fromstring(f"<f>{libvirt.render_fragment(plan)}</f>")
    tags = [el.tag for el in frag]
    cmdline = f"{{{libvirt.QEMU_NS}}}commandline"
    assert tags == ["hostdev"] * len(devs) + ([cmdline] if with_qmp else [])
    for el, dev in zip(frag.findall("hostdev"), devs, strict=True):
        assert el.find("source/vendor").get("id") == f"0x{dev.vendor_id:04x}"  # type: ignore[union-attr]
    dom = ET.fromstring(libvirt.render_domain(plan, "d"))
    assert [el.tag for el in dom.find("devices")] == ["emulator", "controller"] + [  # type: ignore[union-attr]
        "hostdev"
    ] * len(devs)


@SETTINGS
@given(devices(), st.booleans(), st.booleans())
def test_compose_yaml(devs: list[UsbDevice], by_port: bool, qmp_env: bool) -> None:
    plan = compose.plan_compose(devs, by_port=by_port, qmp_env=qmp_env, base_dir=Path("/b"))
    data = yaml.safe_load(compose.render_new(plan))
    svc = data["services"]["windows"]
    assert set(svc) == {
        "image",
        "container_name",
        "environment",
        "devices",
        "cap_add",
        "ports",
        "volumes",
        "restart",
        "stop_grace_period",
        "device_cgroup_rules",
    }
    env = svc["environment"]
    # USB storage only: nothing at boot, so no ARGUMENTS (vmplug attaches it after boot)
    with_args = {"ARGUMENTS"} if plan.arguments else set()
    assert set(env) == {"VERSION"} | with_args | ({"QMP"} if qmp_env else set())
    assert env.get("ARGUMENTS", "").split(" ") == (plan.arguments or [""])
    snippet = tomllib.loads(compose.vmplug_snippet(plan))
    assert list(snippet["vm"]) == ["windows"]
    assert [r["match"] for r in snippet.get("rule", [])] == list(plan.rules)


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1))
def test_compose_qmp_dir_survives_yaml_and_interpolation(qmp_dir: str) -> None:
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in qmp_dir):
        with pytest.raises(CannotExpress, match="control characters"):
            compose.plan_compose([KEYLAB], qmp_dir=qmp_dir, base_dir=Path("/b"))
        return
    plan = compose.plan_compose([KEYLAB], qmp_dir=qmp_dir, base_dir=Path("/b"))
    data = yaml.safe_load(compose.render_new(plan))
    volumes = data["services"]["windows"]["volumes"]
    (qmp_vol,) = [
        v for v in volumes if v not in ("./windows:/storage", "/dev/bus/usb:/dev/bus/usb")
    ]
    if isinstance(qmp_vol, str):
        source, _, target = qmp_vol.rpartition(":")
    else:
        source, target = qmp_vol["source"], qmp_vol["target"]
    assert target == "/qmp"
    assert compose.compose_unescape(source) == qmp_dir
    config = tomllib.loads(compose.vmplug_snippet(plan))
    assert config["vm"]["windows"]["qmp"].endswith("/qmp.sock")


@SETTINGS
@given(devices(), st.booleans())
def test_udev_rules(devs: list[UsbDevice], by_port: bool) -> None:
    rules = udev.plan_udev(devs, by_port=by_port)
    parsed = parse_rules(udev.render_rules(rules))
    assert len(parsed) == 2 * len(devs)
    for i, (rule, dev) in enumerate(zip(rules, devs, strict=True)):
        access, power = parsed[2 * i], parsed[2 * i + 1]
        assert [(t.key, t.op, t.value) for t in access] == [*rule.matches, *rule.assignments]
        assert power[-1].key == "ATTR{power/control}" and power[-1].value == "on"
        values = {t.key: t.value for t in access}
        assert values["ATTR{idVendor}"] == f"{dev.vendor_id:04x}"
        if "ATTR{serial}" in values and dev.serial is not None:
            try:
                raw = dev.serial.split("\0", 1)[0].encode()  # sysfs: a C string
            except UnicodeEncodeError:
                continue  # the kernel writes UTF-8; lone surrogates cannot occur
            assert udev_match(values["ATTR{serial}"], raw)
        assert all(ch.isascii() and ch not in '"\\ ' for ch in values["SYMLINK"])


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
    st.booleans(),
)
def test_spice_filters(ids: list[tuple[int, int, int]], allow: bool, version: bool) -> None:
    devs = [
        dataclasses.replace(KEYLAB, port=f"1-{i + 1}", vendor_id=v, product_id=p, bcd_device=b)
        for i, (v, p, b) in enumerate(ids)
    ]
    plan = spice.plan_spice(devs, allow_others=allow, match_version=version)
    want = [(-1, v, p, b if version else -1, 1) for v, p, b in ids]
    want.append((-1, -1, -1, -1, 1 if allow else 0))
    assert usbredir_string_to_rules(spice.render(plan, "spice").strip(), ",") == want
    assert usbredir_string_to_rules(spice.render(plan, "qemu").strip(), ":") == want
    assert "," not in spice.render(plan, "qemu")  # a comma would end QEMU's option


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), min_size=1))
def test_systemd_exec_start(config: str) -> None:
    if config == ";":
        return
    plan = systemd.plan_systemd("/usr/bin/vmplug", config=config)
    lines = plan.text().split("\n")  # systemd ends lines at \n (and \r, \0: escaped)
    (exec_line,) = [ln for ln in lines if ln.startswith("ExecStart=")]
    assert parse_exec_start(exec_line.removeprefix("ExecStart=")) == list(plan.exec_argv)
    assert len(lines) == len(systemd.plan_systemd("/usr/bin/vmplug", config="x").text().split("\n"))
    assert "\r" not in plan.text()


@SETTINGS
@given(any_text)
def test_comment_text_is_one_safe_line(text: str) -> None:
    out = comment_text(text)
    assert out.splitlines() == [out] or out == ""
    assert "--" not in out and not out.endswith(("-", "\\"))
    assert len(out) <= 160
    assert all(ch.isprintable() for ch in out)
