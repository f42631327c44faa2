"""Prometheus metrics, on a registry of the host's own (``host.metrics``).

Names (DESIGN.md "Wire conventions"): ``fnhost_messages_total{function,outcome}``
with every message under exactly one outcome, ``fnhost_invocation_duration_seconds``,
``fnhost_messages_published_total{subject}``, ``fnhost_inflight``,
``fnhost_redeliveries_total``, ``fnhost_dead_lettered_total``, and
``fnhost_consumer_pending_messages{stream,consumer}`` refreshed from consumer
info every few seconds so an autoscaler (KEDA, HPA) can scale on it.

Label children are resolved once per function load; per message the
middleware does a few increments and one histogram observation. The
built-in plugin :mod:`fnhost.plugins.metrics` puts it in every chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.samples import Sample

from fnhost.manifest import FunctionSpec
from fnhost.types import CallNext, Invocation, Middleware, Outcome

if TYPE_CHECKING:
    from fnhost.host import Host

log = logging.getLogger("fnhost.metrics")

OUTCOMES = ("ack", "nak", "term", "dead_letter", "duplicate", "reply", "error")
PENDING_REFRESH = 5.0
"""Seconds between consumer-info refreshes of the pending gauges."""

# The *_created series double every counter for no use of ours (process-wide switch).
disable_created_metrics()  # type: ignore[no-untyped-call]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HostMetrics:
    """The metric families of one host."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.messages = Counter(
            "fnhost_messages",
            "Messages handled, by outcome.",
            ["function", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "fnhost_invocation_duration_seconds",
            "Time from message to outcome.",
            ["function"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.published = Counter(
            "fnhost_messages_published",
            "Messages published by functions.",
            ["subject"],
            registry=registry,
        )
        self.inflight = Gauge(
            "fnhost_inflight", "Invocations running now.", ["function"], registry=registry
        )
        self.redeliveries = Counter(
            "fnhost_redeliveries",
            "Stream deliveries after the first.",
            ["function"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "fnhost_dead_lettered",
            "Messages sent to a dead-letter subject.",
            ["function"],
            registry=registry,
        )
        self.pending = Gauge(
            "fnhost_consumer_pending_messages",
            "Messages not yet delivered to the consumer.",
            ["stream", "consumer"],
            registry=registry,
        )
        self.ack_pending = Gauge(
            "fnhost_consumer_ack_pending_messages",
            "Delivered messages not yet acked.",
            ["stream", "consumer"],
            registry=registry,
        )
        self._published_children: dict[str, Counter] = {}
        self._refresher: asyncio.Task[None] | None = None

    def counts(self, function: str) -> dict[str, int]:
        """Messages of ``function`` by outcome (read for ``/functions``, not on the hot path)."""
        found = dict.fromkeys(OUTCOMES, 0)
        for sample in self._samples("fnhost_messages_total"):
            if sample.labels.get("function") == function:
                found[sample.labels["outcome"]] = int(sample.value)
        return found

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent)."""
        for sample in self._samples(name):
            if all(sample.labels.get(key) == want for key, want in labels.items()):
                return float(sample.value)
        return 0.0

    def _samples(self, name: str) -> Iterator[Sample]:
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    yield sample

    def middleware(self, function: FunctionSpec) -> Middleware:
        name = function.name
        by_outcome = {outcome: self.messages.labels(name, outcome) for outcome in OUTCOMES}
        observe = self.duration.labels(name).observe
        inflight = self.inflight.labels(name)
        redelivered = self.redeliveries.labels(name)
        dead_lettered = self.dead_lettered.labels(name)
        clock = time.perf_counter

        async def metrics(call: Invocation, call_next: CallNext) -> Outcome:
            started = clock()
            inflight.inc()
            if call.attempt > 1:
                redelivered.inc()
            try:
                outcome = await call_next(call)
            except Exception:
                by_outcome["error"].inc()
                raise
            finally:
                inflight.dec()
                observe(clock() - started)
            label = outcome.label
            by_outcome[label].inc()
            if label == "dead_letter":
                dead_lettered.inc()
            return outcome

        return metrics

    def count_publish(self, subject: str, headers: dict[str, str]) -> None:
        child = self._published_children.get(subject)
        if child is None:
            child = self._published_children[subject] = self.published.labels(subject)
        child.inc()

    def start_refresher(self, host: Host) -> None:
        """Refresh the consumer gauges every :data:`PENDING_REFRESH` seconds until stopped."""
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh(host), name="fnhost-metrics-pending"
        )

    async def stop_refresher(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None

    async def refresh_pending(self, host: Host) -> None:
        """Read consumer info of every stream function the host runs now, once."""
        for state in list(host.functions.values()):
            trigger = state.spec.trigger
            stream, durable = trigger.stream, trigger.durable_name
            if trigger.kind != "stream" or stream is None or durable is None:
                continue
            try:
                info = await host.js.consumer_info(stream, durable, timeout=2)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("consumer info %s/%s: %s", stream, durable, exc)
                continue
            self.pending.labels(stream, durable).set(info.num_pending or 0)
            self.ack_pending.labels(stream, durable).set(info.num_ack_pending or 0)

    async def _refresh(self, host: Host) -> None:
        # Functions are read each round: a reload or a deploy adds and removes them.
        while True:
            if host.connected:
                await self.refresh_pending(host)
            await asyncio.sleep(PENDING_REFRESH)
