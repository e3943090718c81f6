"""Small helpers for the QmpVm integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class ChangeLog:
    """Records ``on_change(vm, reason)`` calls and lets a test wait for one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, vm: str, reason: str) -> None:
        self.calls.append((vm, reason))
        self._changed.set()

    @property
    def reasons(self) -> list[str]:
        return [r for _, r in self.calls]

    def count(self, reason: str) -> int:
        return self.reasons.count(reason)

    async def wait_for(self, reason: str, *, count: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(reason) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {reason!r} (x{count}) within {timeout}s: {self.reasons}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.01)
