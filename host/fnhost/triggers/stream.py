"""``trigger: {stream: S, subjects: [...], durable: d}``: a JetStream durable pull consumer.

The loop holds *credit*: messages asked for with pull requests and not yet
delivered. Credit plus in-flight invocations never exceeds the function's
``concurrency``, so no fetched message waits for a slot while its ack wait
runs out (the duplicate bug of pull loops that fetch a fixed batch). Each
message is dispatched the moment it arrives: unlike nats-py's ``fetch(n)``,
which holds the first message of a lingering pull until ``n`` arrive or the
request expires, this adds no latency to a trickle of messages.

An invocation whose ack waits for a write of a middleware's
(``Invocation.ack_after``: the kv idempotency store's record) gives its slot
to the next message as soon as it returns; the message is acked from the
write's callback. Up to ``concurrency`` such messages may wait beside the
running ones, so the host never holds more than twice ``concurrency``: its
memory stays bounded when the writes are slow. A message whose write failed
takes a slot back while the write is retried, so a failing store holds back
the intake instead of having new messages' leases fail and nak.

Pull requests carry an idle heartbeat. Status messages are control, never
payload: 408/409 return the credit they name; "Consumer Deleted", a pull
request nobody answers (503) and a missing heartbeat make the loop re-create
the consumer from the manifest.

Outcomes: ack (``ack: sync`` waits for the server's confirmation), nak with a
delay, term, or dead letter: copy the message to the function's
``dead_letter`` subject, then term; if the copy cannot be stored, nak so
nothing is lost. A handler that runs long gets in-progress pings every
``ack_wait/3`` so it is not redelivered while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fnhost.dlq import dead_letter_headers
from fnhost.invocation import outcome_for_error
from fnhost.logs import current_invocation
from fnhost.tasks import cancel_and_wait
from fnhost.triggers import FunctionRuntime, Slots, Trigger
from fnhost.types import Ack, DeadLetter, Invocation, Nak, Outcome, Term
from fnhost_sdk import headers as h
from fnhost_sdk.nowait import publish_nowait
from fnhost_sdk.session import PublishError

log = logging.getLogger("fnhost.trigger")

PULL_EXPIRES = 30.0
"""Seconds a pull request waits on the server for messages before it expires (408)."""

IDLE_HEARTBEAT = 5.0
"""Seconds between the server's heartbeats on an idle pull; two missed ones mean it is lost."""

MAX_BATCH = 256
"""Most messages asked for in one pull request."""

ConsumerFactory = Callable[[], Awaitable[None]]
DeadLetterCounter = Callable[[str], None]
"""Called with the function's name once per dead-letter copy stored (metrics)."""


class StreamTrigger(Trigger):
    """Pull messages from a durable consumer and run each through the function."""

    def __init__(
        self,
        runtime: FunctionRuntime,
        nc: NatsClient,
        *,
        ensure_consumer: ConsumerFactory,
        on_dead_lettered: DeadLetterCounter | None = None,
        expires: float = PULL_EXPIRES,
        idle_heartbeat: float = IDLE_HEARTBEAT,
    ) -> None:
        super().__init__(runtime, nc)
        spec = runtime.spec
        trigger = spec.trigger
        assert trigger.stream is not None
        self.stream = trigger.stream
        assert trigger.durable_name is not None
        self.durable = trigger.durable_name
        self._ensure_consumer = ensure_consumer
        self._on_dead_lettered = on_dead_lettered
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        self._inbox = nc.new_inbox()
        self._batch = min(trigger.effective_batch(spec.concurrency), spec.concurrency, MAX_BATCH)
        # Ask again once half a batch of slots is free: fewer, larger pulls under load.
        self._refill_at = max(1, self._batch // 2)
        self._expires_ns = int(expires * 1e9)
        self._heartbeat = idle_heartbeat
        self._heartbeat_ns = int(idle_heartbeat * 1e9)
        self._ack_sync = spec.ack == "sync"
        self._ack_wait = trigger.ack_wait
        self._pings = spec.progress_pings
        self._credit = 0
        self._refusing = False
        self._last_heard = 0.0
        self._wake = asyncio.Event()
        self._pull_task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._started_at: dict[int, tuple[Msg, float]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._acks_waiting = Slots(spec.concurrency)
        """Messages whose invocation returned and whose ack waits for a write (ack_after)."""

    def describe(self) -> str:
        return f"{self.stream}/{self.durable}"

    @property
    def held(self) -> int:
        """Messages this trigger holds: taken (running, queued for a worker, or with an
        ack waiting for a write) plus asked for and not yet delivered. Never above twice
        ``concurrency``."""
        return self.slots.in_use + self._credit + self._acks_waiting.in_use

    @property
    def inflight(self) -> int:
        """Messages taken and not yet settled: running, queued, or with an ack waiting."""
        return self.slots.in_use + self._acks_waiting.in_use

    async def wait_settled(self) -> None:
        # No invocation runs once the slots are idle, so no ack starts waiting; but an
        # ack whose write failed takes a slot back (_ack_when_stored): look again.
        while True:
            await self.slots.wait_idle()
            await self._acks_waiting.wait_idle()
            if not self.slots.in_use:
                return

    def _pullable(self) -> int:
        """Messages the loop may ask for now: the free slots not promised to credit, less
        what the acks waiting take beyond their own ``concurrency``."""
        acks_beyond = self._acks_waiting.in_use - self._acks_waiting.capacity
        return self.slots.free - self._credit - max(0, acks_beyond)

    async def subscribe(self) -> None:
        self.subscription = await self.nc.subscribe(self._inbox, cb=self._on_delivery)
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        self._pull_task = loop.create_task(self._pull_loop(), name=f"fnhost-pull-{self.name}")
        if self._pings:
            self._ping_task = loop.create_task(self._ping_loop(), name=f"fnhost-ping-{self.name}")

    async def stop_intake(self) -> None:
        # Pull requests cannot be withdrawn: until they expire or the inbox goes, the
        # server may still deliver. Those messages are nak'ed at once (see _on_delivery)
        # rather than dropped, which would hold them back until ack_wait; all but a last
        # allowed delivery, which runs.
        self._refusing = True
        await cancel_and_wait(task for task in (self._pull_task, self._recovery) if task)

    async def drain(self, grace: float) -> bool:
        try:
            return await super().drain(grace)
        finally:
            # Past the grace: acks still waiting for a record retried are not sent.
            await cancel_and_wait(task for task in (*self._settling, self._ping_task) if task)
            if self.subscription is not None:
                sub, self.subscription = self.subscription, None
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    def on_reconnect(self) -> None:
        # A restarted server forgot our pull requests; one that was only unreachable
        # still holds them. Ask again at once, from a fresh inbox either way.
        if not self._refusing and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.get_running_loop().create_task(
                self._reconnected(), name=f"fnhost-repull-{self.name}"
            )

    async def _reconnected(self) -> None:
        await self._pull_afresh()
        self._wake.set()

    async def _pull_afresh(self) -> None:
        """Forget our pull requests and take deliveries on a new inbox from now on.

        A pull request we gave up may still be on the server (it was frozen, or only
        the connection broke): served on top of the new ones, it would hand the host
        more messages than its concurrency. The server drops a waiting pull request
        whose reply subject nobody listens to, so the old inbox's is never served.
        """
        old = self.subscription
        self._inbox = self.nc.new_inbox()
        self._credit = 0
        try:
            self.subscription = await self.nc.subscribe(self._inbox, cb=self._on_delivery)
            if old is not None:
                await old.unsubscribe()
        except nats.errors.Error as exc:
            log.warning("function %s: cannot move the pull to a new inbox: %s", self.name, exc)

    async def _pull_loop(self) -> None:
        loop = asyncio.get_running_loop()
        nc = self.nc
        slots = self.slots
        while True:
            wanted = self._pullable()
            if wanted >= self._refill_at or (wanted > 0 and self._credit == 0 and not slots.in_use):
                count = min(wanted, self._batch)
                request = {
                    "batch": count,
                    "expires": self._expires_ns,
                    "idle_heartbeat": self._heartbeat_ns,
                }
                try:
                    await nc.publish(
                        self._next_subject, json.dumps(request).encode(), reply=self._inbox
                    )
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:
                    log.warning("function %s: pull request failed: %s", self.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                if self._credit == 0:
                    self._last_heard = loop.time()
                self._credit += count
                continue
            self._wake.clear()
            try:
                async with asyncio.timeout(self._heartbeat):
                    await self._wake.wait()
            except TimeoutError:
                if self._credit and loop.time() - self._last_heard > 2 * self._heartbeat:
                    await self._recover("no heartbeat from the server")

    async def _recover(self, why: str) -> None:
        """Our pull requests are gone: make sure the consumer exists, then ask again."""
        if self.nc.is_closed:
            return
        log.warning(
            "function %s: pull on %s/%s lost (%s)", self.name, self.stream, self.durable, why
        )
        try:
            await self._ensure_consumer()
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning(
                "function %s: cannot re-create consumer %s: %s", self.name, self.durable, exc
            )
            await asyncio.sleep(1.0)
        # Only now: with the credit gone earlier, a slot freed meanwhile would send a
        # pull request to a consumer not yet re-created, and its 503 would be ignored
        # (this recovery still runs), leaving the credit stuck until heartbeats run out.
        await self._pull_afresh()
        self._last_heard = asyncio.get_running_loop().time()
        self._wake.set()

    async def _on_delivery(self, msg: Msg) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        if not msg.reply:
            self._on_status(msg)
            return
        # The runtime's spec, not one read at start: a reload may change max_deliver.
        if self._refusing and delivery_of(msg.reply)[0] < self.runtime.spec.retry.max_deliver:
            # Redelivered at once, to another host or after the restart. A nak counts
            # as a delivery, so a message's last allowed one runs here instead, within
            # the drain's grace: nak'ed, it would never run again.
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(msg.reply, b"-NAK")
            return
        if self._credit:
            self._credit -= 1
        self.slots.in_use += 1
        self.enqueue(msg)

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            self._credit = max(0, self._credit - int(pending))
        description = headers.get("Description", "")
        if status == "409" and "Consumer Deleted" in description:
            self._start_recovery("consumer deleted")
            return
        if status == "503":
            # No responder for the pull request: the consumer is gone (deleted while no
            # pull request of ours was waiting to hear it) or JetStream is unavailable.
            self._start_recovery("no responders: consumer missing or JetStream unavailable")
            return
        if status not in ("404", "408"):
            log.info("function %s: pull status %s %s", self.name, status, description)
        if pending is None and status == "409":
            self._credit = 0
        self._wake.set()

    def _start_recovery(self, why: str) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(why), name=f"fnhost-recover-{self.name}"
            )

    def released(self) -> None:
        if self._pullable() >= self._refill_at:
            self._wake.set()

    async def handle(self, msg: Msg) -> None:
        runtime = self.runtime
        attempt, sequence, stored_at_ns = delivery_of(msg.reply)
        headers = msg.headers
        inv = Invocation(
            runtime.session,
            msg,
            kind="stream",
            function=self.name,
            subject=msg.subject,
            data=msg.data,
            headers=headers,
            message_id=headers.get(h.MSG_ID) if headers else None,
            attempt=attempt,
            stream=self.stream,
            sequence=sequence,
            stored_at_ns=stored_at_ns,
            config=runtime.spec.config,
        )
        token = current_invocation.set(inv)
        if self._pings:
            self._started_at[id(msg)] = (msg, asyncio.get_running_loop().time())
        try:
            try:
                outcome = await runtime.chain(inv)
            except Exception as exc:
                log.exception("function %s failed outside its middleware chain", self.name)
                outcome = outcome_for_error(runtime.spec, inv, exc)
            after = inv.ack_after
            if after is not None and isinstance(outcome, Ack):
                # Its slot goes to the next message; a drain waits for the ack all the same.
                self._acks_waiting.in_use += 1
                after[0].add_done_callback(functools.partial(self._ack_when_stored, inv, outcome))
                return
            await self._act(inv, outcome)
        finally:
            if self._pings:
                self._started_at.pop(id(msg), None)
            current_invocation.reset(token)

    def _ack_when_stored(self, inv: Invocation, outcome: Ack, stored: asyncio.Future[None]) -> None:
        """The write the ack waited for is stored: ack now, without a coroutine. A failed
        write, ``ack: sync``, or a connection nats-py must publish on itself take
        :meth:`_settle_late`, and the message takes a slot back meanwhile (over the
        capacity if need be): while a failing store's writes are retried, the loop asks
        for no new messages, whose leases would fail too."""
        msg = inv.msg
        stored_ok = not stored.cancelled() and stored.exception() is None
        self._acks_waiting.release()
        if stored_ok and not self._ack_sync and self._ack_nowait(msg):
            self.released()
            return
        self.slots.in_use += 1
        settling = asyncio.get_running_loop().create_task(self._settle_late(inv, outcome, stored))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)

    async def _settle_late(
        self, inv: Invocation, outcome: Outcome, stored: asyncio.Future[None]
    ) -> None:
        msg = inv.msg
        if self._pings:
            # A write tried again may take a while: the message must not be redelivered.
            self._started_at[id(msg)] = (msg, asyncio.get_running_loop().time())
        failure = asyncio.CancelledError() if stored.cancelled() else stored.exception()
        try:
            if failure is not None and inv.ack_after is not None:
                outcome = await inv.ack_after[1](inv, failure)
            await self._act(inv, outcome)
        except Exception:
            log.exception("function %s: unexpected error settling a message", self.name)
        finally:
            if self._pings:
                self._started_at.pop(id(msg), None)
            self.slots.release()
            self.released()

    async def _act(self, inv: Invocation, outcome: Outcome) -> None:
        msg = inv.msg
        try:
            if isinstance(outcome, Ack):
                if self._ack_sync:
                    await msg.ack_sync()
                elif not self._ack_nowait(msg):
                    await msg.ack()
            elif isinstance(outcome, Nak):
                log.warning(
                    "function %s: attempt %d of %s/%d failed, retrying in %gs: %s",
                    self.name,
                    inv.attempt,
                    self.stream,
                    inv.sequence,
                    outcome.delay or 0,
                    outcome.error,
                )
                await msg.nak(outcome.delay)
            elif isinstance(outcome, DeadLetter):
                await self._dead_letter(inv, outcome)
            elif isinstance(outcome, Term):
                log.error(
                    "function %s: %s/%d terminated: %s",
                    self.name,
                    self.stream,
                    inv.sequence,
                    outcome.reason,
                )
                await msg.term()
            else:
                await msg.ack()
        except nats.errors.Error as exc:
            # The server redelivers after ack_wait: at-least-once holds.
            log.warning(
                "function %s: could not settle %s/%d: %s", self.name, self.stream, inv.sequence, exc
            )

    def _ack_nowait(self, msg: Msg) -> bool:
        """Send a plain ack without a coroutine (about 0.7 µs against 2 µs for ``Msg.ack``);
        ``False``: nothing was sent (reconnecting, draining, a full buffer): ``Msg.ack`` it."""
        if msg._ackd or not publish_nowait(self.nc, msg.reply):
            return False
        msg._ackd = True  # what Msg.ack sets
        return True

    async def _dead_letter(self, inv: Invocation, outcome: DeadLetter) -> None:
        spec = self.runtime.spec
        msg = inv.msg
        if spec.dead_letter is None:
            log.error(
                "function %s: %s/%d rejected and terminated (no dead_letter configured): %s",
                self.name,
                self.stream,
                inv.sequence,
                outcome.reason,
            )
            await msg.term()
            return
        # The same copy, id included, as the advisory path stores: one per stream message.
        headers = dead_letter_headers(
            inv.headers,
            subject=inv.subject,
            function=self.name,
            stream=self.stream,
            sequence=inv.sequence,
            stored_at_us=None if inv.stored_at_ns is None else inv.stored_at_ns // 1000,
            attempts=inv.attempt,
            error=f"{outcome.error_type}: {outcome.reason}",
        )
        # The outgoing hooks see the copy as any publish: with tracing on, it carries the
        # failed invocation's trace context (a child of its span) instead of the original's.
        original_trace = {k: headers.pop(k) for k in (h.TRACEPARENT, h.TRACESTATE) if k in headers}
        outgoing = inv.session.prepare_headers(spec.dead_letter, None, headers) or headers
        for key, value in original_trace.items():
            outgoing.setdefault(key, value)
        try:
            stored = await inv.session.publish_durable(spec.dead_letter, inv.data, outgoing)
        except (PublishError, nats.errors.Error) as exc:
            # Not stored (no DLQ stream, a full one, ...): keep the original, try again later.
            delay = spec.retry.delay_for(inv.attempt)
            log.error(
                "function %s: dead letter for %s/%d not stored (%s); nak, retry in %gs",
                self.name,
                self.stream,
                inv.sequence,
                exc,
                delay,
            )
            await msg.nak(delay)
            return
        if not stored.duplicate and self._on_dead_lettered is not None:
            self._on_dead_lettered(self.name)
        log.error(
            "function %s: %s/%d dead-lettered to %s after %d attempt(s): %s",
            self.name,
            self.stream,
            inv.sequence,
            spec.dead_letter,
            inv.attempt,
            outcome.reason,
        )
        await msg.term()

    async def _ping_loop(self) -> None:
        interval = self._ack_wait / 3
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            due = loop.time() - interval
            for msg, started in list(self._started_at.values()):
                if started <= due:
                    try:
                        await msg.in_progress()
                    except nats.errors.Error as exc:
                        log.warning("function %s: in-progress ping failed: %s", self.name, exc)


def delivery_of(reply: str) -> tuple[int, int, int]:
    """(delivery count, stream sequence, storage time in ns) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``,
    or the 12+ token form with domain and account hash after ``$JS.ACK``.
    Cheaper than nats-py's ``msg.metadata``, which builds three objects per message.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5]), int(tokens[7])
    return int(tokens[6]), int(tokens[7]), int(tokens[9])
