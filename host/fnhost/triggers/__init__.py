"""Triggers: one module per kind. Each turns NATS messages into invocations of
one function and acts on the outcomes.

:class:`FunctionRuntime` is what a trigger runs: the composed chain and the
session of one *version* of a function. A trigger reads ``self.runtime`` once
per message, so swapping it (reload, deploy) changes the next message and
never an in-flight one.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fnhost.manifest import FunctionSpec
from nats.aio.client import Client as NatsClient

from fnhost.loader import LoadedFunction
from fnhost.types import Handler
from fnhost_sdk.session import Session

log = logging.getLogger("fnhost.trigger")

TriggerStatus = Literal["starting", "running", "draining", "stopped"]


@dataclass(frozen=True, slots=True)
class FunctionRuntime:
    """One loaded version of a function, ready to run messages."""

    spec: FunctionSpec
    loaded: LoadedFunction
    chain: Handler
    session: Session

    @property
    def version(self) -> str:
        return self.loaded.version


class Slots:
    """The per-function concurrency limit: a counter with a wake-up for waiters.

    Cheaper than a semaphore on the hot path: taking a free slot is an
    increment, with no await.
    """

    __slots__ = ("_changed", "capacity", "in_use")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    async def acquire(self) -> None:
        while self.in_use >= self.capacity:
            self._changed.clear()
            await self._changed.wait()
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        self._changed.set()

    async def wait_idle(self) -> None:
        while self.in_use:
            self._changed.clear()
            await self._changed.wait()


class Trigger(ABC):
    """Base of the trigger kinds: the task bookkeeping and the drain protocol."""

    def __init__(self, runtime: FunctionRuntime, nc: NatsClient) -> None:
        self.runtime = runtime
        self.nc = nc
        self.name = runtime.spec.name
        self.slots = Slots(runtime.spec.concurrency)
        self.status: TriggerStatus = "starting"
        self._tasks: set[asyncio.Task[None]] = set()

    @abstractmethod
    async def start(self) -> None:
        """Subscribe and begin receiving messages."""

    @abstractmethod
    def describe(self) -> str:
        """Where the trigger listens, for logs and status pages."""

    @abstractmethod
    async def stop_intake(self) -> None:
        """Stop receiving new messages; in-flight invocations go on."""

    def on_reconnect(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """The connection came back (the server may have forgotten our state)."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run one invocation as its own task, tracked for the drain."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def inflight(self) -> int:
        return self.slots.in_use

    async def drain(self, grace: float) -> bool:
        """Stop intake, then wait up to ``grace`` seconds for in-flight work.

        Returns ``False`` if work was still running at the deadline; that work
        is cancelled and never acked (JetStream redelivers it).
        """
        self.status = "draining"
        await self.stop_intake()
        try:
            async with asyncio.timeout(grace):
                await self.slots.wait_idle()
        except TimeoutError:
            log.warning(
                "function %s: %d invocations still running after the %gs grace period; "
                "cancelling them (they are not acked)",
                self.name,
                self.slots.in_use,
                grace,
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            return False
        finally:
            self.status = "stopped"
        return True
