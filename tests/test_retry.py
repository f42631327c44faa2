"""The retry plugin (fnhost.plugins.retry) on a real nats-server: attempts and back-off.

Naks are read on the wire (a plain subscriber on ``$JS.ACK.IN.>`` sees every
acknowledgement the host sends), so the delays asserted are the ones the
server was asked for, not wall-clock measurements.
"""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fnhost.triggers.stream import delivery_of
from fnhost_sdk.testing import wait_for
from support import module_of

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: false
streams:
  IN: {{subjects: ["in.>"]}}
  DLQ: {{subjects: ["dlq.>"]}}
functions:
  work:
    module: fn.py
    trigger: {{stream: IN, durable: work}}
    retry: {{max_deliver: {max_deliver}, backoff: [{backoff}]}}
    dead_letter: dlq.work
"""

HANDLER = """\
    from fnhost_sdk import Retry

    ATTEMPTS = []


    async def handle(data: bytes, ctx) -> None:
        ATTEMPTS.append((data, ctx.attempt))
        if data == b"retry-later":
            raise Retry(delay=7)
        if data == b"retry":
            raise Retry()
        if data == b"fail":
            raise RuntimeError("boom")
"""


class Wire:
    """(stream seq, delivery count, body) of every acknowledgement but in-progress pings."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, int, str]] = []

    async def on_ack(self, msg: Msg) -> None:
        body = msg.data.decode() or "+ACK"
        if body != "+WPI":
            attempt, seq, _ = delivery_of(msg.subject)
            self.acks.append((seq, attempt, body))

    def of(self, seq: int) -> list[tuple[int, str]]:
        return [(attempt, body) for s, attempt, body in self.acks if s == seq]


@pytest.fixture
async def wire(nc: NatsClient) -> Wire:
    wire = Wire()
    await nc.subscribe("$JS.ACK.IN.>", cb=wire.on_ack)
    await nc.flush()
    return wire


def nak(ms: int) -> str:
    return f'-NAK {{"delay": {ms * 1_000_000}}}'


async def test_failures_follow_the_backoff_and_stop_at_max_deliver(
    host_factory, nc: NatsClient, wire: Wire
) -> None:
    """max_deliver 5, backoff [50ms, 100ms, 150ms]: the last step repeats; the 5th attempt
    is the last, dead-lettered then termed; the consumer has max_deliver and no BackOff."""
    host = await host_factory(
        MANIFEST.format(max_deliver=5, backoff="50ms, 100ms, 150ms"), {"fn.py": HANDLER}
    )
    js = nc.jetstream()
    info = await js.consumer_info("IN", "work")
    assert info.config.max_deliver == 5
    assert not info.config.backoff, "server-side BackOff must stay unset"

    ack = await js.publish("in.a", b"fail")
    await wait_for(lambda: wire.of(ack.seq)[-1:] == [(5, "+TERM")], message="termed")
    assert wire.of(ack.seq) == [
        (1, nak(50)),
        (2, nak(100)),
        (3, nak(150)),
        (4, nak(150)),
        (5, "+TERM"),
    ]
    assert [attempt for _, attempt in module_of(host).ATTEMPTS] == [1, 2, 3, 4, 5]
    copy = await js.get_msg("DLQ", 1)
    assert (copy.headers or {})["Fnhost-Attempts"] == "5"
    assert (copy.headers or {})["Fnhost-Error"] == (
        "RuntimeError: retries exhausted after 5 attempts: RuntimeError: boom"
    )


async def test_retry_with_a_delay_uses_it_and_without_one_the_backoff(
    host_factory, nc: NatsClient, wire: Wire
) -> None:
    await host_factory(MANIFEST.format(max_deliver=3, backoff="40ms, 80ms"), {"fn.py": HANDLER})
    js = nc.jetstream()
    later = await js.publish("in.a", b"retry-later")
    plain = await js.publish("in.a", b"retry")

    await wait_for(lambda: wire.of(later.seq), message="the first nak")
    assert wire.of(later.seq) == [(1, nak(7000))]
    await wait_for(lambda: len(wire.of(plain.seq)) == 3, message="three settlements")
    # Retry() asks for another attempt on the function's back-off; at max_deliver the
    # message is out of attempts and dead-lettered by the trigger, not left to the advisory.
    assert wire.of(plain.seq) == [(1, nak(40)), (2, nak(80)), (3, "+TERM")]
    copy = await js.get_msg("DLQ", 1)
    assert (copy.headers or {})["Fnhost-Error"].startswith("Retry: retries exhausted after 3")
