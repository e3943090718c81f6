"""Small asyncio helpers shared by the daemon and the VM backends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("vmplug")

#: how long a stop waits for cancelled tasks before it gives up on them
STOP_TIMEOUT = 10.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None], timeout: float = STOP_TIMEOUT
) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again as needed.

    One ``cancel()`` is not always enough: Python 3.11's ``asyncio.wait_for``
    drops a cancellation that arrives just as the awaited operation finishes
    (gh-86296), and a reconnect loop that lost it carries on for ever, so a
    plain ``await task`` after ``cancel()`` can hang a daemon's shutdown.
    Waits at most ``timeout`` seconds; a task still running then is logged and
    left behind, never waited on for ever.  The caller's own cancellation
    propagates as usual.
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            for task in pending:
                log.warning("task %s did not stop in %.0f s", task.get_name(), timeout)
            return
        done, pending = await asyncio.wait(pending, timeout=min(remaining, 0.5))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("task %s ended with %r", task.get_name(), task.exception())
