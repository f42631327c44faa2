"""Core NATS triggers: ``subject`` (fire and forget); the base of ``request`` too.

Both subscribe with a queue group (default: the function name) so several
hosts share the work; ``queue: null`` on a subject trigger makes every host
get every message. Core NATS is at-most-once: a message that arrives while
the function is at its concurrency limit waits in the client's buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fnhost.invocation import outcome_for_error
from fnhost.logs import current_invocation
from fnhost.triggers import FunctionRuntime, Trigger
from fnhost.types import Failed, Invocation, Outcome
from fnhost_sdk import headers as h

log = logging.getLogger("fnhost.trigger")

PENDING_MSGS_LIMIT = 65_536


class CoreTrigger(Trigger):
    """A core subscription that runs each message as its own task, up to ``concurrency``."""

    def __init__(
        self, runtime: FunctionRuntime, nc: NatsClient, on_refused: Callable[[str], None]
    ) -> None:
        super().__init__(runtime, nc)
        self._on_refused = on_refused
        trigger = runtime.spec.trigger
        self.subject = trigger.request or trigger.subject or ""

    def describe(self) -> str:
        group = self.runtime.spec.trigger.queue_group
        return f"{self.subject} (queue {group})" if group else f"{self.subject} (every host)"

    async def subscribe(self) -> None:
        spec = self.runtime.spec
        self.subscription = await self.nc.subscribe(
            self.subject,
            queue=spec.trigger.queue_group or "",
            cb=self._on_message,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
        )
        await _confirm_with_server(self.nc)

    async def stop_intake(self) -> None:
        # A message waiting for a slot is answered now (503 for a request), not when
        # a slot frees up; and the messages still in the client's buffer are run
        # through _on_message (which refuses them while draining) instead of being
        # dropped: a caller learns at once that it must try again elsewhere.
        self.slots.close()
        if self.subscription is not None:
            sub, self.subscription = self.subscription, None
            if self.nc.is_connected:
                await sub.drain()  # type: ignore[no-untyped-call]
            elif not (self.nc.is_closed or self.nc.is_draining):
                await sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        slots = self.slots
        if slots.in_use >= slots.capacity:
            if not await slots.acquire():
                await self._turn_away(msg)
                return
        else:
            slots.in_use += 1
        if self.status == "draining":
            slots.release()
            await self._turn_away(msg)
            return
        self.enqueue(msg)

    async def _turn_away(self, msg: Msg) -> None:
        self._on_refused(self.name)
        await self.refuse(msg)

    async def handle(self, msg: Msg) -> None:
        runtime = self.runtime
        headers = msg.headers
        inv = Invocation(
            runtime.session,
            msg,
            kind=runtime.spec.trigger.kind,
            function=self.name,
            subject=msg.subject,
            data=msg.data,
            headers=headers,
            message_id=headers.get(h.MSG_ID) if headers else None,
            config=runtime.spec.config,
        )
        token = current_invocation.set(inv)
        try:
            try:
                outcome = await runtime.chain(inv)
            except Exception as exc:
                log.exception("function %s failed outside its middleware chain", self.name)
                outcome = outcome_for_error(runtime.spec, inv, exc)
            await self.act(msg, outcome)
        finally:
            current_invocation.reset(token)

    async def act(self, msg: Msg, outcome: Outcome) -> None:
        """Act on an outcome (subject triggers: log failures)."""
        if isinstance(outcome, Failed):
            log.error(
                "function %s: message on %s failed: %s", self.name, msg.subject, outcome.error
            )

    async def refuse(self, msg: Msg) -> None:
        """Answer a message that arrived while draining."""
        log.info("function %s: dropped a message on %s while draining", self.name, msg.subject)


async def _confirm_with_server(nc: NatsClient) -> None:
    """Return once the server has processed everything sent so far (our SUB included).

    A trigger counts as started only when a caller can reach it: a request sent
    right after ``Host.start()`` must not meet "no responders". Two round trips,
    because nats-py 2.16's ``flush()`` writes its PING straight to the socket,
    ahead of commands still in the client's buffer; the first one lets the
    flusher write the SUB, the second PING follows it. While disconnected
    there is nothing to confirm: nats-py re-sends subscriptions on reconnect.
    """
    if not nc.is_connected:
        return
    await nc.flush()
    await nc.flush()


class SubjectTrigger(CoreTrigger):
    """``trigger: {subject: x.y, queue: g}``: a core subscription, fire and forget."""
