"""Prometheus metrics, on a registry of the host's own (``host.metrics``).

Names (DESIGN.md "Wire conventions"): ``fnhost_messages_total{function,outcome}``
with every message under exactly one outcome, ``fnhost_invocation_duration_seconds``,
``fnhost_messages_published_total{subject}``, ``fnhost_inflight``,
``fnhost_redeliveries_total``, ``fnhost_dead_lettered_total``,
``fnhost_slow_consumer_dropped_total{function,subscription}``, and
``fnhost_consumer_pending_messages{stream,consumer}`` refreshed from consumer
info every few seconds so an autoscaler (KEDA, HPA) can scale on it.

The per-message numbers are plain attributes of one small object per
function, bumped by the middleware and turned into metric families only when
``/metrics`` is scraped (a custom collector). prometheus-client's own
counters take a lock per increment and walk the histogram buckets in Python:
about 3 us a message on this machine, against well under 1 us here. No lock
is needed because every update happens on the host's event loop (the
middleware runs there, plain-``def`` handlers only run *inside* it on a
thread), and so does every scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from fnhost.manifest import FunctionSpec
from fnhost.tasks import cancel_and_wait
from fnhost.types import CallNext, Invocation, Middleware, Outcome

if TYPE_CHECKING:
    from fnhost.host import Host

log = logging.getLogger("fnhost.metrics")

OUTCOMES = ("ack", "nak", "term", "dead_letter", "duplicate", "reply", "error", "refused")
PENDING_REFRESH = 5.0
"""Seconds between consumer-info refreshes of the pending gauges."""

# The *_created series double every counter for no use of ours (process-wide switch).
disable_created_metrics()  # type: ignore[no-untyped-call]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Upper bounds (seconds) of the invocation duration histogram; ``+Inf`` is added."""

# The ``le`` labels as prometheus-client writes them ("0.0005", "1.0", "+Inf").
_BOUND_LABELS = [repr(float(bound)) for bound in BUCKETS] + ["+Inf"]


class FunctionStats:
    """The running numbers of one function (kept across reloads of the function)."""

    __slots__ = ("buckets", "dead_lettered", "duration_sum", "inflight", "outcomes", "redeliveries")

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.inflight = 0
        self.redeliveries = 0
        self.dead_lettered = 0


class HostMetrics:
    """The metric families of one host."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.functions: dict[str, FunctionStats] = {}
        self.published: dict[str, int] = {}
        self.slow_consumer_drops: dict[tuple[str, str], int] = {}
        self.registry.register(self)  # a collector: it has collect()
        self.pending = Gauge(
            "fnhost_consumer_pending_messages",
            "Messages not yet delivered to the consumer.",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self.ack_pending = Gauge(
            "fnhost_consumer_ack_pending_messages",
            "Delivered messages not yet acked.",
            ["stream", "consumer"],
            registry=self.registry,
        )
        self._refresher: asyncio.Task[None] | None = None

    def stats(self, function: str) -> FunctionStats:
        found = self.functions.get(function)
        if found is None:
            found = self.functions[function] = FunctionStats()
        return found

    def counts(self, function: str) -> dict[str, int]:
        """Messages of ``function`` by outcome (read for ``/functions``, not on the hot path)."""
        found = self.functions.get(function)
        return dict(found.outcomes) if found else dict.fromkeys(OUTCOMES, 0)

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

    def collect(self) -> Iterator[Metric]:
        """The families of the per-message numbers, built at scrape time."""
        messages = CounterMetricFamily(
            "fnhost_messages", "Messages handled, by outcome.", labels=["function", "outcome"]
        )
        duration = HistogramMetricFamily(
            "fnhost_invocation_duration_seconds",
            "Time from message to outcome.",
            labels=["function"],
        )
        inflight = GaugeMetricFamily(
            "fnhost_inflight", "Invocations running now.", labels=["function"]
        )
        redeliveries = CounterMetricFamily(
            "fnhost_redeliveries", "Stream deliveries after the first.", labels=["function"]
        )
        dead_lettered = CounterMetricFamily(
            "fnhost_dead_lettered",
            "Dead-letter copies stored (by the stream trigger or the max-deliveries watcher).",
            labels=["function"],
        )
        published = CounterMetricFamily(
            "fnhost_messages_published", "Messages published by functions.", labels=["subject"]
        )
        for name, stats in self.functions.items():
            for outcome, count in stats.outcomes.items():
                messages.add_metric([name, outcome], count)
            cumulative, running = [], 0
            for bound, count in zip(_BOUND_LABELS, stats.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            duration.add_metric([name], cumulative, sum_value=stats.duration_sum)
            inflight.add_metric([name], stats.inflight)
            redeliveries.add_metric([name], stats.redeliveries)
            dead_lettered.add_metric([name], stats.dead_lettered)
        for subject, count in self.published.items():
            published.add_metric([subject], count)
        slow_consumer = CounterMetricFamily(
            "fnhost_slow_consumer_dropped",
            "Messages the NATS client dropped because a subscription fell behind.",
            labels=["function", "subscription"],
        )
        for (function, subscription), count in self.slow_consumer_drops.items():
            slow_consumer.add_metric([function, subscription], count)
        yield from (
            messages,
            duration,
            inflight,
            redeliveries,
            dead_lettered,
            published,
            slow_consumer,
        )

    def middleware(self, function: FunctionSpec) -> Middleware:
        stats = self.stats(function.name)
        outcomes = stats.outcomes
        buckets = stats.buckets
        bounds = BUCKETS
        clock = time.perf_counter

        async def metrics(call: Invocation, call_next: CallNext) -> Outcome:
            started = clock()
            stats.inflight += 1
            if call.attempt > 1:
                stats.redeliveries += 1
            try:
                outcome = await call_next(call)
            except Exception:
                outcomes["error"] += 1
                raise
            finally:
                stats.inflight -= 1
                elapsed = clock() - started
                buckets[bisect_left(bounds, elapsed)] += 1
                stats.duration_sum += elapsed
            outcomes[outcome.label] += 1
            return outcome

        return metrics

    def count_dead_letter(self, function: str) -> None:
        """One dead-letter copy stored, counted where its PubAck arrives: a copy that
        could not be stored counts nothing, one stored by both paths counts once."""
        self.stats(function).dead_lettered += 1

    def count_refused(self, function: str) -> None:
        """A core message a draining host turned away unrun: a 503 to a request; a subject
        message is dropped (core NATS is at-most-once)."""
        self.stats(function).outcomes["refused"] += 1

    def count_slow_consumer(self, function: str, subscription: str) -> int:
        """One message dropped by the client for ``subscription`` (of ``function``, or
        ``""`` for one of the host's own); returns how many it dropped so far."""
        key = (function, subscription)
        dropped = self.slow_consumer_drops[key] = self.slow_consumer_drops.get(key, 0) + 1
        return dropped

    def count_publish(self, subject: str, headers: dict[str, str]) -> None:
        published = self.published
        published[subject] = published.get(subject, 0) + 1

    def start_refresher(self, host: Host) -> None:
        """Refresh the consumer gauges every :data:`PENDING_REFRESH` seconds until stopped."""
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh(host), name="fnhost-metrics-pending"
        )

    async def stop_refresher(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait([self._refresher])
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
