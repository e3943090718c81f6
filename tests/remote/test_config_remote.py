"""``[export]`` and ``[host.NAME]`` in the config: parsed, and refused with
the line and a reason when wrong."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from tests.support.devices import DEVICES
from vmplug.config import ConfigError, parse_config
from vmplug.errors import UsageError
from vmplug.remote import certs
from vmplug.remote.devicehost import preferred_port
from vmplug.remote.serve import exporter_from_config

GOOD = """
[export]
name = "devbox"
certs = "/etc/vmplug/pki"
listen = "0.0.0.0"
allow = ["server1"]

[export.device.kbd]
port_path = "2-1"
port = 7101
vendor = "0627"
product = "0001"

[export.device.stick]
port_path = "1-1.4"
port = 7102

[host.devbox]
address = "devbox.lan"
certs = "/etc/vmplug/pki"
me = "server1"
devices = { kbd = 7101, stick = 7102 }
"""


def test_export_and_hosts_are_read() -> None:
    cfg = parse_config(GOOD)
    assert cfg.export is not None
    assert (cfg.export.name, cfg.export.certs, cfg.export.allow) == (
        "devbox",
        "/etc/vmplug/pki",
        ("server1",),
    )
    kbd, stick = cfg.export.devices
    assert (kbd.name, kbd.port_path, kbd.port, kbd.vendor, kbd.product) == (
        "kbd",
        "2-1",
        7101,
        0x0627,
        0x0001,
    )
    assert (stick.port_path, stick.vendor) == ("1-1.4", None)
    host = cfg.hosts["devbox"]
    assert (host.address, host.me, host.reconnect, dict(host.devices)) == (
        "devbox.lan",
        "server1",
        1,
        {"kbd": 7101, "stick": 7102},
    )


def test_no_sections_no_remote() -> None:
    cfg = parse_config("")
    assert cfg.export is None and dict(cfg.hosts) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[export]\nname = 'x'\n", 'certs = "DIR" is needed'),
        (
            "[export]\ninsecure = true\n[export.device.k]\nport_path = 'usb1'\nport = 1\n",
            "port_path",
        ),
        (
            "[export]\ninsecure = true\n[export.device.k]\nport_path = '2-1'\nport = 70000\n",
            "TCP port",
        ),
        (
            "[export]\ninsecure = true\n[export.device.k]\n"
            "port_path = '2-1'\nport = 1\nvendor = 'x'\n",
            "4 hex",
        ),
        ("[export]\ncerts = 'relative'\n", "must be absolute"),
        ("[export]\ninsecure = true\nsurprise = 1\n", "unknown key 'surprise'"),
        ("[host.a]\ncerts = '/p'\n", 'address = "HOST" is needed'),
        ("[host.a]\naddress = 'h'\n", "insecure = true"),
        ("[host.a]\naddress = 'h'\ninsecure = true\ndevices = { k = 'x' }\n", "TCP port"),
    ],
)
def test_bad_sections_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text)
    assert info.value.render()  # a message with the place, never a traceback


async def test_export_section_builds_its_endpoints(tmp_path: Path) -> None:
    """[export] -> one mutual-TLS endpoint per device, listening; a bad certificate is refused."""
    pki = tmp_path / "pki"
    certs.make_ca(pki)
    certs.issue(pki, "devbox", addresses=["127.0.0.1"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = (
        f'[export]\nname = "devbox"\ncerts = "{pki}"\nlisten = "127.0.0.1"\nallow = ["vm1"]\n'
        f'[export.device.kbd]\nport_path = "2-1"\nport = {port}\n'
    )
    export = parse_config(text).export
    assert export is not None
    exporter = exporter_from_config(export, sysfs=tmp_path)
    await exporter.start()
    try:
        (row,) = exporter.to_json()
        assert (row["name"], row["listen"], row["tls"]) == ("kbd", f"127.0.0.1:{port}", True)
        ep = exporter.endpoints[0]
        assert ep.allow == frozenset({"vm1"})
    finally:
        await exporter.stop()
    (pki / "devbox-key.pem").chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        exporter_from_config(export, sysfs=tmp_path)


RULES = """
[export]
name = "studio"
certs = "/etc/vmplug/pki"
ports = "7300-7310"

[[export.rule]]
match = 'id 0627:0001'
block = true

[[export.rule]]
match = 'with-interface one-of { 01:*:* }'

[host.studio]
address = "studio.lan"
api_port = 7400
certs = "/etc/vmplug/pki"
me = "server1"

[api]
listen = "0.0.0.0:7200"
"""


def test_export_rules_ports_and_a_host_without_devices() -> None:
    cfg = parse_config(RULES)
    assert cfg.export is not None
    assert cfg.export.ports == (7300, 7310)
    assert [r.block for r in cfg.export.rules] == [True, False]
    host = cfg.hosts["studio"]
    assert (host.api_port, dict(host.devices)) == (7400, {})
    assert cfg.api.listen == "0.0.0.0:7200"  # a device host's API faces the network
    audio, kbd = DEVICES["scarlett-4i4"], DEVICES["qemu-kbd"]
    # the first matching rule decides; no rule: stays; hubs and remote devices never leave
    assert cfg.export.allows(audio)
    assert not cfg.export.allows(kbd)  # 0627:0001: blocked by the first rule
    assert not cfg.export.allows(DEVICES["qemu-storage"])  # no rule names it
    assert not cfg.export.allows(dataclasses.replace(audio, host="other"))
    assert not cfg.export.allows(DEVICES["qemu-hub"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\nlisten = '0.0.0.0:7200'\n", "loopback only"),  # no [export]: no
        ("[export]\ninsecure = true\nports = '7200'\n", "FIRST-LAST"),
        ("[export]\ninsecure = true\nports = '7300-7200'\n", "FIRST-LAST"),
        ("[export]\ninsecure = true\n[[export.rule]]\nblock = true\n", "missing match"),
        ("[export]\ninsecure = true\n[[export.rule]]\nmatch = 'id 12'\n", "bad match rule"),
        ("[export]\ninsecure = true\n[[export.rule]]\nmatch = 'id 1:2'\nx = 1\n", "unknown key"),
        (
            "[export]\ninsecure = true\nports = '7100-7199'\n"
            "[export.device.k]\nport_path = '2-1'\nport = 7150\n",
            "lies in ports",
        ),
        ("[host.a]\naddress = 'h'\ninsecure = true\napi_port = 0\n", "TCP port"),
    ],
)
def test_bad_rule_forms_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text)
    assert info.value.render()


def test_ports_are_stable_per_identity_and_in_range() -> None:
    ids = [d.identity for d in DEVICES.values()]
    first = [preferred_port(i, 7100, 7199) for i in ids]
    assert first == [preferred_port(i, 7100, 7199) for i in ids]  # the same on every start
    assert all(7100 <= p <= 7199 for p in first)
    assert len(set(first)) > 1
