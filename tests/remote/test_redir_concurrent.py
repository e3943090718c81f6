"""Several remote devices of one device host attached to one VM at the same
moment (a VM host's first pass after start, or a device host coming back):
the host's TLS credentials object is made once and every attach succeeds.

Seen in the lab before the fix: two of three simultaneous attaches failed
with QEMU's ``Duplicate ID 'vmplug-tls-devhost' for object``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.remote.conftest import Pki, running_vm
from tests.support.qemu_proc import QemuFactory
from vmplug.vms.base import UsbRedirSpec
from vmplug.vms.qmp import QmpVm
from vmplug.wire.qmp import SyncQmp

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]


async def test_simultaneous_attaches_share_one_tls_object(
    pki: Pki, qemu: QemuFactory, make_vm: Callable[..., QmpVm]
) -> None:
    vm, probe = await running_vm(qemu, make_vm)
    tls = pki.qemu_dir(pki.vmhost, "vmhost")
    ids = [f"vmplug-remote{n:04d}" for n in range(4)]
    # nobody listens on these ports: the chardevs keep reconnecting, which is
    # what a device host that is still coming up looks like
    specs = [UsbRedirSpec("127.0.0.1", 7190 + n, "devhost", str(tls)) for n in range(4)]
    results = await asyncio.gather(
        *(vm.attach(dev_id, spec) for dev_id, spec in zip(ids, specs, strict=True)),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert set(await vm.observe()) == set(ids)

    def tls_objects() -> list[str]:
        with SyncQmp(probe) as q:
            found = q.execute("qom-list", {"path": "/objects"})
        return [o["name"] for o in found if o["name"].startswith("vmplug-tls-")]

    assert await asyncio.to_thread(tls_objects) == ["vmplug-tls-devhost"]
