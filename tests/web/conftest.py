"""Fixtures for the browser tests: a headless Chromium (the API rig, ``rig``, is
tests/conftest.py's)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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


def keep(path: Path, artifacts: Path) -> Path:
    dst = artifacts / path.name
    shutil.copy(path, dst)
    return dst
