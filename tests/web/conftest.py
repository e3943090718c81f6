"""Fixtures for the browser tests: the API rig of tests/api and a headless Chromium."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.apirig import ApiRig

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
async def rig(tmp_path: Path) -> AsyncIterator[ApiRig]:
    r = ApiRig(tmp_path)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
def artifacts() -> Path:
    """test-artifacts/ at the repository root (gitignored): screenshots land here."""
    out = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out


def keep(path: Path, artifacts: Path) -> Path:
    dst = artifacts / path.name
    shutil.copy(path, dst)
    return dst
