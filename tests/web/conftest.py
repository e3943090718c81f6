"""Fixtures for the browser tests: a headless Chromium (the API rig, ``rig``, is
tests/conftest.py's)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.support.apirig import TOKEN, ApiRig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if Path(CHROMIUM).exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is not installed")
    for item in items:
        if "tests/web/" in str(item.path):
            item.add_marker(skip)


@pytest.fixture
def artifacts() -> Path:
    """test-artifacts/ at the repository root (gitignored): screenshots land here."""
    out = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, closed after the test."""
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser: Browser, rig: ApiRig, **context: Any) -> tuple[Page, list[str]]:
    """The page in a new browser context, live; the page's errors collect in the list."""
    ctx = await browser.new_context(**context)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    # the token buys a session cookie once; the address bar keeps no token
    await page.goto(f"{rig.base}/?token={TOKEN}")
    assert page.url == f"{rig.base}/"
    await page.wait_for_selector("#live[data-state=live]", timeout=15000)
    return page, errors


def card(vm: str, port: str) -> str:
    """The selector of the card of device ``port`` in VM ``vm``'s section."""
    return f'section.vm[data-vm="{vm}"] li.card[data-port="{port}"]'


def keep(path: Path, artifacts: Path) -> Path:
    dst = artifacts / path.name
    shutil.copy(path, dst)
    return dst
