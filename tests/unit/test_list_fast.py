"""What the `list --json` speed-ups (issue 16) must not change: a descriptors
blob's cached reading follows the blob, read_devices' serial flags are
mark_shared_serials', and the built-in SHA-256 gives hashlib's digests."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
from pathlib import Path

from vmplug.host import sysfs
from vmplug.host.inventory import mark_shared_serials, name_devices, read_devices
from vmplug.model import UsbDevice

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sysfs"


def _fields(dev: UsbDevice) -> dict[str, object]:
    return {f.name: getattr(dev, f.name) for f in dataclasses.fields(dev)}  # warnings too


def test_a_changed_blob_is_read_anew_and_the_cached_one_stays_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(FIXTURES / "mixed", root, symlinks=True)
    kbd = (root / "bus/usb/devices/2-2.4.2").resolve()
    before = {d.port: d for d in read_devices(root)}
    blob = (kbd / "descriptors").read_bytes()
    changed = bytearray(blob)
    changed[10] ^= 0x01  # idProduct
    changed[18 + 9 + 5] ^= 0x01  # the first interface's class
    (kbd / "descriptors").write_bytes(bytes(changed))
    after = {d.port: d for d in read_devices(root)}
    old, new = before["2-2.4.2"], after["2-2.4.2"]
    assert old.product_id is not None and new.product_id == old.product_id ^ 0x01
    assert new.interfaces[0].cls == old.interfaces[0].cls ^ 0x01
    assert new.descriptors_sha256 != old.descriptors_sha256
    assert new.descriptor_interfaces != old.descriptor_interfaces
    # the same blob as before reads as before, field by field, in every device
    (kbd / "descriptors").write_bytes(blob)
    again = {d.port: d for d in read_devices(root)}
    assert {p: _fields(d) for p, d in again.items()} == {p: _fields(d) for p, d in before.items()}
    # and a parse taken from the cache is the parser's own
    assert sysfs._blob(blob).parsed == sysfs.parse_descriptors(blob)


def test_read_devices_flags_shared_serials_as_mark_shared_serials_does() -> None:
    for tree in ("identical", "mixed", "minimal"):
        marked = mark_shared_serials(name_devices(sysfs.scan(FIXTURES / tree)))
        got = read_devices(FIXTURES / tree)
        assert [_fields(d) for d in got] == [_fields(d) for d in marked], tree
    shared = [d for d in read_devices(FIXTURES / "identical") if not d.serial_unique]
    assert len(shared) >= 2  # the capture really has twins sharing one serial
    assert all("/port=" in d.identity for d in shared)


def test_the_digests_are_hashlibs() -> None:
    for data in (b"", b"/devices/pci0000:00/0000:00:14.0", bytes(range(256)) * 5):
        want = base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert sysfs._b64sha256(data) == want
    dev = read_devices(FIXTURES / "mixed")[-1]
    digest = hashlib.sha256(dev.identity.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    assert dev.qemu_id == f"vmplug-{digest}" == dev.to_json()["qemu_id"]
