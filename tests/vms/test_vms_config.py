"""[vm.NAME] kinds: exactly one of qmp / libvirt / container / proxmox."""

from __future__ import annotations

import pytest

from vmplug.config import ConfigError, parse_config
from vmplug.vms.base import VmEvent
from vmplug.vms.container import ContainerVm
from vmplug.vms.factory import make_backend
from vmplug.vms.libvirt import DEFAULT_URI, LibvirtVm
from vmplug.vms.proxmox import ProxmoxVm
from vmplug.vms.qmp import QmpVm


def test_each_kind_loads_and_picks_its_backend() -> None:
    cfg = parse_config(
        """
[vm.plain]
qmp = "/run/plain.sock"

[vm.win11]
libvirt = "win11"
persist = true

[vm.box]
container = "windows"
uri = "unix:///run/podman/podman.sock"

[vm.pve]
proxmox = 101
"""
    )
    kinds = {name: vm.kind for name, vm in cfg.vms.items()}
    assert kinds == {"plain": "qmp", "win11": "libvirt", "box": "container", "pve": "proxmox"}
    assert cfg.vms["pve"].shared, "Proxmox sockets are always shared"
    assert cfg.vms["win11"].qmp == "" and cfg.vms["win11"].where == "libvirt:win11"

    def noop(_event: VmEvent) -> None:
        return None

    backends = {n: make_backend(vm, noop) for n, vm in cfg.vms.items()}
    assert type(backends["plain"]) is QmpVm
    lv = backends["win11"]
    assert isinstance(lv, LibvirtVm) and lv.uri == DEFAULT_URI and lv.persist
    box = backends["box"]
    assert isinstance(box, ContainerVm) and box.uri == "unix:///run/podman/podman.sock"
    pve = backends["pve"]
    assert isinstance(pve, ProxmoxVm)
    assert pve.address == "/var/run/qemu-server/101.qmp" and pve.shared


@pytest.mark.parametrize(
    ("text", "line", "col", "words"),
    [
        ('[vm.a]\nqmp = "/x"\nlibvirt = "d"\n', 3, 11, "exactly one of"),
        ("[vm.a]\nshared = true\n", 1, None, "missing qmp"),
        ('[vm.a]\nlibvirt = "d"\nshared = true\n', 3, 10, "libvirt serves many"),
        ("[vm.a]\nproxmox = 7\n", 2, 11, "not a Proxmox VMID"),
        ('[vm.a]\nproxmox = "101"\n', 2, 11, "must be an integer"),
        ("[vm.a]\nproxmox = 101\nshared = false\n", 3, 10, "always shares"),
        ('[vm.a]\nqmp = "/x"\nuri = "qemu:///system"\n', 3, 7, "uri applies"),
        ('[vm.a]\ncontainer = "w"\nuri = "tcp://1.2.3.4:2375"\n', 3, 7, "unix socket"),
        ('[vm.a]\ncontainer = "w x"\n', 2, 13, "not a container name"),
        ('[vm.a]\nqmp = "/x"\npersist = true\n', 3, 11, "libvirt VMs only"),
        ('[vm.a]\nlibvirt = "d"\nusb_bus = "xhci.0"\n', 3, 11, "usb_bus applies"),
    ],
)
def test_errors_point_at_the_key(text: str, line: int, col: int | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/vmplug/vmplug.toml")
    err = info.value
    assert words in err.message
    assert (err.line, err.column) == (line, col)
    assert err.render().startswith(f"/etc/vmplug/vmplug.toml:{line}")
