"""Lab proof of the config form: both sides are ``vmplug run``.

The device host is a real Linux guest (the lab guest, emulated ``usb-kbd``,
``usb-storage``, ``usb-audio``) running ``vmplug run`` with ``[export]``
rules and its API on mutual TLS; nothing names a port path or an endpoint
port.  The VM host is ``vmplug run`` on this machine whose ``[host.devhost]``
has only the address, the API port and the certificates, and one rule
``via-host "devhost"``.  The proof is the VM's own kernel (a second real
guest), read through its guest agent: each device appears with its driver
bound.  Then a replug on the device host, and the VM host's vmplug killed
-9 and restarted (it adopts the usb-redir devices: nothing twice).
"""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.remote.labrig import GUEST_IP, KBD, REMOTES, RemoteLab
from tests.support.vmplugproc import Proc, wait
from vmplug_lab.guest import GuestProcess, LabError, lab_unavailable_reason

pytestmark = [pytest.mark.lab, pytest.mark.long_lab, pytest.mark.timeout(1500)]


class RunLab(RemoteLab):
    """The remote lab with ``vmplug run`` as the device host's export side."""

    def start_devhost(self) -> GuestProcess:
        d = self.root / "dev"
        rules = "".join(f"[[export.rule]]\nmatch = 'id {r.ids}'\n\n" for r in self.remotes)
        cfg = d / "devhost.toml"
        own = f"/tmp/vmplug-devhost-{self.api_port}"  # the guest's own tmpfs: SQLite locks there
        cfg.write_text(
            f'[daemon]\nsocket = "{own}/api.sock"\ndatabase = "{own}/vmplug.db"\n\n'
            f'[api]\nlisten = "{GUEST_IP}:{self.api_port}"\n\n'
            f'[export]\nname = "devhost"\ncerts = "{d}/pki"\nlisten = "{GUEST_IP}"\n'
            f'allow = ["vmhost"]\nports = "{self.port}-{self.port + len(self.remotes) - 1}"\n\n'
            + rules
        )
        self.serve = self.dev.spawn(
            f"sh -c 'mkdir -p {own} && exec python3 -m vmplug --config {cfg} run --events kernel'",
            log=str(self.serve_log),
        )
        deadline = time.monotonic() + 400
        while True:
            try:
                listing = self.export_list()
                if sum(1 for r in listing["devices"] if r["present"]) == len(self.remotes):
                    return self.serve
            except (OSError, ValueError):
                pass
            if self.dev.poll(self.serve) is not None:
                raise LabError(f"device host's vmplug exited: {self.serve_log.read_text()}")
            if time.monotonic() > deadline:
                raise LabError(
                    f"device host's vmplug not up in 400 s: {self.serve_log.read_text()}"
                )
            time.sleep(1)

    def export_list(self) -> Any:
        """``GET /v1/export`` of the device host, with the VM host's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.vmhost.ca))
        ctx.load_cert_chain(self.vmhost.cert, self.vmhost.key)
        url = f"https://127.0.0.1:{self.api_port}/v1/export"
        with urllib.request.urlopen(url, context=ctx, timeout=20) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"lab guest unavailable: {reason}")
    rig = RunLab(Path(tmp_path_factory.mktemp("remoterun")), same_ports=True)
    try:
        rig.boot()
        rig.start_devhost()
        yield rig
    finally:
        rig.kill_export()
        rig.close()


@pytest.fixture(scope="module")
def vmhost(lab: RunLab) -> Iterator[Proc]:
    proc = Proc(
        lab.root,
        "vmhost",
        "minimal",
        f'[vm.vm]\nqmp = "{lab.vm_qmp}"\n\n'
        '[[rule]]\nattach = "vm"\nmatch = \'via-host "devhost"\'\n\n'
        f'[host.devhost]\naddress = "127.0.0.1"\napi_port = {lab.api_port}\n'
        f'certs = "{lab.vmhost.cert.parent}"\nme = "vmhost"\n',
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


def _remote_rows(vmhost: Proc) -> list[dict[str, Any]]:
    return [r for r in vmhost.json("list") if r.get("host") == "devhost"]


def test_rules_on_both_hosts_bring_the_devices_into_the_vms_kernel(
    lab: RunLab, vmhost: Proc
) -> None:
    t0 = time.monotonic()
    for remote in REMOTES:
        lab.wait_in_guest(remote, timeout=240)
    took = time.monotonic() - t0
    print(f"vmplug run (VM host) start -> all 3 bound in the VM's kernel: {took:.1f} s")
    seen = {d["ids"]: d for d in lab.guest_devices().values()}
    for remote in REMOTES:
        assert remote.ids in seen, seen
        assert remote.driver in seen[remote.ids]["drivers"].replace("_", "-"), seen
    rows = wait(
        lambda: (r := _remote_rows(vmhost)) and all(x["state"] == "attached" for x in r) and r,
        "every remote device attached in vmhost's list",
        vmhost,
    )
    ids = sorted(f"{r['vendor_id']}:{r['product_id']}" for r in rows)
    assert ids == sorted(r.ids for r in REMOTES)
    holders = {r["device"]["vendor_id"]: r["holder"] for r in lab.export_list()["devices"]}
    assert set(holders.values()) == {"vmhost"}, holders


def test_replug_on_the_device_host_comes_back(lab: RunLab, vmhost: Proc) -> None:
    lab.dev.unplug(KBD.lab.id)
    lab.wait_in_guest(KBD, present=False)
    lab.dev.hotplug(KBD.lab)
    took = lab.wait_in_guest(KBD, timeout=180)
    print(f"replug on the device host -> bound in the VM's kernel: {took:.1f} s")


def test_vm_host_killed_and_restarted_adopts(lab: RunLab, vmhost: Proc) -> None:
    vmhost.stop(signal.SIGKILL)
    vmhost.sock.unlink(missing_ok=True)
    vmhost.start()
    wait(
        lambda: (
            (r := _remote_rows(vmhost))
            and len(r) == len(REMOTES)
            and all(x["state"] == "attached" for x in r)
        ),
        "the remote devices adopted",
        vmhost,
        timeout=120,
    )
    for remote in REMOTES:
        lab.wait_in_guest(remote, timeout=30)
    history = vmhost.json("history", "-n", "500")
    starts = [i for i, e in enumerate(history) if e["kind"] == "daemon-start"]
    after = history[starts[-1] :]
    assert sum(1 for e in after if e["kind"] == "adopt") == len(REMOTES), after
    assert not [e for e in after if e["kind"] == "attach"], after
