"""Small helpers for the QmpVm integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from vmplug.vms.base import VmEvent, VmEventKind


class ChangeLog:
    """Records the :class:`VmEvent` values a backend's ``on_change`` gets and
    lets a test wait for one."""

    def __init__(self) -> None:
        self.calls: list[VmEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: VmEvent) -> None:
        assert isinstance(event, VmEvent), event
        self.calls.append(event)
        self._changed.set()

    @property
    def kinds(self) -> list[VmEventKind]:
        return [e.kind for e in self.calls]

    def count(self, kind: VmEventKind, device_id: str | None = None) -> int:
        return sum(
            1
            for e in self.calls
            if e.kind is kind and (device_id is None or e.device_id == device_id)
        )

    async def wait_for(
        self,
        kind: VmEventKind,
        device_id: str | None = None,
        *,
        count: int = 1,
        timeout: float = 5.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        while self.count(kind, device_id) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                what = f"{kind.value} {device_id or ''}".strip()
                raise AssertionError(
                    f"no {what!r} (x{count}) within {timeout}s: {[str(e) for e in self.calls]}"
                )
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
