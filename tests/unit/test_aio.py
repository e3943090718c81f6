"""cancel_and_wait: a stop that cannot hang on a task that lost its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import time

from vmplug.aio import cancel_and_wait


async def _loses_one_cancellation(stopped: list[str]) -> None:
    # What Python 3.11's asyncio.wait_for does when the cancellation arrives as
    # the awaited operation finishes: the CancelledError never reaches the loop.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(100)
    try:
        await asyncio.sleep(100)  # a reconnect loop carrying on
    finally:
        stopped.append("second cancel")


async def test_a_task_that_swallowed_one_cancel_is_cancelled_again() -> None:
    stopped: list[str] = []
    task = asyncio.create_task(_loses_one_cancellation(stopped))
    await asyncio.sleep(0)
    # the plain way hangs: one cancel, then wait
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done
    t0 = time.monotonic()
    await cancel_and_wait([task])
    assert task.cancelled()
    assert stopped == ["second cancel"]
    assert time.monotonic() - t0 < 2


async def test_a_task_that_never_stops_is_given_up_on_after_the_timeout() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:  # ignores every cancellation until released
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await cancel_and_wait([task, None], timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 3
    assert not task.done()
    release.set()
    await task


async def test_finished_and_failed_tasks_are_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait([failed, finished])
    assert failed.done() and finished.done()
