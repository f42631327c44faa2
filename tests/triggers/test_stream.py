"""fnhost.triggers.stream: the JetStream durable pull consumer loop, on a real nats-server.

Acks, naks and terms are observed on the wire: a plain subscriber on
``$JS.ACK.<stream>.<durable>.>`` receives a copy of every acknowledgement the
host sends, so a test sees ``+ACK``, ``-NAK {"delay": ns}``, ``+TERM`` and
``+WPI`` exactly as the server does.
"""

from __future__ import annotations

import asyncio
import json
import logging

import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

import fnhost.triggers.stream
from fnhost.host import Host
from fnhost.manifest import parse_manifest
from fnhost.reload import apply_manifest
from fnhost.triggers.stream import StreamTrigger
from fnhost_sdk.nowait import publish_nowait
from fnhost_sdk.testing import wait_for
from support import module_of, stored_at_ns_of

pytestmark = pytest.mark.nats

STREAMS = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"], duplicate_window: 1h}
  DLQ: {subjects: ["dlq.>"]}
functions:
"""


def manifest(trigger: str = "", name: str = "work", **settings: str) -> str:
    """One stream function ``name`` on ``IN`` (subject ``in.a``) plus ``settings`` lines."""
    text = STREAMS + (
        f"  {name}:\n    module: fn.py\n"
        f"    trigger: {{stream: IN, subjects: [in.a], durable: {name}{trigger}}}\n"
    )
    for key, value in settings.items():
        text += f"    {key}: {value}\n"
    return text


class AckLog:
    """Every acknowledgement the host sends for one consumer, in order, as text."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def on_ack(self, msg: Msg) -> None:
        # nats-py's plain ack() sends an empty body, which the server reads as +ACK.
        self.bodies.append(msg.data.decode() or "+ACK")

    def count(self, prefix: str) -> int:
        return sum(body.startswith(prefix) for body in self.bodies)

    def settled(self) -> list[str]:
        """Everything but in-progress pings."""
        return [body for body in self.bodies if body != "+WPI"]


@pytest.fixture
async def acks(nc: NatsClient) -> AckLog:
    log = AckLog()
    await nc.subscribe("$JS.ACK.IN.>", cb=log.on_ack)
    await nc.flush()
    return log


async def consumer(js: JetStreamContext, durable: str = "work") -> ConsumerInfo:
    return await js.consumer_info("IN", durable)


async def settled(js: JetStreamContext, durable: str = "work", total: int | None = None) -> None:
    """Wait until the consumer has nothing pending and nothing unacknowledged."""

    async def done() -> bool:
        info = await consumer(js, durable)
        floor_ok = total is None or info.ack_floor.stream_seq == total
        return info.num_pending == 0 and info.num_ack_pending == 0 and floor_ok

    await wait_for(done, message=f"consumer {durable} settled")


async def dead_letters(js: JetStreamContext) -> int:
    return (await js.stream_info("DLQ")).state.messages


async def has_dead_letters(js: JetStreamContext, count: int = 1) -> bool:
    return await dead_letters(js) >= count


# ----------------------------------------------------------------- happy path

RECORD = """\
    SEEN = []


    async def handle(data: dict, ctx) -> None:
        SEEN.append((data["i"], ctx.attempt, ctx.stream, ctx.sequence, ctx.subject))
"""


async def test_messages_are_consumed_and_acked_once(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(manifest(), {"fn.py": RECORD})
    module = module_of(host)
    for i in range(20):
        await js.publish("in.a", json.dumps({"i": i}).encode())
    await js.publish("in.other", b'{"i": 99}')  # outside the filter

    await wait_for(lambda: len(module.SEEN) >= 20, message="20 messages handled")
    await settled(js, total=20)
    await wait_for(lambda: acks.count("+ACK") >= 20, message="20 acks on the wire")

    assert sorted(i for i, *_ in module.SEEN) == list(range(20))
    assert {(attempt, stream, subject) for _, attempt, stream, _, subject in module.SEEN} == {
        (1, "IN", "in.a")
    }
    assert sorted(seq for *_, seq, _ in module.SEEN) == list(range(1, 21))
    info = await consumer(js)
    assert info.num_redelivered == 0
    assert info.delivered.stream_seq == 20
    assert acks.settled() == ["+ACK"] * 20


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "declined"])
async def test_plain_acks_are_queued_or_else_sent_by_nats_py(
    host_factory, js: JetStreamContext, acks: AckLog, monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    """An ack goes on nats-py's outgoing buffer without a coroutine; when the buffer
    cannot take it now (reconnecting, draining, full) ``Msg.ack`` sends it: either way
    each message is acked once and never redelivered."""
    queued_acks: list[str] = []

    def spy(nc: NatsClient, subject: str, *args: object) -> bool:
        if not queued:
            return False
        queued_acks.append(subject)
        return publish_nowait(nc, subject, *args)

    monkeypatch.setattr(fnhost.triggers.stream, "publish_nowait", spy)
    host = await host_factory(manifest(), {"fn.py": RECORD})
    for i in range(20):
        await js.publish("in.a", json.dumps({"i": i}).encode())

    await wait_for(lambda: len(module_of(host).SEEN) >= 20, message="20 messages handled")
    await settled(js, total=20)
    await wait_for(lambda: acks.count("+ACK") >= 20, message="20 acks on the wire")

    assert acks.settled() == ["+ACK"] * 20
    assert (await consumer(js)).num_redelivered == 0
    assert len(module_of(host).SEEN) == 20
    assert len(queued_acks) == (20 if queued else 0)
    assert all(subject.startswith("$JS.ACK.IN.work.") for subject in queued_acks)


# --------------------------------------------------------------------- retries

RETRYING = """\
    from fnhost_sdk import Retry

    ATTEMPTS = []


    async def handle(data: dict, ctx) -> None:
        ATTEMPTS.append(ctx.attempt)
        if ctx.attempt < 3:
            raise Retry(delay=0.2)
"""


async def test_retry_naks_with_its_delay_and_the_attempt_counts_up(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(manifest(), {"fn.py": RETRYING})
    await js.publish("in.a", b"{}")

    await wait_for(lambda: acks.count("+ACK") == 1, message="acked after two retries")
    assert module_of(host).ATTEMPTS == [1, 2, 3]
    assert acks.settled() == ['-NAK {"delay": 200000000}'] * 2 + ["+ACK"]
    await settled(js, total=1)


FAILING_ONCE = """\
    ATTEMPTS = []


    async def handle(data: dict, ctx) -> None:
        ATTEMPTS.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("transient")
"""


async def test_an_exception_naks_with_the_functions_backoff(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(
        manifest(retry="{max_deliver: 3, backoff: [300ms, 1s]}"), {"fn.py": FAILING_ONCE}
    )
    await js.publish("in.a", b"{}")

    await wait_for(lambda: acks.count("+ACK") == 1, message="acked on the second attempt")
    assert module_of(host).ATTEMPTS == [1, 2]
    assert acks.settled() == ['-NAK {"delay": 300000000}', "+ACK"]
    await settled(js, total=1)
    assert (await consumer(js)).num_redelivered == 0  # nothing is waiting for redelivery


# ---------------------------------------------------------------- dead letters

ALWAYS_FAILING = """\
    ATTEMPTS = []


    async def handle(data: dict, ctx) -> None:
        ATTEMPTS.append(ctx.attempt)
        raise ValueError("bad thing")
"""


async def test_the_last_attempt_goes_to_the_dead_letter_stream(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(
        manifest(retry="{max_deliver: 3, backoff: [100ms]}", dead_letter="dlq.work"),
        {"fn.py": ALWAYS_FAILING},
    )
    body = b'{"k": 1, "text": "caf\xc3\xa9"}'
    await js.publish("in.a", body, headers={"X-Trace": "abc-123", "X-Tenant": "t1"})

    await wait_for(lambda: has_dead_letters(js), message="a dead letter stored")
    await wait_for(lambda: acks.count("+TERM") == 1, message="the original termed")

    assert module_of(host).ATTEMPTS == [1, 2, 3]
    stored = await js.get_msg("DLQ", 1)
    assert stored.subject == "dlq.work"
    assert stored.data == body
    headers = stored.headers or {}
    assert headers["X-Trace"] == "abc-123"
    assert headers["X-Tenant"] == "t1"
    assert headers["Fnhost-Original-Subject"] == "in.a"
    assert headers["Fnhost-Function"] == "work"
    assert headers["Fnhost-Stream"] == "IN"
    assert headers["Fnhost-Stream-Seq"] == "1"
    assert headers["Fnhost-Attempts"] == "3"
    assert "ValueError" in headers["Fnhost-Error"]
    assert "bad thing" in headers["Fnhost-Error"]
    assert acks.settled() == ['-NAK {"delay": 100000000}'] * 2 + ["+TERM"]
    await settled(js, total=1)
    assert await dead_letters(js) == 1


REJECTING = """\
    from pydantic import BaseModel

    from fnhost_sdk import Reject

    ATTEMPTS = []


    class Order(BaseModel):
        order_id: str


    async def handle(order: Order, ctx) -> None:
        ATTEMPTS.append((order.order_id, ctx.attempt))
        raise Reject(f"order {order.order_id} is not for us")
"""


async def test_reject_dead_letters_after_one_attempt(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(manifest(dead_letter="dlq.work"), {"fn.py": REJECTING})
    await js.publish("in.a", b'{"order_id": "o1"}', headers={"X-Keep": "yes"})

    await wait_for(lambda: has_dead_letters(js), message="a dead letter stored")
    await wait_for(lambda: acks.count("+TERM") == 1, message="the original termed")
    assert module_of(host).ATTEMPTS == [("o1", 1)]
    stored = await js.get_msg("DLQ", 1)
    assert stored.data == b'{"order_id": "o1"}'
    headers = stored.headers or {}
    assert headers["X-Keep"] == "yes"
    assert headers["Fnhost-Attempts"] == "1"
    assert headers["Fnhost-Error"] == "Reject: order o1 is not for us"
    assert acks.settled() == ["+TERM"]
    await settled(js, total=1)


async def test_an_undecodable_payload_is_dead_lettered_at_first_delivery(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(manifest(dead_letter="dlq.work"), {"fn.py": REJECTING})
    await js.publish("in.a", b"\xff not json at all")
    await js.publish("in.a", b'{"wrong": "shape"}')

    await wait_for(lambda: has_dead_letters(js, 2), message="two dead letters stored")
    await wait_for(lambda: acks.count("+TERM") == 2, message="both originals termed")
    assert module_of(host).ATTEMPTS == [], "the handler never ran"
    for seq, original in ((1, b"\xff not json at all"), (2, b'{"wrong": "shape"}')):
        stored = await js.get_msg("DLQ", seq)
        headers = stored.headers or {}
        assert stored.data == original
        assert headers["Fnhost-Attempts"] == "1"
        assert headers["Fnhost-Error"].startswith("PayloadError: ")
    assert "order_id" in (await js.get_msg("DLQ", 2)).headers["Fnhost-Error"]  # type: ignore[index]
    assert acks.settled() == ["+TERM", "+TERM"]


MIXED = """\
    from fnhost_sdk import Reject

    ATTEMPTS = []


    async def handle(data: dict, ctx) -> None:
        ATTEMPTS.append((data["kind"], ctx.attempt))
        if data["kind"] == "reject":
            raise Reject("no")
        raise ValueError("always")
"""


async def test_without_dead_letter_a_rejected_or_exhausted_message_is_termed(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(
        manifest(retry="{max_deliver: 2, backoff: [100ms]}"), {"fn.py": MIXED}
    )
    await js.publish("in.a", b'{"kind": "reject"}')
    await wait_for(lambda: acks.count("+TERM") == 1, message="the rejected message termed")
    await js.publish("in.a", b'{"kind": "fail"}')
    await wait_for(lambda: acks.count("+TERM") == 2, message="the exhausted message termed")

    assert module_of(host).ATTEMPTS == [("reject", 1), ("fail", 1), ("fail", 2)]
    assert acks.settled() == ["+TERM", '-NAK {"delay": 100000000}', "+TERM"]
    await settled(js, total=2)
    assert await dead_letters(js) == 0


async def test_an_undecodable_payload_without_dead_letter_is_termed_not_retried(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    host = await host_factory(manifest(), {"fn.py": REJECTING})
    await js.publish("in.a", b"\xff not json at all")
    await js.publish("in.a", b"[1, 2]")  # JSON, but not an Order

    await wait_for(lambda: acks.count("+TERM") == 2, message="both termed")
    await settled(js, total=2)
    assert module_of(host).ATTEMPTS == [], "the handler never ran"
    assert acks.settled() == ["+TERM", "+TERM"]
    info = await consumer(js)
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 2, "each delivered once"
    assert await dead_letters(js) == 0


# ---------------------------------------------------------------------- output

OUTPUT = """\
    async def handle(data: dict, ctx) -> dict:
        return {"doubled": data["n"] * 2, "attempt": ctx.attempt}
"""


async def test_output_is_published_to_its_stream_with_a_message_id(
    host_factory, js: JetStreamContext, nc: NatsClient
) -> None:
    """The return value goes to ``output:`` with ``Nats-Msg-Id`` = ``<function>:<input
    key>/0``, the input key being the input's own message id, else
    ``<stream>:<sequence>:<storage time in ns>``, so a redelivered input's output is
    dropped by the output stream's duplicate window."""
    text = manifest(output="out.doubled").replace("  DLQ:", '  OUT: {subjects: ["out.>"]}\n  DLQ:')
    await host_factory(text, {"fn.py": OUTPUT})
    await js.publish("in.a", b'{"n": 21}', headers={"Nats-Msg-Id": "order-7"})
    await js.publish("in.a", b'{"n": 5}')

    async def two_outputs() -> bool:
        return (await js.stream_info("OUT")).state.messages == 2

    await wait_for(two_outputs, message="two outputs stored")
    await settled(js, total=2)
    first, second = await js.get_msg("OUT", 1), await js.get_msg("OUT", 2)
    stored_at_ns = await stored_at_ns_of(nc, "IN", 2)
    by_id = {
        (msg.headers or {}).get("Nats-Msg-Id"): json.loads(msg.data) for msg in (first, second)
    }
    assert by_id == {
        "work:order-7/0": {"doubled": 42, "attempt": 1},
        f"work:IN:2:{stored_at_ns}/0": {"doubled": 10, "attempt": 1},
    }
    assert first.subject == second.subject == "out.doubled"


# ------------------------------------------------------------ flow control

SLOW = """\
    import asyncio

    ACTIVE = 0
    MAX = 0
    DONE = []


    async def handle(data: dict) -> None:
        global ACTIVE, MAX
        ACTIVE += 1
        MAX = max(MAX, ACTIVE)
        try:
            await asyncio.sleep(0.01)
        finally:
            ACTIVE -= 1
        DONE.append(data["i"])
"""


def stream_trigger(host: Host, function: str = "work") -> StreamTrigger:
    trigger = host.functions[function].trigger
    assert isinstance(trigger, StreamTrigger), host.functions[function].error
    return trigger


@pytest.mark.parametrize("ack", ["plain", "sync"])
async def test_never_more_in_flight_or_asked_for_than_the_concurrency(
    host_factory, js: JetStreamContext, ack: str
) -> None:
    """The pull loop asks only for as many messages as it has free slots: a message
    fetched while no slot is free would sit with its ack wait running.

    Sampled hundreds of times while 600 messages flow into a slow handler: the host
    never holds (runs, queues or has asked for) more than the concurrency. With
    ``ack: sync`` a slot is free only once the server confirmed the ack, so the
    server's own count of delivered, unacknowledged messages (``num_ack_pending``)
    never exceeds it either. (With a plain ack it may, briefly, by the acks still
    in flight: the server processes acks and pull requests on separate queues.)
    """
    total = 600
    host = await host_factory(manifest(concurrency="4", ack=ack), {"fn.py": SLOW})
    module = module_of(host)
    trigger = stream_trigger(host)
    server_samples: list[int] = []
    host_samples: list[int] = []

    async def sample() -> None:
        while len(module.DONE) < total:
            host_samples.append(trigger.held)
            info = await consumer(js)
            server_samples.append(info.num_ack_pending)
            host_samples.append(trigger.held)

    sampler = asyncio.ensure_future(sample())
    try:
        for i in range(total):
            await js.publish("in.a", json.dumps({"i": i}).encode())
            host_samples.append(trigger.held)
        await wait_for(lambda: len(module.DONE) >= total, timeout=60, message="all handled")
    finally:
        await sampler
    await settled(js, total=total)

    assert sorted(module.DONE) == list(range(total))
    assert module.MAX == 4
    assert len(server_samples) >= 50, f"only {len(server_samples)} samples"
    assert max(host_samples) == 4, "the host filled its slots"
    assert max(server_samples) >= 1
    if ack == "sync":
        over = [pending for pending in server_samples if pending > 4]
        assert not over, (
            f"num_ack_pending above concurrency 4 in {len(over)} of {len(server_samples)}"
        )
    assert (await consumer(js)).num_redelivered == 0


GATED = """    import asyncio

    STARTED = []
    GATE = asyncio.Event()


    async def handle(data: dict) -> None:
        STARTED.append(data["i"])
        await GATE.wait()
"""


async def test_blocked_handlers_hold_no_more_messages_than_their_slots(
    host_factory, js: JetStreamContext
) -> None:
    """Concurrency 2, both handlers blocked, 50 messages waiting: the server must show
    exactly 2 delivered and unacknowledged, the other 48 still pending in the stream
    (not fetched into the host where their ack wait would run out)."""
    host = await host_factory(manifest(concurrency="2"), {"fn.py": GATED})
    module = module_of(host)
    for i in range(50):
        await js.publish("in.a", json.dumps({"i": i}).encode())

    await wait_for(lambda: len(module.STARTED) == 2, message="two handlers running")

    async def holding_two() -> ConsumerInfo | None:
        info = await consumer(js)
        # num_waiting == 0: no pull request outstanding, nothing more is coming.
        ok = info.num_ack_pending == 2 and info.num_pending == 48 and info.num_waiting == 0
        return info if ok else None

    await wait_for(holding_two, message="2 delivered, 48 pending, no pull request waiting")
    assert stream_trigger(host).held == 2
    assert len(module.STARTED) == 2

    module.GATE.set()
    await wait_for(lambda: len(module.STARTED) == 50, timeout=30, message="all 50 handled")
    await settled(js, total=50)
    assert sorted(module.STARTED) == list(range(50))
    assert (await consumer(js)).num_redelivered == 0


LOOP_TURNS_COUNTED = """    import asyncio

    LOOP_TURNS = [0]
    ARRIVED_AT_TURN = {}
    STARTED_AT_TURN = {}
    GATE = asyncio.Event()


    async def count_loop_turns() -> None:
        while not GATE.is_set():
            LOOP_TURNS[0] += 1
            await asyncio.sleep(0)


    async def handle(data: dict) -> None:
        STARTED_AT_TURN[data["i"]] = LOOP_TURNS[0]
        await GATE.wait()
"""

WORKER_NAMES = """    import asyncio

    WORKERS = []


    async def handle(data: dict) -> None:
        task = asyncio.current_task()
        WORKERS.append(task.get_name() if task else "")
"""


async def burst_waiting(js: JetStreamContext, count: int) -> None:
    """``count`` messages in stream IN before the host starts: its first pull gets them all."""
    await js.add_stream(name="IN", subjects=["in.>"], duplicate_window=3600)
    for i in range(count):
        await js.publish("in.a", json.dumps({"i": i}).encode())


async def test_a_burst_of_handlers_that_suspend_starts_within_a_few_loop_turns(
    host_factory, js: JetStreamContext, monkeypatch
) -> None:
    """64 messages at once to 64 handlers that suspend at their first await (as one
    waiting for its idempotency lease does): the workers wake 1, 4, 16, ... a loop turn,
    so each handler starts within a few turns of its message arriving in the trigger's
    backlog, and the first writes of the handlers of one delivery leave the host
    together. Woken one at a time, the last of n messages arriving together started n
    turns after it arrived.

    Turns are counted from each message's own arrival (a wrapped ``enqueue``), not from
    the first handler's start: on a loaded machine the burst reaches the host in several
    socket reads, many turns apart."""
    enqueue = StreamTrigger.enqueue
    counters: list[asyncio.Task[None]] = []

    def arrived(trigger: StreamTrigger, msg: Msg) -> None:
        module = trigger.runtime.loaded.module
        if not counters:  # the first delivery: count turns from here on
            counters.append(asyncio.get_running_loop().create_task(module.count_loop_turns()))
        module.ARRIVED_AT_TURN[json.loads(msg.data)["i"]] = module.LOOP_TURNS[0]
        enqueue(trigger, msg)

    monkeypatch.setattr(StreamTrigger, "enqueue", arrived)
    await burst_waiting(js, 64)
    host = await host_factory(manifest(concurrency="64"), {"fn.py": LOOP_TURNS_COUNTED})
    module = module_of(host)
    try:
        await wait_for(lambda: len(module.STARTED_AT_TURN) == 64, message="64 handlers running")
        arrivals = sorted(module.ARRIVED_AT_TURN.items())
        waited = {i: module.STARTED_AT_TURN[i] - turn for i, turn in arrivals}
        # Fan-out 4: the last of 64 arriving together starts 4 turns after them (1, 4,
        # 16, 43 start in turns 1 to 4); one worker a turn: 64 turns.
        assert max(waited.values()) <= 6, (waited, arrivals)
    finally:
        module.GATE.set()
        await asyncio.gather(*counters)
    await settled(js, total=64)


async def test_a_burst_of_quick_handlers_runs_in_a_few_workers(
    host_factory, js: JetStreamContext
) -> None:
    """64 messages at once to handlers that never suspend: the first woken worker runs
    them back to back (no task switch per message); the workers it wakes find the
    backlog empty."""
    await burst_waiting(js, 64)
    host = await host_factory(manifest(concurrency="64"), {"fn.py": WORKER_NAMES})
    module = module_of(host)
    await wait_for(lambda: len(module.WORKERS) == 64, message="64 handled")
    await settled(js, total=64)
    assert len(set(module.WORKERS)) <= 8, sorted(set(module.WORKERS))


async def test_a_single_message_to_an_idle_consumer_is_handled_promptly(
    host_factory, js: JetStreamContext
) -> None:
    host = await host_factory(manifest(), {"fn.py": RECORD})
    module = module_of(host)

    async def pull_waiting() -> bool:
        return (await consumer(js)).num_waiting >= 1

    await wait_for(pull_waiting, message="the host's pull request is waiting on the server")
    await js.publish("in.a", b'{"i": 1}')
    # Well before the pull request's 30 s expiry.
    await wait_for(lambda: module.SEEN, timeout=5, message="the message handled")
    await js.publish("in.a", b'{"i": 2}')
    await wait_for(lambda: len(module.SEEN) == 2, timeout=5, message="the next one too")


async def test_a_message_delivered_after_intake_stopped_is_naked_for_another_host(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    """A draining host's pull request stays on the server until it expires: what the
    server still sends it is nak'ed at once, not dropped (which would hold the message
    back for ack_wait, a minute here) - another host gets it as attempt 2."""
    trigger_settings = ", ack_wait: 60s"
    draining = await host_factory(manifest(trigger_settings), {"fn.py": RECORD})

    async def pulls_waiting(count: int) -> bool:
        return (await consumer(js)).num_waiting >= count

    await wait_for(lambda: pulls_waiting(1), message="the first host's pull request waits")
    trigger = draining.functions["work"].trigger
    assert trigger is not None
    await trigger.stop_intake()
    other = await host_factory(manifest(trigger_settings), {"fn.py": RECORD})
    await wait_for(lambda: pulls_waiting(2), message="both hosts' pull requests wait")

    # The server serves waiting pull requests in order: the draining host's first.
    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: acks.count("-NAK") == 1, message="the draining host nak'ed it")
    seen = module_of(other).SEEN
    await wait_for(lambda: seen, timeout=20, message="the other host handled it")
    assert [(i, attempt) for i, attempt, *_ in seen] == [(1, 2)]
    assert module_of(draining).SEEN == []


@pytest.mark.parametrize("max_deliver_1", ["from-the-start", "by-a-reload"])
async def test_a_last_attempt_delivered_after_intake_stopped_is_run_not_naked(
    host_factory, js: JetStreamContext, acks: AckLog, max_deliver_1: str
) -> None:
    """A nak counts as a delivery: nak'ing a message's last allowed delivery would leave
    it never run again. The draining host runs that one within its grace instead, by
    the max_deliver in force (a reload may have lowered it without a new trigger)."""
    final = manifest(", ack_wait: 60s", retry="{max_deliver: 1, backoff: [1s]}")
    first = (
        final
        if max_deliver_1 == "from-the-start"
        else final.replace("max_deliver: 1", "max_deliver: 3")
    )
    draining = await host_factory(first, {"fn.py": RECORD})
    if first != final:
        root = draining.manifest.root
        await apply_manifest(draining, parse_manifest(final, file=str(root / "fn.yaml"), root=root))
        assert (await consumer(js)).config.max_deliver == 1
    await wait_for(
        lambda: _pulls_waiting(js), message="the host's pull request waits on the server"
    )
    trigger = draining.functions["work"].trigger
    assert trigger is not None
    await trigger.stop_intake()

    await js.publish("in.a", b'{"i": 1}')
    await settled(js, total=1)
    assert [(i, attempt) for i, attempt, *_ in module_of(draining).SEEN] == [(1, 1)]
    assert acks.settled() == ["+ACK"]


async def _pulls_waiting(js: JetStreamContext) -> bool:
    return (await consumer(js)).num_waiting >= 1


async def test_an_empty_stream_is_quiet_and_normal(
    host_factory, js: JetStreamContext, nc: NatsClient, monkeypatch, caplog
) -> None:
    """Pull requests that expire without messages (408) are the normal state of an idle
    function: nothing is logged at warning level, the consumer is not "recovered", and
    each new pull request follows an expired one (no busy loop of pull requests)."""
    # Short pull requests so that several expire within the test (defaults: 30 s / 5 s).
    # (Not shorter: a heartbeat missed for two intervals on a loaded machine would make the
    # host recover the pull, with a warning, for the wrong reason.)
    monkeypatch.setitem(StreamTrigger.__init__.__kwdefaults__, "expires", 3.0)
    monkeypatch.setitem(StreamTrigger.__init__.__kwdefaults__, "idle_heartbeat", 1.5)
    caplog.set_level(logging.INFO, logger="fnhost")
    pulls: list[Msg] = []
    expired: list[Msg] = []

    async def on_pull(msg: Msg) -> None:
        pulls.append(msg)

    async def on_inbox(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") == "408":
            expired.append(msg)

    await nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.IN.work", cb=on_pull)
    await nc.subscribe("_INBOX.>", cb=on_inbox)
    await nc.flush()
    host = await host_factory(manifest(), {"fn.py": RECORD})
    module = module_of(host)

    await wait_for(lambda: len(expired) >= 2, timeout=30, message="two empty pulls expired")
    await wait_for(lambda: len(pulls) >= 3, message="a new pull request after each expiry")

    assert len(pulls) <= len(expired) + 1, "a pull request only once the previous one expired"
    assert all(json.loads(pull.data)["batch"] >= 1 for pull in pulls)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert host.functions["work"].status == "running"

    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: module.SEEN, message="a message after the idle spell is handled")


# ------------------------------------------------------------ consumer config


async def test_the_consumer_on_the_server_matches_the_manifest(
    host_factory, js: JetStreamContext
) -> None:
    text = manifest(
        trigger=", ack_wait: 7s, max_ack_pending: 12, deliver: new",
        concurrency="6",
        retry="{max_deliver: 4, backoff: [1s, 2s]}",
    ).replace("subjects: [in.a]", "subjects: [in.a, in.b]")
    text += "  plain:\n    module: fn.py\n    trigger: {stream: IN, subjects: [in.c]}\n"
    text += "    concurrency: 3\n"
    await host_factory(text, {"fn.py": RECORD})

    config = (await consumer(js, "work")).config
    assert config.durable_name == "work"
    assert config.deliver_subject is None, "a pull consumer"
    assert config.ack_policy == "explicit"
    assert config.ack_wait == 7.0
    assert config.max_deliver == 4
    assert config.max_ack_pending == 12
    assert sorted(config.filter_subjects or [config.filter_subject]) == ["in.a", "in.b"]
    assert config.deliver_policy == "new"
    assert not config.backoff, "BackOff must stay unset: it would replace ack_wait"

    config = (await consumer(js, "plain")).config  # the durable defaults to the function name
    assert config.ack_wait == 30.0
    assert config.max_deliver == 5
    assert config.max_ack_pending == 6, "2 x concurrency"
    assert (config.filter_subjects or [config.filter_subject]) == ["in.c"]
    assert config.deliver_policy == "all"
    assert not config.backoff


async def test_provisioning_is_idempotent_and_updates_a_changed_consumer_in_place(
    host_factory, js: JetStreamContext
) -> None:
    first = await host_factory(manifest(trigger=", ack_wait: 10s"), {"fn.py": RECORD})
    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: module_of(first).SEEN, message="the first message handled")
    await settled(js, total=1)
    original = await consumer(js)
    assert original.config.ack_wait == 10.0

    # The same manifest again (a second host): the consumer is left as it is.
    await host_factory(manifest(trigger=", ack_wait: 10s"), {"fn.py": RECORD})
    again = await consumer(js)
    assert again.created == original.created
    assert again.config == original.config
    assert again.ack_floor.stream_seq == 1

    # A changed manifest: updated in place, its position kept (not deleted and re-created,
    # which would deliver message 1 again under the `all` deliver policy).
    await host_factory(
        manifest(trigger=", ack_wait: 20s", retry="{max_deliver: 7, backoff: [1s]}"),
        {"fn.py": RECORD},
    )
    updated = await consumer(js)
    assert updated.config.ack_wait == 20.0
    assert updated.config.max_deliver == 7
    assert not updated.config.backoff
    assert updated.created == original.created
    assert updated.ack_floor.stream_seq == 1
    assert updated.num_pending == 0


@pytest.mark.slow
async def test_a_consumer_deleted_on_the_server_is_recreated(
    host_factory, js: JetStreamContext
) -> None:
    host = await host_factory(manifest(trigger=", ack_wait: 9s"), {"fn.py": RECORD})
    module = module_of(host)
    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: module.SEEN, message="the first message handled")
    await settled(js, total=1)

    # Counted before the delete: the host (on this event loop) may re-create the consumer
    # and handle message 2 while the test still awaits its PubAck.
    seen_before = len(module.SEEN)
    await js.delete_consumer("IN", "work")
    await js.publish("in.a", b'{"i": 2}')  # stored while no consumer exists (or just after)

    # Re-created within two idle-heartbeat windows (2 x 5 s).
    info = await wait_for(
        lambda: consumer(js),
        timeout=15,
        ignore=(nats.js.errors.NotFoundError,),
        message="consumer re-created",
    )
    assert info.config.ack_wait == 9.0, "re-created from the manifest"
    handled = lambda i: any(seen[0] == i for seen in module.SEEN[seen_before:])  # noqa: E731
    await wait_for(lambda: handled(2), timeout=15, message="messages flow again")
    await js.publish("in.a", b'{"i": 3}')
    await wait_for(lambda: handled(3), timeout=10, message="and keep flowing")
    # (The re-created consumer starts from the manifest's deliver policy, `all`, so
    # message 1, acked on the deleted consumer, is delivered again: at-least-once.)


async def test_a_consumer_deleted_while_no_pull_was_waiting_is_recreated(
    host_factory, js: JetStreamContext, monkeypatch
) -> None:
    """Deleted while the only slot was busy, so no pull request was there to get the
    server's "Consumer Deleted": the next pull request meets no responder (503), and
    that alone must bring the consumer back, without waiting for missed heartbeats
    (set to a minute here, longer than the test waits)."""
    monkeypatch.setitem(StreamTrigger.__init__.__kwdefaults__, "expires", 120.0)
    monkeypatch.setitem(StreamTrigger.__init__.__kwdefaults__, "idle_heartbeat", 60.0)
    host = await host_factory(manifest(concurrency="1"), {"fn.py": GATED})
    module = module_of(host)
    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: module.STARTED == [1], message="the first message running")

    async def no_pull_waiting() -> bool:
        return (await consumer(js)).num_waiting == 0

    await wait_for(no_pull_waiting, message="the host holds no pull request")
    await js.delete_consumer("IN", "work")
    await js.publish("in.a", b'{"i": 2}')
    module.GATE.set()

    info = await wait_for(
        lambda: consumer(js),
        timeout=20,
        ignore=(nats.js.errors.NotFoundError,),
        message="consumer re-created",
    )
    assert info.config.max_ack_pending == 2, "re-created from the manifest"
    await wait_for(lambda: 2 in module.STARTED, timeout=20, message="messages flow again")


async def test_a_pull_given_up_while_the_server_was_frozen_does_not_come_back_on_top(
    host_factory, js: JetStreamContext, nats_server, monkeypatch
) -> None:
    """Heartbeats stop while the server is frozen (SIGSTOP), so the host gives its pull
    request up and asks again. That request was not lost: when the server wakes, it
    must not be served as well, or the host would hold more messages than its
    concurrency, and one would wait unpinged in the backlog past its ack wait."""
    monkeypatch.setitem(StreamTrigger.__init__.__kwdefaults__, "idle_heartbeat", 1.0)
    host = await host_factory(manifest(concurrency="1"), {"fn.py": GATED})
    module = module_of(host)
    trigger = host.functions["work"].trigger
    assert isinstance(trigger, StreamTrigger)
    await wait_for(lambda: _pulls_waiting(js), message="the host's pull request waits")

    given_up_inbox = trigger._inbox
    nats_server.pause()
    try:
        await wait_for(
            lambda: trigger._inbox != given_up_inbox,
            timeout=30,
            message="the host gave its pull up and asked again",
        )
    finally:
        nats_server.resume()
    await js.publish("in.a", b'{"i": 1}')
    await wait_for(lambda: module.STARTED == [1], message="the first message running")
    await js.publish("in.a", b'{"i": 2}')

    # The host has no slot for message 2: a pull request of the test's own gets it.
    mine = await js.pull_subscribe_bind("work", stream="IN")
    [second] = await mine.fetch(1, timeout=15)
    assert json.loads(second.data) == {"i": 2}
    await second.nak()
    assert trigger.held <= 1
    module.GATE.set()
    await settled(js, total=2)


# --------------------------------------------------------------- long handlers

LONG = """\
    import asyncio

    ATTEMPTS = []
    DONE = []


    async def handle(data: dict, ctx) -> None:
        ATTEMPTS.append(ctx.attempt)
        if ctx.attempt == 1:
            # Work (2.5 s unless configured) that does not give way to cancellation (like
            # a blocking call).
            loop = asyncio.get_running_loop()
            end = loop.time() + ctx.config.get("work_seconds", 2.5)
            while loop.time() < end:
                try:
                    await asyncio.sleep(end - loop.time())
                except asyncio.CancelledError:
                    pass
        DONE.append(ctx.attempt)
"""


@pytest.mark.slow
async def test_progress_pings_keep_a_long_handler_from_being_redelivered(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    # Pings every ack_wait/3 = 1 s; 7 s of work outlives the ack wait twice over. (A 3 s
    # ack wait, not shorter, so that a loaded machine's stalls do not skip a ping's window.)
    host = await host_factory(
        manifest(
            trigger=", ack_wait: 3s",
            timeout="10s",
            concurrency="2",
            config="{work_seconds: 7}",
        ),
        {"fn.py": LONG},
    )
    module = module_of(host)
    await js.publish("in.a", b"{}")

    await wait_for(lambda: module.DONE, timeout=30, message="the long handler finished")
    await settled(js, total=1)
    assert module.ATTEMPTS == [1], "redelivered while it ran"
    assert (await consumer(js)).num_redelivered == 0
    assert acks.count("+WPI") >= 2
    assert acks.settled() == ["+ACK"]


@pytest.mark.slow
async def test_without_progress_pings_a_long_handler_is_redelivered(
    host_factory, js: JetStreamContext, acks: AckLog
) -> None:
    """The control for the test above: the same handler, pings off."""
    host = await host_factory(
        manifest(
            trigger=", ack_wait: 1s", timeout="900ms", concurrency="2", progress_pings="false"
        ),
        {"fn.py": LONG},
    )
    module = module_of(host)
    await js.publish("in.a", b"{}")

    await wait_for(lambda: 2 in module.ATTEMPTS, timeout=10, message="redelivered")
    # By the ack wait running out, while attempt 1 still ran: not by a nak (its timeout's
    # nak comes only when its 2.5 s of work ends).
    assert 1 not in module.DONE and acks.count("-NAK") == 0, (module.DONE, acks.bodies)
    await wait_for(lambda: len(module.DONE) >= 2, timeout=10, message="both attempts ended")
    assert acks.count("+WPI") == 0
