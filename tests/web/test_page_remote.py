"""The page shows remote devices in their device host's own tree, with real parts.

A device host is a real ``vmplug run`` with ``[export]`` rules and its API on
mutual TLS; two VM hosts are real ``vmplug run`` processes, each with a real
QEMU and its API on loopback TCP with a bearer token (the page's listener);
all on loopback, as in tests/remote/test_remote_inventory.py.  VM host A holds
the device host's keyboard; on VM host B's page the same device is *held*.
Each page is read in Debian's Chromium: the remote device sits in a tree of
its own, named after its device host, and this host's devices in the top-level
bus tree; without the per-host tree the remote device would land in this
host's "Bus 2" beside the local tablet, and the test fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page

from tests.support.remoterig import PORT, RemoteRig
from tests.support.vmplugproc import Proc, free_port, wait
from tests.web.conftest import card

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(150),
    pytest.mark.skipif(shutil.which("usbredirect") is None, reason="usbredirect not installed"),
]

LOCAL = "2-1"  # each VM host's own tablet (capture "minimal")
TOKEN = "page-remote-token-0123456789abcdef"
REMOTE = f"devhost:{PORT}"  # the page's key of a remote device: HOST:PORT


class Rig(RemoteRig):
    """The remote rig, each VM host with its web API (a bearer token) on loopback TCP."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.web: dict[str, str] = {}

    def vmhost(self, me: str, extra: str = "") -> Proc:
        token = self.tmp / f"{me}.token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        web = free_port()
        self.web[me] = f"http://127.0.0.1:{web}"
        return super().vmhost(
            me, extra + f'[api]\nlisten = "127.0.0.1:{web}"\ntoken_file = "{token}"\n\n'
        )


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Up once for the module: A holds the device host's keyboard, B sees it held."""
    r = Rig(tmp_path_factory.mktemp("page-remote"))
    try:
        r.devhost.start()
        a = r.vmhost("vmhost-a")
        a.start()
        wait(lambda: any(r.redirs("vmhost-a").values()), "vmhost-a's usb-redir connected", a)
        b = r.vmhost("vmhost-b")
        b.start()
        wait(lambda: b.json("status")["held"], "vmhost-b sees the device held", b)
        yield r
    finally:
        r.close()


async def page_of(browser: Browser, base: str) -> tuple[Page, list[str]]:
    """VM host ``base``'s page, live; its errors collect in the list."""
    ctx = await browser.new_context()
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(f"{base}/?token={TOKEN}")
    await page.wait_for_selector("#live[data-state=live]", timeout=15000)
    return page, errors


async def trees(page: Page) -> dict[str, list[str]]:
    """The rows' keys per tree: "" for this host's buses, else the device host's name."""
    found: dict[str, list[str]] = await page.evaluate(
        """() => {
          const out = {};
          for (const top of document.querySelectorAll("#tree > li")) {
            const host = top.classList.contains("host") ? top.dataset.host : "";
            out[host] = (out[host] || []).concat(
              [...top.querySelectorAll("li.dev")].map((li) => li.dataset.port));
          }
          return out;
        }"""
    )
    return found


async def badge(page: Page, key: str) -> str:
    return str(await page.locator(f'#tree li.dev[data-port="{key}"] > .row .badge').inner_text())


async def test_page_shows_remote_devices_per_device_host(browser: Browser, rig: Rig) -> None:
    # VM host A: the keyboard in devhost's own tree, in VM guest, its card there
    page, errors = await page_of(browser, rig.web["vmhost-a"])
    await page.wait_for_selector(card("guest", REMOTE), timeout=15000)
    assert await trees(page) == {"": [LOCAL], "devhost": [REMOTE]}
    host = page.locator('#tree > li.host[data-host="devhost"]')
    assert await host.locator(":scope > .hostname").inner_text() == "devhost (device host)"
    assert await host.locator("li.bus > .busname").all_text_contents() == ["Bus 2"]
    assert await badge(page, REMOTE) == "in guest"
    assert await badge(page, LOCAL) == "host"
    assert await page.locator(card("guest", REMOTE)).locator(".port").inner_text() == PORT
    assert errors == []

    # VM host B: the same device, held by A: shown as held, in no VM's column
    page, errors = await page_of(browser, rig.web["vmhost-b"])
    await page.wait_for_selector(f'#tree li.dev[data-port="{REMOTE}"]', timeout=15000)
    assert await trees(page) == {"": [LOCAL], "devhost": [REMOTE]}
    row = page.locator(f'#tree li.dev[data-port="{REMOTE}"] > .row')
    assert await badge(page, REMOTE) == "held by vmhost-a"
    assert await row.locator(".badge.s-held").count() == 1
    assert await page.locator(card("guest", REMOTE)).count() == 0
    assert errors == []


def test_list_tree_shows_remote_devices_under_their_host(rig: Rig) -> None:
    """``vmplug list --tree`` against the real daemons: the remote keyboard under
    a heading of its device host, after this host's buses, with its VM or holder."""
    a, b = rig.vmhosts["vmhost-a"], rig.vmhosts["vmhost-b"]
    shown = a.vmplug("list", "--tree")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    [head] = [i for i, line in enumerate(lines) if "(device host, usb-redir)" in line]
    assert "devhost" in lines[head]
    assert any(LOCAL in line for line in lines[:head])  # this host's tablet first
    assert PORT not in "".join(lines[:head])
    [row] = [line for line in lines[head + 1 :] if PORT in line]
    assert "vm guest" in row and "0627:0001" in row
    assert row.index(PORT) > lines[head].index("devhost")  # nested under the heading
    held = b.vmplug("list", "--tree", "--host", "devhost")
    assert held.returncode == 0, held.stderr
    assert LOCAL not in held.stdout  # --host: only that device host's
    assert "vm guest (held by vmhost-a)" in held.stdout
    none = b.vmplug("list", "--tree", "--host", "nosuch")
    assert none.returncode == 1
    assert "no devices of device host 'nosuch'" in none.stderr
