"""The web page in Debian's Chromium (headless, driven by Playwright) against the real
daemon, real QEMU VMs and replayed uevents.

What the page shows is checked in the DOM; what a click does is checked on
QEMU itself over QMP.  Screenshots go to pytest's tmp dir and test-artifacts/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser

from tests.support.apirig import TOKEN, ApiRig
from tests.web.conftest import card, keep, open_page
from vmplug.api.security import Sessions

pytestmark = pytest.mark.qemu

KBD = "2-2.4.2"
TABLET = "1-3"


async def test_tree_click_attach_and_live_unplug(
    rig: ApiRig, browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    await rig.up()
    await rig.wait_ports("a", {KBD})
    page, errors = await open_page(browser, rig, viewport={"width": 1280, "height": 900})
    # the host's tree: hubs with their devices nested, every device of the capture
    await page.wait_for_selector(f'#tree li.hub[data-port="2-2"] li[data-port="{KBD}"]')
    shown = await page.eval_on_selector_all("#tree li.dev", "els => els.map(e => e.dataset.port)")
    assert rig.daemon is not None
    assert sorted(shown) == sorted(rig.daemon.inventory)
    # the VMs as columns, the keyboard where it is: in VM a
    await page.wait_for_selector(card("a", KBD))
    assert await page.locator("section.vm").count() == 2
    # one click on a device shows its history and health ...
    await page.click(f'#tree li[data-port="{TABLET}"] > .row button.name')
    await page.wait_for_selector("#details:not([hidden]) #d-health .fig")
    assert "host" in (await page.text_content("#d-info") or "")
    # ... and one click attaches it: QEMU b really holds it
    await page.click('#d-actions button.go[data-vm="b"]')
    await rig.wait_ports("b", {TABLET})
    await page.wait_for_selector(card("b", TABLET))
    assert await rig.ports("a") == {KBD}
    # drag it from b onto a: it moves in QEMU too
    await page.drag_and_drop(card("b", TABLET), 'section.vm[data-vm="a"]')
    await rig.wait_ports("a", {KBD, TABLET})
    await rig.wait_ports("b", set())
    await page.wait_for_selector(card("a", TABLET))
    # the open details follow the move too
    await page.wait_for_function("document.querySelector('#d-info').textContent.includes('in a')")
    shot = tmp_path / "vmplug-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    # an unplug event moves the keyboard off the page without a reload
    await page.evaluate("window.__noReload = 42")
    rig.kernel.unplug(KBD)
    await page.wait_for_selector(card("a", KBD), state="detached", timeout=20000)
    await page.wait_for_selector(f'#tree li[data-port="{KBD}"]', state="detached")
    assert await page.evaluate("window.__noReload") == 42
    await rig.wait_ports("a", {TABLET})
    # and its replug brings it back, attached by its rule, still without a reload
    rig.kernel.plug(KBD)
    await page.wait_for_selector(card("a", KBD) + ":not(.s-pending)", timeout=20000)
    assert await page.evaluate("window.__noReload") == 42
    await rig.wait_ports("a", {KBD, TABLET})
    assert errors == []
    print(f"\nscreenshot: {keep(shot, artifacts)}")
    # a daemon restart forgets sessions: the next update sends the page to the login
    # form, and the form (a same-origin POST with its Origin) signs in again
    assert rig.api is not None
    rig.api.sessions = Sessions()
    rig.kernel.unplug(TABLET)
    await page.wait_for_selector('form[action="/login"]', timeout=20000)
    await page.fill('input[name="token"]', TOKEN)
    await page.click('button[type="submit"]')
    await page.wait_for_selector(card("a", KBD))
    assert await page.locator(f'#tree li[data-port="{TABLET}"]').count() == 0


async def test_phone_width_has_no_sideways_scroll_and_every_control_is_reachable(
    rig: ApiRig, browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    await rig.up()
    await rig.wait_ports("a", {KBD})
    page, errors = await open_page(
        browser,
        rig,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    await page.wait_for_selector(card("a", KBD))
    await page.click(f'#tree li[data-port="{TABLET}"] > .row button.name')
    await page.wait_for_selector("#details:not([hidden]) #d-health .fig")
    widths = await page.evaluate(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]"
    )
    assert max(widths[:2]) <= widths[2] == 390, widths
    # every button and select lies inside the screen's width
    boxes = await page.eval_on_selector_all(
        "button, select",
        """els => els.filter(e => e.offsetParent !== null).map(e => {
             const r = e.getBoundingClientRect();
             return [e.outerHTML.slice(0, 60), r.left, r.right, r.width, r.height];
           })""",
    )
    assert len(boxes) > 10
    for html, left, right, width, height in boxes:
        assert left >= 0 and right <= 390 and width > 0 and height > 0, html
    # the last row of the tree scrolls out from under the detail sheet and takes a tap
    await page.tap('#tree li[data-port="3-1"] > .row button.name')
    await page.wait_for_function("document.querySelector('#d-info').textContent.startsWith('3-1 ')")
    await page.tap(f'#tree li[data-port="{TABLET}"] > .row button.name')
    await page.wait_for_function(
        f"document.querySelector('#d-info').textContent.startsWith('{TABLET} ')"
    )
    shot = tmp_path / "vmplug-phone.png"
    await page.screenshot(path=str(shot), full_page=True)
    # the detail sheet's buttons work at this width: the tablet goes to b
    await page.tap('#d-actions button.go[data-vm="b"]')
    await rig.wait_ports("b", {TABLET})
    # and the per-device menu moves it on: to a
    menu = f'#tree li[data-port="{TABLET}"] > .row select.to'
    await page.tap(menu)  # the menu gets its VMs when reached for
    await page.select_option(menu, "a")
    await rig.wait_ports("a", {KBD, TABLET})
    await rig.wait_ports("b", set())
    assert errors == []
    print(f"\nscreenshot: {keep(shot, artifacts)}")
