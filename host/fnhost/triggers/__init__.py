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
from collections import deque
from dataclasses import dataclass
from typing import Literal

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fnhost.loader import LoadedFunction
from fnhost.manifest import FunctionSpec
from fnhost.tasks import cancel_and_wait
from fnhost.types import Handler
from fnhost_sdk.session import Session

log = logging.getLogger("fnhost.trigger")

TriggerStatus = Literal["starting", "running", "draining", "stopped"]

WAKE_FAN_OUT = 4
"""Idle workers a worker wakes when it takes a message and more wait in the backlog.

A burst spreads over the workers 1, 4, 16, ... a loop turn at a time. One at a
time, the invocations of a burst of handlers that suspend at once (an
idempotency lease, an output's PubAck) started a loop turn apart and their
writes left the host one or two per socket write, which cost the host and
nats-server CPU per message; all at once, their writes travel together and the
host waits for them together. Quick handlers still run back to back in the
first worker. Measured in bench/README.md, "Worker fan-out".
"""


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

    __slots__ = ("_changed", "capacity", "closed", "in_use")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.closed = False
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    async def acquire(self) -> bool:
        """Wait for a free slot and take it; ``False`` (no slot taken) once closed."""
        while self.in_use >= self.capacity:
            if self.closed:
                return False
            self._changed.clear()
            await self._changed.wait()
        self.in_use += 1
        return True

    def close(self) -> None:
        """Give up every wait in :meth:`acquire` (the trigger drains: no new work)."""
        self.closed = True
        self._changed.set()

    def release(self) -> None:
        self.in_use -= 1
        self._changed.set()

    async def wait_idle(self) -> None:
        while self.in_use:
            self._changed.clear()
            await self._changed.wait()


class Trigger(ABC):
    """Base of the trigger kinds: a pool of ``concurrency`` workers and the drain protocol.

    Messages wait in a backlog for a free worker; each worker runs one
    invocation at a time. A message enqueued while no wake-up is on its way
    wakes one idle worker; a woken worker that leaves work in the backlog wakes
    up to :data:`WAKE_FAN_OUT` more. So a burst of quick handlers runs back to
    back in one worker (no task and no wake-up per message; the others wake to
    an empty backlog), while handlers that await I/O spread over as many
    workers as they need within a few loop turns. ``slots`` counts backlog plus
    running messages, so a trigger takes no more than ``concurrency`` at once.
    """

    def __init__(self, runtime: FunctionRuntime, nc: NatsClient) -> None:
        self.runtime = runtime
        self.nc = nc
        self.name = runtime.spec.name
        self.slots = Slots(runtime.spec.concurrency)
        self.status: TriggerStatus = "starting"
        self.subscription: Subscription | None = None
        """Where the trigger's messages arrive (None before it subscribed, after it drained)."""
        self._backlog: deque[Msg] = deque()
        self._idle: list[asyncio.Future[None]] = []
        self._waking = False
        self._workers: list[asyncio.Task[None]] = []

    @abstractmethod
    def describe(self) -> str:
        """Where the trigger listens, for logs and status pages."""

    @abstractmethod
    async def subscribe(self) -> None:
        """Begin receiving messages (each one taken with a slot and :meth:`enqueue`)."""

    @abstractmethod
    async def stop_intake(self) -> None:
        """Stop receiving new messages; queued and running invocations go on."""

    @abstractmethod
    async def handle(self, msg: Msg) -> None:
        """Run one message through the function and act on the outcome."""

    def on_reconnect(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """The connection came back (the server may have forgotten our state)."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(), name=f"fnhost-{self.name}-{i}")
            for i in range(self.slots.capacity)
        ]
        await self.subscribe()
        self.status = "running"

    def enqueue(self, msg: Msg) -> None:
        """Hand a message that already holds a slot to the workers."""
        self._backlog.append(msg)
        if not self._waking:
            self._wake_workers(1)

    def _wake_workers(self, count: int) -> None:
        """Wake up to ``count`` idle workers."""
        idle = self._idle
        while count and idle:
            waiter = idle.pop()
            if not waiter.done():
                self._waking = True
                waiter.set_result(None)
                count -= 1

    async def _work(self) -> None:
        backlog = self._backlog
        slots = self.slots
        loop = asyncio.get_running_loop()
        while True:
            if not backlog:
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                self._waking = False
                if not backlog:
                    continue
            msg = backlog.popleft()
            if backlog and not self._waking:
                self._wake_workers(min(len(backlog), WAKE_FAN_OUT))
            try:
                await self.handle(msg)
            except Exception:
                log.exception("function %s: unexpected error handling a message", self.name)
            finally:
                slots.release()
                self.released()

    def released(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """A slot was freed (the stream trigger may ask for more messages)."""

    @property
    def inflight(self) -> int:
        """Messages taken and not yet settled: running or queued for a worker."""
        return self.slots.in_use

    async def wait_settled(self) -> None:
        """Return once every message taken is settled (the drain waits for this)."""
        await self.slots.wait_idle()

    async def drain(self, grace: float) -> bool:
        """Stop intake, then wait up to ``grace`` seconds for queued and running work.

        Returns ``False`` if work was still running at the deadline; that work
        is cancelled and never acked (JetStream redelivers it).
        """
        self.status = "draining"
        await self.stop_intake()
        finished = True
        try:
            async with asyncio.timeout(grace):
                await self.wait_settled()
        except TimeoutError:
            finished = False
            log.warning(
                "function %s: %d messages still running after the %gs grace period "
                "(handlers, or acks waiting for a write); cancelling them (they are not acked)",
                self.name,
                self.inflight,
                grace,
            )
        await cancel_and_wait(self._workers)
        self.status = "stopped"
        return finished
