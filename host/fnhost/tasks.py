"""Stopping background tasks so that they really stop.

One ``task.cancel()`` and a ``gather`` is not enough on Python 3.11: there
``asyncio.wait_for``, which nats-py uses for every request, fetch and flush,
returns the awaited result instead of raising when the cancellation lands in
the loop turn that result arrived in (CPython gh-86296, fixed in 3.12). The
task's loop then goes on as if nothing happened, and whoever waits for it
waits forever: a host that drained its functions would hang while closing,
until its supervisor killed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_EVERY = 1.0
"""Seconds a cancelled task gets to end before it is cancelled again (its ``finally``
blocks may await: a network call to clean up)."""


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once every one of them has ended.

    A task still running :data:`RECANCEL_EVERY` seconds after its cancellation
    is cancelled again (the next ``await`` it reaches raises). What the tasks
    raised is retrieved and dropped, as ``gather(..., return_exceptions=True)`` does.
    """
    tasks = list(tasks)
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=RECANCEL_EVERY)
    await asyncio.gather(*tasks, return_exceptions=True)
