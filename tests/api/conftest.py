"""Fixtures for the API tests: a daemon with real QEMU VMs behind its HTTP API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.apirig import ApiRig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[ApiRig]:
    """Not started: ``await rig.up()``.  Everything is stopped at teardown."""
    r = ApiRig(tmp_path)
    try:
        yield r
    finally:
        await r.close()
