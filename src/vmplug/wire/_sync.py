"""Blocking fronts over the asyncio clients: a private event loop in a thread.

A blocking probe (the doctor, the lab, ``vmplug vms``) may be called from a
thread that already runs a loop (an async test, ``asyncio.to_thread``), so it
never borrows the caller's loop: each front owns a loop in a daemon thread
and waits on it with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One event loop running in its own daemon thread until :meth:`close`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it (``timeout`` s; then it is
        cancelled and :class:`TimeoutError` raised)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError from None

    def close(self, finish: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``finish`` (bounded), then stop the loop and join the thread."""
        if self.loop.is_closed():
            return
        if finish is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):  # closing: nothing left to tell
                self.run(_call(finish), timeout=10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


def run_sync(make: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
    """Run one coroutine to completion from blocking code, in a fresh loop.

    Without a running loop in this thread that is :func:`asyncio.run`; inside
    one (a blocking call made by async code) a short-lived thread runs it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(asyncio.wait_for(make(), timeout))
    runner = LoopThread("vmplug-run-sync")
    try:
        return runner.run(make(), timeout)
    finally:
        runner.close()
