"""The page as a person sees it: screenshots at desktop and phone width, the
timelines drawn from a real daemon's journal, and a hostile device tree.

Everything runs against the real daemon, real QEMU VMs and replayed uevents
(tests/support/apirig.py).  The checks are what a person would notice: the panes
do not overlap, nothing scrolls sideways, the coloured spans are where the
journal says the device was unplugged and attached again, and a device whose
strings are escape sequences, newlines, ``<script>`` and 5,000 characters is
shown cut, with its escapes visible, and runs nothing.  Screenshots are kept in
test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.support.apirig import FIXTURES, ApiRig
from tests.web.conftest import card, open_page
from vmplug.textsafe import printable

pytestmark = pytest.mark.qemu

KBD = "2-2.4.2"
TABLET = "1-3"
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1024, "height": 768}

# what a device may say about itself (a BadUSB stick can say anything)
HOSTILE_MAKER = "X\n\x1b[2J\x1b[31mRED\x1b[0m" + "M" * 5000
HOSTILE_PRODUCT = (
    '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    "\r\nFAKE 9-9 row\x07\u202eevil\u200b\u2028\U000e0041\\x1b"
)
HOSTILE_SERIAL = "S1\n\x1b]0;title\x07<b>bold</b>"


async def select(page: Page, port: str) -> None:
    await page.click(f'#tree li[data-port="{port}"] > .row button.name')
    await page.wait_for_function(
        f"document.querySelector('#d-info').textContent.startsWith('{port} ')"
    )
    await page.wait_for_selector("#details:not([hidden]) #d-health .fig")
    await page.wait_for_selector("#d-facts dt")


async def no_sideways_scroll(page: Page) -> None:
    widths = await page.evaluate("[document.scrollingElement.scrollWidth, innerWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways: {widths}"


async def panes_apart(page: Page) -> dict[str, list[float]]:
    """The tree, the VM columns and the detail panel: visible, and none over another."""
    boxes: dict[str, list[float]] = await page.evaluate(
        """() => Object.fromEntries(['#host', '.vms-pane', '#details', '#hostbar'].map(sel => {
             const r = document.querySelector(sel).getBoundingClientRect();
             return [sel, [r.left, r.top + scrollY, r.right, r.bottom + scrollY]];
           }))"""
    )
    for name, (left, top, right, bottom) in boxes.items():
        assert right - left > 100 and bottom - top > 40, (name, boxes)
        assert left >= 0 and right <= await page.evaluate("innerWidth"), (name, boxes)
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ax0, ay0, ax1, ay1 = boxes[a]
            bx0, by0, bx1, by1 = boxes[b]
            apart = ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
            assert apart, f"{a} overlaps {b}: {boxes}"
    return boxes


def rgb(css: str) -> tuple[int, int, int]:
    inner = css[css.index("(") + 1 : css.index(")")]
    r, g, b = (int(float(p)) for p in inner.split(",")[:3])
    return r, g, b


async def spans(page: Page, where: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.eval_on_selector_all(
        f"{where} svg.tl rect.span",
        """els => els.map(e => ({state: e.dataset.state, start: +e.dataset.start,
             end: +e.dataset.end, fill: getComputedStyle(e).fill,
             width: e.getBoundingClientRect().width}))""",
    )
    return found


def check_colour(state: str, fill: str) -> None:
    """What the colour says to a person: green is attached, red failed, amber waiting,
    grey unplugged."""
    r, g, b = rgb(fill)
    if state in ("attached", "up"):
        assert g > r + 40 and g > b + 40, (state, fill)
    elif state == "failed":
        assert r > g + 80 and r > b + 80, (state, fill)
    elif state == "waiting":
        assert r > b + 80 and g > b + 40, (state, fill)
    elif state in ("unplugged", "down"):
        assert max(r, g, b) - min(r, g, b) < 40 and min(r, g, b) > 150, (state, fill)


async def test_timelines_follow_the_journal_at_desktop_and_phone_width(
    rig: ApiRig, browser: Browser, artifacts: Path
) -> None:
    rig.qemu("c", usb=False)  # a VM without a USB controller: every attach to it fails
    await rig.up(vms=("a", "b", "c"))
    await rig.wait_ports("a", {KBD})
    page, errors = await open_page(browser, rig, viewport=DESKTOP)
    await page.wait_for_selector(card("a", KBD))
    # a kind of entry this page does not know (remediation and alert kinds are still
    # to come): written to the daemon's own journal, it must show as a neutral mark
    assert rig.store is not None and rig.daemon is not None
    rig.store.record_event(
        "remediation-port-reset",
        identity=rig.daemon.inventory[KBD].identity,
        port=KBD,
        vm="a",
        detail={"why": "kind unknown to the page"},
    )
    # a replug: the keyboard leaves and comes back, attached by its rule
    rig.kernel.unplug(KBD)
    await page.wait_for_selector(card("a", KBD), state="detached", timeout=20000)
    rig.kernel.plug(KBD)
    await rig.wait_ports("a", {KBD})
    await page.wait_for_selector(card("a", KBD) + ":not(.s-pending)", timeout=20000)
    # the tablet is sent where it cannot go (c has no USB), then where it can (b)
    await select(page, TABLET)
    await page.click('#d-actions button.go[data-vm="c"]')
    await page.wait_for_selector(card("c", TABLET), timeout=20000)
    await page.click('#d-actions button.go[data-vm="b"]')
    await rig.wait_ports("b", {TABLET})
    await page.wait_for_selector(card("b", TABLET))

    # the journal, read by the test itself
    assert rig.store is not None and rig.daemon is not None
    kbd_id = rig.daemon.inventory[KBD].identity
    tab_id = rig.daemon.inventory[TABLET].identity
    journal = rig.store.history(kbd_id, limit=None, include_global=False)
    removed = [e.ts for e in journal if e.kind == "device-remove"]
    added = [e.ts for e in journal if e.kind == "device-add"]
    attached = [e.ts for e in journal if e.kind in ("attach", "adopt") and e.result == "ok"]
    assert len(removed) == 1 and len(added) == 2 and len(attached) >= 2, journal
    tab_journal = rig.store.history(tab_id, limit=None, include_global=False)
    tab_errors = [e for e in tab_journal if e.entry == "action" and e.result != "ok"]
    assert tab_errors and all(e.vm == "c" for e in tab_errors), tab_journal

    # the keyboard's picture: attached, unplugged exactly while the journal says, attached
    await select(page, KBD)
    await page.wait_for_function(
        """() => [...document.querySelectorAll('#d-timeline rect.span')]
                   .map(e => e.dataset.state).join(' ').includes('unplugged')""",
        timeout=15000,
    )
    big = await spans(page, "#d-timeline")
    states = [s["state"] for s in big]
    # the journal says: added (waiting for its VM), attached, unplugged, added again
    # (waiting), attached again; the spans start and end at those entries' times
    assert states == ["waiting", "attached", "unplugged", "waiting", "attached"], big
    expect = [added[0], attached[0], removed[0], added[1], attached[1]]
    assert [s["start"] for s in big] == pytest.approx(expect, abs=1e-3), (big, journal)
    assert [s["end"] for s in big[:-1]] == pytest.approx(expect[1:], abs=1e-3), big
    assert big[2]["width"] > 2  # the unplug is seen, not a sliver
    for sp in big:
        check_colour(sp["state"], sp["fill"])
    other = await page.eval_on_selector_all(
        "#d-timeline g.mark.m-other",
        "els => els.map(e => [e.dataset.kind, e.textContent,"
        " getComputedStyle(e.querySelector('rect')).fill])",
    )
    assert len(other) == 1 and other[0][0] == "remediation-port-reset", other
    assert "remediation-port-reset (a)" in other[0][1], other
    r, g, b = rgb(other[0][2])
    assert max(r, g, b) - min(r, g, b) < 40, other  # neutral: grey, neither good nor bad
    # the same picture in its tree row
    row = await spans(page, f'#tree li[data-port="{KBD}"] > .row')
    assert [s["state"] for s in row] == states

    # the tablet's: on the host, failed (c cannot take it), then attached in b
    await select(page, TABLET)
    await page.wait_for_function(
        """() => [...document.querySelectorAll('#d-timeline rect.span')]
                   .map(e => e.dataset.state).join(' ').includes('attached')""",
        timeout=15000,
    )
    tab = await spans(page, "#d-timeline")
    tstates = [s["state"] for s in tab]
    assert tstates[0] == "host" and tstates[-1] == "attached" and "failed" in tstates, tstates
    for sp in tab:
        check_colour(sp["state"], sp["fill"])
    # each failed attach is a mark on the timeline, its error in the tooltip
    marks = await page.eval_on_selector_all(
        "#d-timeline g.mark.m-error", "els => els.map(e => e.textContent)"
    )
    assert len(marks) == len(tab_errors), (marks, tab_errors)
    assert all("c" in m and "error" in m for m in marks), marks
    # the VM columns have their own: c is up from its vm-up on, with the errors marked
    vm_c = await spans(page, 'section.vm[data-vm="c"]')
    c_up = [e.ts for e in rig.store.history(None, limit=None) if e.kind == "vm-up" and e.vm == "c"]
    assert len(c_up) == 1 and vm_c[-1]["state"] == "up", vm_c
    assert vm_c[-1]["start"] == pytest.approx(c_up[0], abs=1e-3), (vm_c, c_up)
    assert {s["state"] for s in vm_c[:-1]} <= {"down"}, vm_c  # before QMP answered
    check_colour("up", vm_c[-1]["fill"])
    c_marks = await page.locator('section.vm[data-vm="c"] g.mark.m-error').count()
    assert c_marks == len(tab_errors)

    # the device's facts: speed, driver, the rule and why
    facts = await page.text_content("#d-facts") or ""
    assert "480 Mbit/s" in facts and "usbhid" in facts, facts
    assert "set by hand: b" in facts, facts
    assert "vmplug doctor 1-3" in (await page.text_content("#d-doctor") or "")
    await select(page, KBD)
    facts = await page.text_content("#d-facts") or ""
    assert "rule #1 (line" in facts and 'via-port "2-2.4.2"' in facts, facts

    # the host's figures at the top, each with its chart
    figs = await page.eval_on_selector_all(
        "#host-figs .fig",
        "els => els.map(e => [e.querySelector('.fig-name').textContent,"
        " e.querySelector('.fig-value').textContent, !!e.querySelector('svg.chart')])",
    )
    assert [f[0] for f in figs] == ["Uptime", "Failures", "MTBF", "Recovery"], figs
    assert all(f[2] for f in figs), figs
    assert int(figs[1][1]) >= 1, figs  # the keyboard's unplug was a failure

    # the layout: three panes side by side at this width, none over another
    boxes = await panes_apart(page)
    assert boxes["#host"][2] <= boxes[".vms-pane"][0] <= boxes["#details"][0], boxes
    assert all(b[1] < DESKTOP["height"] for b in boxes.values()), boxes  # all in sight
    await no_sideways_scroll(page)
    stats = await page.evaluate("window.vmplugStats")
    print(f"\njournal replay + every timeline drawn: {stats['picturesMs']:.1f} ms")
    await page.screenshot(path=str(artifacts / "pictures-desktop.png"))
    await page.screenshot(path=str(artifacts / "pictures-desktop-full.png"), full_page=True)
    assert errors == []

    # a laptop: tree beside the VMs, the device under the VMs
    laptop, lerrors = await open_page(browser, rig, viewport=LAPTOP)
    await laptop.wait_for_selector(card("a", KBD))
    await select(laptop, KBD)
    await laptop.wait_for_selector("#d-timeline rect.span[data-state=unplugged]", timeout=15000)
    boxes = await panes_apart(laptop)
    assert boxes["#host"][2] <= boxes[".vms-pane"][0] == boxes["#details"][0], boxes
    await no_sideways_scroll(laptop)
    await laptop.screenshot(path=str(artifacts / "pictures-laptop.png"))
    assert lerrors == []

    # the phone: one column, the same pictures, nothing sideways
    phone, perrors = await open_page(
        browser, rig, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    await phone.wait_for_selector(card("a", KBD))
    await phone.tap(f'#tree li[data-port="{KBD}"] > .row button.name')
    await phone.wait_for_selector("#d-timeline rect.span[data-state=unplugged]", timeout=15000)
    boxes = await panes_apart(phone)
    lefts = {round(b[0]) for k, b in boxes.items()}
    assert len(lefts) == 1, boxes  # one column
    assert boxes["#host"][3] <= boxes[".vms-pane"][1] <= boxes["#details"][1], boxes
    await no_sideways_scroll(phone)
    inside = await phone.eval_on_selector_all(
        "button, select, svg",
        """els => els.filter(e => e.getClientRects().length).map(e => {
             const r = e.getBoundingClientRect();
             return [e.outerHTML.slice(0, 50), r.left, r.right];
           }).filter(([, l, r]) => l < 0 || r > innerWidth)""",
    )
    assert inside == [], inside
    await phone.screenshot(path=str(artifacts / "pictures-phone.png"), full_page=True)
    assert perrors == []


def test_the_page_never_parses_text_as_html() -> None:
    """Every string reaches the DOM through textContent or an attribute: the script
    has no HTML-parsing sink at all, so no device string can become markup."""
    script = (Path(__file__).resolve().parents[2] / "src/vmplug/api/static/app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


def hostile_tree(tmp: Path) -> Path:
    """The captured ``mixed`` tree, its keyboard and tablet made hostile."""
    root = tmp / "hostile-sysfs"
    shutil.copytree(FIXTURES / "mixed", root, symlinks=True)
    for port in (KBD, TABLET):
        dev = (root / "bus/usb/devices" / port).resolve()
        (dev / "manufacturer").write_text(HOSTILE_MAKER + "\n")
        (dev / "product").write_text(HOSTILE_PRODUCT + "\n")
        (dev / "serial").write_text(HOSTILE_SERIAL + f"-{port}\n")
    return root


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_hostile_device_strings_are_shown_cut_and_inert(
    tmp_path: Path, browser: Browser, artifacts: Path, viewport: dict[str, int]
) -> None:
    rig = ApiRig(tmp_path, sysfs_root=hostile_tree(tmp_path))
    try:
        await rig.up()
        await rig.wait_ports("a", {KBD})
        page, errors = await open_page(browser, rig, viewport=viewport)
        await page.wait_for_selector(card("a", KBD))
        await select(page, TABLET)
        assert await page.evaluate("window.__pwned") is None  # no script ran
        assert await page.locator("#tree script, #tree img, #details b").count() == 0
        # nothing wider than the screen, nothing sideways
        wide = await page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                 .filter(e => e.getClientRects().length)
                 .map(e => [e.tagName + '.' + e.getAttribute('class'),
                            e.getBoundingClientRect().width])
                 .filter(([, w]) => w > innerWidth)"""
        )
        assert wide == [], wide
        await no_sideways_scroll(page)
        # the row: one line, cut with an ellipsis, escapes visible, all of it on hover
        row = f'#tree li[data-port="{TABLET}"] > .row'
        shown = await page.text_content(f"{row} .label") or ""
        assert shown.startswith("X\\n\\x1b[2J\\x1b[31mRED\\x1b[0m") and shown.endswith("…"), shown
        assert len(shown) <= 64, len(shown)
        hover = await page.get_attribute(f"{row} button.name", "title") or ""
        assert "M" * 5000 in hover and "\x1b" not in hover
        height = await page.evaluate(
            f"document.querySelector('{row}').getBoundingClientRect().height"
        )
        assert height < 80, height
        # the detail panel: the whole text, wrapped inside the panel
        facts = await page.text_content("#d-facts") or ""
        assert "X\\n\\x1b[2J\\x1b[31mRED\\x1b[0m" + "M" * 5000 in facts
        assert "<script>window.__pwned = 1</script>" in facts  # as text
        assert "\\r\\nFAKE 9-9 row\\x07\\u202eevil" in facts
        # the same visible form as every other surface (the CLI's vmplug.textsafe)
        dds = await page.eval_on_selector_all("#d-facts dd", "els => els.map(e => e.textContent)")
        assert dds[:3] == [
            printable(HOSTILE_MAKER, None),
            printable(HOSTILE_PRODUCT, None),
            printable(HOSTILE_SERIAL + "-1-3", None),
        ], dds[:3]
        assert "S1\\n\\x1b]0;title\\x07<b>bold</b>-1-3" in facts
        text = await page.evaluate("document.body.innerText")
        for raw in ("\x1b", "\x07", "\u202e", "\r", "\u200b", "\u2028", "\U000e0041"):
            assert raw not in text, repr(raw)
        maker = await page.evaluate(
            """() => { const dd = document.querySelector('#d-facts dd');
                 const p = document.querySelector('#details').getBoundingClientRect();
                 const r = dd.getBoundingClientRect();
                 return [r.left >= p.left, r.right <= p.right,
                         dd.scrollWidth <= dd.clientWidth]; }"""
        )
        assert maker == [True, True, True], maker
        # the page is a page, not 4,000 px of one device
        assert await page.evaluate("document.scrollingElement.scrollHeight") < 4000
        await panes_apart(page)
        name = "hostile-desktop" if viewport is DESKTOP else "hostile-phone"
        await page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
        assert errors == []
    finally:
        await rig.close()
