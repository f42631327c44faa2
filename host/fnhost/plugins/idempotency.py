"""Built-in plugin: run each message's handler once per idempotency key.

For a function with ``idempotency:`` in fn.yaml the middleware, per message:

1. finds the key: ``auto`` (the ``Nats-Msg-Id`` header, else
   ``stream:sequence:stored_at_ns``; a core message without a message id has
   no key and runs unguarded), ``header:NAME`` or ``module:function`` (called as
   ``function(data, ctx) -> str | None``). A configured key that is missing
   (no such header, the function returned ``None`` or raised) is bad input:
   the message is dead-lettered like an undecodable payload, because running
   it without its key would break the promise silently.
2. takes the key's lease (:meth:`~fnhost.idempotency.Store.begin`): a
   recorded key is acked at once as a duplicate; another holder's live lease
   is *waited on* (polling the store, sending in-progress acks) until the key
   is recorded (duplicate) or the lease expires (taken over). Meeting a lease
   never naks, terms or uses up a delivery.
3. runs the rest of the chain. An ack is returned only after the key is
   recorded (unless the handler recorded it itself with
   ``ctx.idempotency.record_in(conn)``), or, on a stream with plain acks and a
   store that can start a record without waiting (kv), with the record on its
   way in :attr:`~fnhost.types.Invocation.ack_after`: the trigger acks once it
   is stored; any other outcome releases the lease,
   so the redelivery can take it at once. A record the store cannot take (it
   fails over) is tried again for up to :data:`RECORD_PATIENCE` seconds before
   the message is nak'ed: its effect has happened.

A store that cannot be reached makes the message nak (with the function's
back-off), never ack unprocessed, and puts ``idempotency:<store>`` among the
host's readiness problems (``/readyz`` answers 503) until a store call
succeeds again: the next message's, or the guard's own probe, which starts
the store again every few seconds while it is down (so a host whose failed
messages were meanwhile handled elsewhere does not stay unready).

It sits right outside ``retry`` (see :data:`fnhost.plugins.manager.BUILTIN_PLUGINS`),
so it sees outcomes, not exceptions; ``metrics`` and ``tracing`` sit outside it
and count a skipped redelivery as ``duplicate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from fnhost.errors import HandlerTimeout, LoadError
from fnhost.idempotency import Begin, RecordsSoon, Store, StoreUnavailable, Token, open_store
from fnhost.invocation import describe
from fnhost.manifest import FunctionSpec, IdempotencySpec
from fnhost.plugins import hookimpl
from fnhost.plugins.timeout import cancel_slack
from fnhost.tasks import cancel_and_wait
from fnhost.types import (
    DUPLICATE,
    Ack,
    CallNext,
    DeadLetter,
    Failed,
    Invocation,
    Middleware,
    Nak,
    Outcome,
)
from fnhost_sdk.idempotency import Idempotency

if TYPE_CHECKING:
    from fnhost.host import Host

log = logging.getLogger("fnhost.idempotency")

POLL_FIRST, POLL_MAX = 0.02, 0.5
"""Seconds between looks at a lease being waited on: from the first, doubling to the max."""
RECORD_PATIENCE = 30.0
"""Seconds a delivery whose handler succeeded keeps trying to store its key before it
naks: a store failing over (a KV bucket's leader election, a Redis or PostgreSQL
restart) refuses or times out for a few seconds, and the effect has happened: only the
record keeps the redelivery from running it again. The trigger's in-progress pings
keep the message from being redelivered meanwhile."""
RECORD_RETRY_FIRST, RECORD_RETRY_MAX = 0.1, 0.5
"""Seconds between tries to store a key: from the first, doubling to the max (short: once
the store is back, the record must land before a redelivery whose lease ran out meanwhile
takes the key over)."""
PROBE_FIRST, PROBE_MAX = 1.0, 30.0
"""Seconds between probes of a store that is down: from the first, doubling to the max."""

KeySource = Callable[[Invocation], str | None]


class MissingKey(Exception):
    """The configured key could not be found on the message."""


class StoreGuard:
    """One store of one host: started lazily, its outages reported on ``/readyz``."""

    __slots__ = ("_probe", "down", "host", "problem", "started", "store")

    def __init__(self, store: Store, host: Host) -> None:
        self.store = store
        self.host = host
        self.problem = f"idempotency:{store.name}"
        self.started = False
        self.down = False
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.store.start()
        except StoreUnavailable as exc:
            self.failed(exc)
            raise
        self.started = True

    def failed(self, exc: StoreUnavailable) -> None:
        if not self.down:
            log.error("idempotency store %s unavailable: %s", self.store.name, exc)
        self.down = True
        self.started = False  # start again (bucket, table, connection) before the next use
        self.host.problems[self.problem] = f"store unavailable: {exc}"
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_back(), name=f"fnhost-probe-{self.problem}"
            )

    def recovered(self) -> None:
        if not self.down:
            return
        self.down = False
        self.host.problems.pop(self.problem, None)
        log.info("idempotency store %s is back", self.store.name)

    async def close(self) -> None:
        if self._probe is not None:
            await cancel_and_wait([self._probe])
        await self.store.close()

    async def _probe_until_back(self) -> None:
        pause = PROBE_FIRST
        while self.down:
            await asyncio.sleep(pause)
            pause = min(pause * 2, PROBE_MAX)
            if not self.down:
                return  # a message's store call got through first
            with contextlib.suppress(StoreUnavailable):
                await self.start()
                self.recovered()


class HostStores:
    """The stores of one host, shared by the functions that name the same one."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.holder = uuid.uuid4().hex[:12]
        self.guards: dict[tuple[str, str, str | None], StoreGuard] = {}

    def guard_for(self, function: FunctionSpec) -> StoreGuard:
        spec = function.idempotency
        assert spec is not None
        ident = (spec.store, spec.bucket, spec.url)
        guard = self.guards.get(ident)
        if guard is None:
            store = open_store(
                spec,
                holder=self.holder,
                js=lambda: self.host.js,
                nc=lambda: self.host.nc,
                declared_buckets=frozenset(self.host.manifest.kv),
            )
            guard = self.guards[ident] = StoreGuard(store, self.host)
        widen = getattr(guard.store, "widen", None)
        if widen is not None:
            # A lease entry must outlive the record it leads to: ttl after the lease. And
            # the records must survive the loss of a server as the messages they guard do.
            stream = self.host.manifest.streams.get(function.trigger.stream or "")
            widen(spec.ttl + lease_for(function), stream.replicas if stream else 1)
        return guard


_stores: WeakKeyDictionary[Host, HostStores] = WeakKeyDictionary()


def _stores_of(host: Host) -> HostStores:
    stores = _stores.get(host)
    if stores is None:
        stores = _stores[host] = HostStores(host)
    return stores


@hookimpl
async def fnhost_startup(host: Host) -> None:
    stores = _stores_of(host)
    for function in host.manifest.functions.values():
        if function.idempotency is not None:
            stores.guard_for(function)
    for guard in stores.guards.values():
        # A failure is reported on /readyz; the store is started again before its next use.
        with contextlib.suppress(StoreUnavailable):
            await guard.start()


@hookimpl
async def fnhost_shutdown(host: Host) -> None:
    stores = _stores.pop(host, None)
    if stores is not None:
        for guard in stores.guards.values():
            await guard.close()


@hookimpl
def fnhost_middleware(function: FunctionSpec, host: Host) -> Middleware | None:
    spec = function.idempotency
    if spec is None or function.trigger.kind == "request":
        return None
    return build_middleware(function, spec, _stores_of(host).guard_for(function))


LEASE_MARGIN = 1.0
"""Seconds a default lease lasts past the moment its handler is cancelled at the latest."""


def lease_for(function: FunctionSpec) -> float:
    """The lease a delivery takes: ``lease``, else the larger of ``ack_wait`` and the
    longest a handler can run (its ``timeout``, the sweeper's slack, a margin)."""
    spec = function.idempotency
    if spec is not None and spec.lease is not None:
        return spec.lease
    longest_run = function.timeout + cancel_slack(function.timeout) + LEASE_MARGIN
    if function.trigger.kind == "stream":
        return max(function.trigger.ack_wait, longest_run)
    return longest_run


def _timed_out(outcome: Outcome) -> bool:
    return getattr(outcome, "error_type", "") == HandlerTimeout.__name__


def key_source(spec: IdempotencySpec, function: str) -> KeySource:
    """How the function's messages are keyed (raises :class:`LoadError` for a bad key function)."""
    if spec.key == "auto":
        return _auto_key
    if spec.key.startswith("header:"):
        name = spec.key.removeprefix("header:")

        def header_key(call: Invocation) -> str | None:
            value = call.headers.get(name) if call.headers else None
            if not value:
                raise MissingKey(f"idempotency key header {name!r} is missing")
            return value

        return header_key
    module_name, _, attr = spec.key.partition(":")
    try:
        compute = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LoadError(
            f"function {function!r}: idempotency.key {spec.key!r} cannot be loaded: {exc}"
        ) from exc

    def computed_key(call: Invocation) -> str | None:
        try:
            value = compute(call.data, call)
        except Exception as exc:
            why = f"idempotency key function {spec.key} failed: {describe(exc)}"
            raise MissingKey(why) from exc
        if value is None or value == "":
            raise MissingKey(f"idempotency key function {spec.key} returned no key")
        return str(value)

    return computed_key


def _auto_key(call: Invocation) -> str | None:
    return call.idempotency_key


def build_middleware(
    function: FunctionSpec, spec: IdempotencySpec, guard: StoreGuard
) -> Middleware:
    """The idempotency middleware of one function (composed once per load)."""
    store = guard.store
    resolve = key_source(spec, function.name)
    encode = store.encoder(function.name)
    lease = lease_for(function)
    ttl = spec.ttl
    recorder = store.transactional(ttl)
    retry = function.retry
    stream = function.trigger.kind == "stream"
    ping_every = function.trigger.ack_wait / 3
    # A plain ack can wait for the record outside the invocation (the trigger sends it
    # once the record is stored); ``ack: sync`` waits for the ack's answer in it anyway.
    record_soon = (
        store.record_soon
        if isinstance(store, RecordsSoon) and stream and function.ack == "plain"
        else None
    )

    def unavailable(call: Invocation, exc: StoreUnavailable) -> Outcome:
        guard.failed(exc)
        why = f"idempotency store {store.name} unavailable: {exc}"
        return Nak(retry.delay_for(call.attempt), why) if stream else Failed(why)

    # The middleware calls the store itself and these helpers only off the common path:
    # a coroutine between them would cost the host CPU on every message.

    async def wait_for_lease(call: Invocation, key: str, begin: Begin) -> Begin:
        """Wait out another holder's live lease; then the key's lease (``new``) or ``done``."""
        log.info("idempotency key %s is leased by another delivery; waiting for it", key)
        loop = asyncio.get_running_loop()
        pinged = loop.time()
        poll = POLL_FIRST
        while begin.state == "leased":
            await asyncio.sleep(max(0.0, min(poll, begin.expires_at - time.time() + 0.005)))
            poll = min(poll * 2, POLL_MAX)
            if stream and loop.time() - pinged >= ping_every:
                await call.in_progress()
                pinged = loop.time()
            begin = await store.begin(key, lease)
        return begin

    async def record_again(key: str, token: Token, failure: StoreUnavailable) -> None:
        """The first try to record ``key`` failed with ``failure``: try again for up to
        :data:`RECORD_PATIENCE` seconds (past that, raise the last failure)."""
        guard.failed(failure)
        log.warning(
            "idempotency key %s: the handler succeeded, its record was not stored (%s); "
            "trying again for up to %gs",
            key,
            failure,
            RECORD_PATIENCE,
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RECORD_PATIENCE
        pause = RECORD_RETRY_FIRST
        tries = 1
        while loop.time() + pause < give_up:
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECORD_RETRY_MAX)
            tries += 1
            try:
                await store.record(key, token, ttl)
            except StoreUnavailable as exc:
                guard.failed(exc)
                failure = exc
            else:
                log.info("idempotency key %s recorded at try %d", key, tries)
                return
        raise failure

    async def record_failed(
        key: str, token: Token, outcome: Ack, call: Invocation, failure: BaseException
    ) -> Outcome:
        """A record started with ``record_soon`` failed: what the message's outcome is
        after :func:`record_again` (``outcome``, or a nak if the store stays down)."""
        if not isinstance(failure, StoreUnavailable):
            failure = StoreUnavailable(describe(failure))
        try:
            await record_again(key, token, failure)
        except StoreUnavailable as exc:
            return unavailable(call, exc)
        return outcome

    async def idempotency(call: Invocation, call_next: CallNext) -> Outcome:
        try:
            raw = resolve(call)
        except MissingKey as exc:
            reason = str(exc)
            return DeadLetter(reason, "PayloadError") if stream else Failed(reason)
        if raw is None:
            return await call_next(call)
        key = encode(raw)
        try:
            if not guard.started:
                await guard.start()
            begin = await store.begin(key, lease)
            if begin.state == "leased":
                begin = await wait_for_lease(call, key, begin)
        except StoreUnavailable as exc:
            return unavailable(call, exc)
        if guard.down:
            guard.recovered()
        if begin.state == "done":
            return DUPLICATE
        token = begin.token
        handle = call.idempotency = Idempotency(raw, key, token, recorder)
        outcome = await call_next(call)
        if handle.lease_lost and not isinstance(outcome, Ack):
            # Another delivery took the key over while this one ran (its effect rolled
            # back). If that one recorded the key, the effect happened there: this is a
            # duplicate, not a failure (dead-lettered on the last attempt, a replay
            # would run the effect again).
            try:
                again = await store.begin(key, lease)
                if again.state == "leased":
                    again = await wait_for_lease(call, key, again)
            except StoreUnavailable as exc:
                return unavailable(call, exc)
            if again.state == "done":
                return DUPLICATE
            token = again.token  # ours now; released below with the failure
        try:
            if isinstance(outcome, Ack):
                if not handle.recorded and record_soon is not None:
                    # The trigger acks once the record is stored, never before.
                    stored = record_soon(key, token, ttl)
                    # Bound without the call: held by it, a cycle only the GC would free.
                    recover = functools.partial(record_failed, key, token, outcome)
                    call.ack_after = (stored, recover)
                    return outcome
                if not handle.recorded:
                    # Never ack before the record is stored.
                    try:
                        await store.record(key, token, ttl)
                    except StoreUnavailable as failure:
                        await record_again(key, token, failure)
            elif not _timed_out(outcome):
                # (A timed-out plain def's thread runs on: its lease expires by itself,
                # so no other delivery of the key runs beside it until then.)
                await store.release(key, token)
        except StoreUnavailable as exc:
            if isinstance(outcome, Ack):
                return unavailable(call, exc)
            guard.failed(exc)  # the lease expires by itself
        return outcome

    return idempotency
