"""fnhost.metrics: exact counts by outcome, redeliveries, dead letters, consumer pending.

Counts are read from the host's registry (the same samples ``/metrics``
serves) once the effects are seen: after N messages the counters say N.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import generate_latest

import fnhost.metrics
from fnhost.host import Host
from fnhost_sdk.testing import wait_for
from support import module_of

from ._support import HostFactory

pytestmark = pytest.mark.nats

N = 25

MANIFEST = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"], duplicate_window: 1h}
  OUT: {subjects: ["out.>"]}
  DLQ: {subjects: ["dlq.>"]}
functions:
  answer:
    module: fn.py
    handler: answer
    trigger: {request: answer}
  listen:
    module: fn.py
    handler: listen
    trigger: {subject: "listen.>"}
  consume:
    module: fn.py
    handler: consume
    trigger: {stream: IN, subjects: ["in.work.>"], durable: consume}
    output: out.done
    dead_letter: dlq.consume
    retry: {max_deliver: 3, backoff: [10ms]}
"""

FUNCTIONS = {
    "fn.py": """\
        from fnhost_sdk import Context, Reject, Retry


        async def answer(data: dict) -> dict:
            if data.get("fail"):
                raise ValueError("asked to fail")
            return data


        async def listen(data: dict) -> None:
            if data.get("fail"):
                raise ValueError("asked to fail")


        async def consume(data: dict, ctx: Context) -> dict:
            if data.get("reject"):
                raise Reject("rejected")
            if data.get("flaky") and ctx.attempt == 1:
                raise Retry(delay=0.01)
            if data.get("always"):
                raise RuntimeError("always fails")
            return data
        """
}

BLOCKING = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"]}
functions:
  slow:
    module: fn.py
    trigger: {stream: IN, subjects: [in.slow], durable: slow}
    concurrency: 1
"""

BLOCKING_FUNCTIONS = {
    "fn.py": """\
        import asyncio

        release = asyncio.Event()


        async def handle(data: dict) -> None:
            await release.wait()
        """
}


def counts(host: Host, function: str) -> dict[str, int]:
    return {k: v for k, v in host.metrics.counts(function).items() if v}


async def test_request_and_subject_counts_are_exact(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, FUNCTIONS)
    for i in range(N):
        await nc.request("answer", b'{"n": %d}' % i, timeout=5)
    for _ in range(3):
        await nc.request("answer", b'{"fail": true}', timeout=5)
    for i in range(N):
        await nc.publish(f"listen.{i}", b"{}")
    await nc.publish("listen.bad", b'{"fail": true}')

    await wait_for(lambda: sum(host.metrics.counts("listen").values()) == N + 1)
    assert counts(host, "answer") == {"reply": N, "error": 3}
    assert counts(host, "listen") == {"ack": N, "error": 1}
    assert host.metrics.value("fnhost_invocation_duration_seconds_count", function="answer") == (
        N + 3
    )
    assert host.metrics.value("fnhost_inflight", function="answer") == 0


async def test_stream_counts_redeliveries_and_dead_letters_are_exact(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, FUNCTIONS)
    js = nc.jetstream()
    for i in range(N):
        await js.publish(f"in.work.{i}", b'{"n": %d}' % i)
    await js.publish("in.work.flaky", b'{"flaky": true}')
    await js.publish("in.work.reject", b'{"reject": true}')
    await js.publish("in.work.always", b'{"always": true}')

    # N + flaky (nak, ack) + reject (dead letter) + always (nak, nak, dead letter)
    await wait_for(
        lambda: sum(host.metrics.counts("consume").values()) == N + 2 + 1 + 3,
        message="every delivery counted",
    )
    assert counts(host, "consume") == {"ack": N + 1, "nak": 3, "dead_letter": 2}
    assert host.metrics.value("fnhost_redeliveries_total", function="consume") == 3
    assert host.metrics.value("fnhost_dead_lettered_total", function="consume") == 2
    # Outputs and dead-letter copies are publishes.
    assert host.metrics.value("fnhost_messages_published_total", subject="out.done") == N + 1
    assert host.metrics.value("fnhost_messages_published_total", subject="dlq.consume") == 2
    assert host.metrics.value("fnhost_invocation_duration_seconds_count", function="consume") == (
        N + 6
    )

    text = generate_latest(host.metrics.registry).decode()
    for name in (
        "fnhost_messages_total",
        "fnhost_invocation_duration_seconds_bucket",
        "fnhost_messages_published_total",
        "fnhost_inflight",
        "fnhost_redeliveries_total",
        "fnhost_dead_lettered_total",
        "fnhost_consumer_pending_messages",
    ):
        assert f"\n{name}{{" in text, name
    assert "_created" not in text


async def test_consumer_pending_is_refreshed_from_consumer_info(
    host_factory: HostFactory, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fnhost.metrics, "PENDING_REFRESH", 0.05)
    host = await host_factory(BLOCKING, BLOCKING_FUNCTIONS)
    js = nc.jetstream()
    for i in range(6):
        await js.publish("in.slow", b'{"n": %d}' % i)

    def pending() -> float:
        return host.metrics.value("fnhost_consumer_pending_messages", stream="IN", consumer="slow")

    # Concurrency 1: one message is being handled, five wait on the server.
    await wait_for(lambda: pending() == 5, message="pending 5")
    assert host.metrics.value("fnhost_inflight", function="slow") == 1
    module_of(host, "slow").release.set()
    await wait_for(lambda: pending() == 0, message="pending back to 0")
    await wait_for(lambda: host.metrics.counts("slow")["ack"] == 6)


async def test_each_host_has_its_own_registry(host_factory: HostFactory, nc: NatsClient) -> None:
    first = await host_factory(MANIFEST, FUNCTIONS)
    second = await host_factory(MANIFEST, FUNCTIONS)
    assert first.metrics.registry is not second.metrics.registry
    await asyncio.gather(*(nc.request("answer", b"{}", timeout=5) for _ in range(N)))
    total = first.metrics.counts("answer")["reply"] + second.metrics.counts("answer")["reply"]
    assert total == N
