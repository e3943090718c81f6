"""The sysfs reader against trees captured from a real kernel (tests/fixtures/sysfs).

The oracle reads the kernel's own *text* attributes (idVendor, busnum,
bInterfaceClass…), while the reader takes most of them from the binary
descriptors and uevent: two independent paths that must agree field by field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from vmplug.cli import cli
from vmplug.host import sysfs
from vmplug.host.inventory import read_devices

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sysfs"
CAPTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "capture.json").exists())


def _attr(path: Path, name: str) -> str | None:
    try:
        return (path / name).read_text(errors="replace").rstrip("\n")
    except OSError:
        return None


def _oracle(root: Path) -> list[dict[str, Any]]:
    """What the kernel's text attributes say, for every device (root hubs included)."""
    base = root / "bus/usb/devices"
    out = []
    for link in base.iterdir():
        name = link.name
        if ":" in name:
            continue
        dev = link.resolve()
        interfaces = []
        for sub in sorted(dev.iterdir()):
            if (sub / "bInterfaceNumber").exists():
                driver = sub / "driver"
                interfaces.append(
                    {
                        "number": int(_attr(sub, "bInterfaceNumber") or "x", 16),
                        "class": int(_attr(sub, "bInterfaceClass") or "x", 16),
                        "subclass": int(_attr(sub, "bInterfaceSubClass") or "x", 16),
                        "protocol": int(_attr(sub, "bInterfaceProtocol") or "x", 16),
                        "driver": driver.readlink().name if driver.is_symlink() else None,
                    }
                )
        speed = float(_attr(dev, "speed") or "nan")
        out.append(
            {
                "port": name,
                "busnum": int(_attr(dev, "busnum") or "x"),
                "devnum": int(_attr(dev, "devnum") or "x"),
                "vendor_id": _attr(dev, "idVendor"),
                "product_id": _attr(dev, "idProduct"),
                "bcd_device": _attr(dev, "bcdDevice"),
                "manufacturer": _attr(dev, "manufacturer"),
                "product": _attr(dev, "product"),
                "serial": _attr(dev, "serial"),
                "speed_mbps": int(speed) if speed.is_integer() else speed,
                "usb_version": (_attr(dev, "version") or "").strip(),
                "device_class": int(_attr(dev, "bDeviceClass") or "x", 16),
                "is_hub": _attr(dev, "bDeviceClass") == "09",
                "num_ports": int(_attr(dev, "maxchild") or "0") or None,
                "authorized": _attr(dev, "authorized") == "1",
                "power_control": _attr(dev, "power/control"),
                "driver": (dev / "driver").readlink().name,
                "interfaces": sorted(interfaces, key=lambda i: int(i["number"] or 0)),
            }
        )
    return sorted(out, key=lambda d: d["port"])


def _list_json(root: Path, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["--sysfs-root", str(root), "list", "--json", *args])
    assert result.exit_code == 0, result.output
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


@pytest.mark.parametrize("capture", CAPTURES)
def test_list_json_matches_kernel_attributes_field_by_field(capture: str) -> None:
    root = FIXTURES / capture
    got = {d["port"]: d for d in _list_json(root, "--all")}
    want = _oracle(root)
    assert sorted(got) == [w["port"] for w in want]
    for w in want:
        g = got[w["port"]]
        for key, value in w.items():
            if key == "interfaces":
                trimmed = [
                    {k: i[k] for k in ("number", "class", "subclass", "protocol", "driver")}
                    for i in g["interfaces"]
                ]
                assert trimmed == value, (w["port"], key)
            else:
                assert g[key] == value, (w["port"], key, g[key], value)
        assert g["vm"] is None
        assert g["warnings"] == []
        assert isinstance(g["controller"], str)
        # a PCI controller, or dummy_hcd's platform device in the gadgets capture
        assert g["controller"].startswith(("0000:", "dummy_hcd."))


@pytest.mark.parametrize("capture", CAPTURES)
def test_root_hubs_only_with_all(capture: str) -> None:
    root = FIXTURES / capture
    plain = _list_json(root)
    every = _list_json(root, "--all")
    assert all(not d["port"].startswith("usb") for d in plain)
    assert {d["port"] for d in every} - {d["port"] for d in plain} == {
        d["port"] for d in every if d["port"].startswith("usb")
    }


def test_mixed_capture_topology() -> None:
    """What the lab put on the buses (capture.json) is what the reader finds."""
    devices = {d.port: d for d in read_devices(FIXTURES / "mixed")}
    # two controllers: EHCI and xHCI (USB 2 and USB 3 root buses)
    controllers = {d.controller for d in devices.values() if d.is_root_hub}
    assert len(controllers) == 2
    # a hub with a nested hub, and a device behind both
    assert devices["2-2"].is_hub and devices["2-2.4"].is_hub
    assert devices["2-2.4"].num_ports and devices["2-2.4"].num_ports >= 4
    kbd = devices["2-2.4.2"]
    assert kbd.parent_port == "2-2.4" and kbd.depth == 3
    assert kbd.interface_triples == ((3, 1, 1),)
    # the audio device: isochronous OUT at 48 kHz, 2 channels, 16 bit = 1,536,000 bit/s
    audio = next(d for d in devices.values() if d.product == "QEMU USB Audio")
    assert audio.iso_bandwidth_bps() == 48000 * 2 * 2 * 8
    iso_eps = [
        ep
        for i in audio.interfaces
        for alt in i.alt_settings
        for ep in alt.endpoints
        if ep.transfer_type.name == "ISOCHRONOUS"
    ]
    assert [(ep.direction, ep.max_packet_size, ep.interval) for ep in iso_eps] == [("out", 192, 1)]
    # the storage device with the serial the lab gave it, on the USB 3 bus at 5 Gbit/s
    sticks = [d for d in devices.values() if d.serial and d.serial.startswith("LABSTICK")]
    assert any(d.speed_mbps == 5000 for d in sticks)
    assert all(d.interface_triples == ((8, 6, 0x50),) for d in sticks)


def test_identical_capture_has_two_devices_with_one_id_on_two_ports() -> None:
    devices = [d for d in read_devices(FIXTURES / "identical") if not d.is_root_hub]
    by_id: dict[str | None, list[str]] = {}
    for d in devices:
        by_id.setdefault(d.vidpid, []).append(d.port)
    twins = [ports for ports in by_id.values() if len(ports) >= 2]
    assert twins, by_id
    # identical devices still get distinct stable identities and QEMU ids
    for ports in twins:
        ids = {d.qemu_id for d in devices if d.port in ports}
        assert len(ids) == len(ports)


def _copy(capture: str, tmp_path: Path) -> Path:
    dst = tmp_path / capture
    shutil.copytree(FIXTURES / capture, dst, symlinks=True)
    return dst


def _device_dir(root: Path, port: str) -> Path:
    return (root / "bus/usb/devices" / port).resolve()


def test_garbled_and_missing_attributes_become_warnings(tmp_path: Path) -> None:
    root = _copy("mixed", tmp_path)
    kbd = _device_dir(root, "2-2.4.2")
    (kbd / "speed").write_text("fast\n")
    (kbd / "descriptors").write_bytes(b"\x12\x01\x00")  # truncated device descriptor
    (kbd / "idVendor").write_text("zzzz\n")
    (kbd / "product").write_bytes(b"Key\xffboard\n")  # not UTF-8
    tablet = _device_dir(root, "2-2.4.1")
    (tablet / "busnum").unlink()
    (tablet / "uevent").write_text("garbage without equals\n")
    (tablet / "power" / "autosuspend_delay_ms").write_text("soon\n")
    devices = {d.port: d for d in read_devices(root)}
    k = devices["2-2.4.2"]
    assert k.speed_mbps is None and k.vendor_id is None
    assert k.product == "Key\ufffdboard"
    assert k.product_id == 0x0001  # the other attribute files still count
    assert any("speed" in w for w in k.warnings)
    assert any("idVendor" in w for w in k.warnings)
    assert any("descriptors" in w for w in k.warnings)
    t = devices["2-2.4.1"]
    assert t.busnum is None and t.devnum == 5
    assert any("autosuspend" in w for w in t.warnings)
    # every other device is untouched
    assert all(not d.warnings for p, d in devices.items() if p not in ("2-2.4.2", "2-2.4.1"))
    # and the CLI still lists everything, warnings on stderr
    result = CliRunner().invoke(cli, ["--sysfs-root", str(root), "list", "--json"])
    assert result.exit_code == 0
    assert "warning: 2-2.4.2: speed" in result.stderr
    assert {d["port"] for d in json.loads(result.stdout)} >= {"2-2.4.2", "2-2.4.1"}


def test_device_that_vanishes_is_skipped(tmp_path: Path) -> None:
    root = _copy("mixed", tmp_path)
    shutil.rmtree(_device_dir(root, "2-2.4.2"))  # unplugged between listdir and read
    ports = {d.port for d in read_devices(root)}
    assert "2-2.4.2" not in ports and "2-2.4.1" in ports


def test_no_usb_at_all_is_an_empty_list(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    assert read_devices(tmp_path) == []
    result = CliRunner().invoke(cli, ["--sysfs-root", str(tmp_path), "list"])
    assert result.exit_code == 0
    assert "no USB devices" in result.stderr


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--sysfs-root", str(tmp_path / "nope"), "list"])
    assert result.exit_code == 2  # click rejects a directory that does not exist
    with pytest.raises(sysfs.SysfsError):
        sysfs.scan(tmp_path / "nope")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_descriptor_parser_never_raises(data: bytes) -> None:
    parsed = sysfs.parse_descriptors(data)
    for interfaces in parsed.configs.values():
        for alts in interfaces.values():
            for alt in alts:
                for ep in alt.endpoints:
                    assert ep.bandwidth_bps(480.0) >= 0


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_descriptor_parser_on_mutated_real_descriptors(data: st.DataObject) -> None:
    real = (_device_dir(FIXTURES / "mixed", "2-2.1") / "descriptors").read_bytes()
    pos = data.draw(st.integers(0, len(real) - 1))
    byte = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(pos, len(real)))
    mutated = real[:pos] + bytes([byte]) + real[pos + 1 : cut]
    sysfs.parse_descriptors(mutated)


def test_tree_and_table_render(tmp_path: Path) -> None:
    root = FIXTURES / "mixed"
    tree = CliRunner().invoke(cli, ["--sysfs-root", str(root), "list", "--tree"])
    assert tree.exit_code == 0
    lines = tree.stdout.splitlines()
    nested = next(line for line in lines if "2-2.4.2" in line)
    hub = next(line for line in lines if "2-2.4 " in line)
    assert nested.index("2-2.4.2") > hub.index("2-2.4")  # deeper indent
    table = CliRunner().invoke(cli, ["--sysfs-root", str(root), "list"])
    assert table.exit_code == 0
    assert "2-2.4.2" in table.stdout and "usbhid" in table.stdout
