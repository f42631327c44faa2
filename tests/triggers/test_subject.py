"""fnhost.triggers.subject: core-subject functions (fire and forget) on a real nats-server."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from fnhost.host import Host
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import module_of

pytestmark = pytest.mark.nats

COUNT = 60

RECORDING = """\
    SEEN = []


    async def handle(data: dict) -> None:
        SEEN.append(data["i"])
"""


def manifest(queue: str = "") -> str:
    return f"""\
        version: 1
        http: false
        functions:
          notify:
            module: fn.py
            trigger: {{subject: "events.happened"{queue}}}
        """


@pytest.fixture
def run_host(host_factory):
    """``host_factory``, then round trips on the host's connection, so that the server
    has registered its subscriptions before the test publishes (core NATS keeps nothing
    for a subscriber that is not there yet).

    Twice: nats-py 2.16's ``flush()`` writes its PING straight to the socket, ahead of
    commands still in the client's buffer; the first round trip lets the flusher run.
    """

    async def go(*args: Any, **kwargs: Any) -> Host:
        host = await host_factory(*args, **kwargs)
        await host.nc.flush()
        await host.nc.flush()
        return host

    return go


def seen(host: Host) -> list[int]:
    seen: list[int] = module_of(host, "notify").SEEN
    return seen


def subscriptions(server: NatsServer, subject: str) -> list[dict[str, Any]]:
    listing = server.monitor("subsz?subs=1&limit=4096")["subscriptions_list"]
    return [sub for sub in listing if sub["subject"] == subject]


async def publish_all(nc: NatsClient, count: int = COUNT) -> None:
    for i in range(count):
        await nc.publish("events.happened", json.dumps({"i": i}).encode())
    await nc.flush()


async def test_hosts_share_messages_in_the_default_queue_group(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host_a = await run_host(manifest(), {"fn.py": RECORDING})
    host_b = await run_host(manifest(), {"fn.py": RECORDING})
    subs = subscriptions(nats_server, "events.happened")
    assert [sub.get("qgroup") for sub in subs] == ["notify", "notify"]

    await publish_all(nc)

    await wait_for(
        lambda: len(seen(host_a)) + len(seen(host_b)) >= COUNT,
        message=f"{COUNT} messages handled",
    )
    assert sorted(seen(host_a) + seen(host_b)) == list(range(COUNT)), "each handled once"
    assert seen(host_a) and seen(host_b), "both hosts took part"
    # The server delivered each message to exactly one member of the group.
    assert sum(sub["msgs"] for sub in subscriptions(nats_server, "events.happened")) == COUNT


async def test_queue_null_broadcasts_to_every_host(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host_a = await run_host(manifest(", queue: null"), {"fn.py": RECORDING})
    host_b = await run_host(manifest(", queue: null"), {"fn.py": RECORDING})
    subs = subscriptions(nats_server, "events.happened")
    assert len(subs) == 2
    assert all("qgroup" not in sub for sub in subs), subs

    await publish_all(nc)

    await wait_for(
        lambda: len(seen(host_a)) >= COUNT and len(seen(host_b)) >= COUNT,
        message=f"{COUNT} messages handled by each host",
    )
    assert sorted(seen(host_a)) == list(range(COUNT))
    assert sorted(seen(host_b)) == list(range(COUNT))


async def test_a_custom_queue_group_is_used(run_host, nats_server: NatsServer) -> None:
    await run_host(manifest(", queue: workers"), {"fn.py": RECORDING})
    assert [sub.get("qgroup") for sub in subscriptions(nats_server, "events.happened")] == [
        "workers"
    ]


FLAKY = """\
    SEEN = []
    DONE = []


    async def handle(data: dict) -> None:
        SEEN.append(data["i"])
        if data["i"] % 2:
            raise ValueError(f"odd {data['i']}")
        DONE.append(data["i"])
"""


async def test_a_raising_handler_does_not_stop_later_messages(run_host, nc: NatsClient) -> None:
    host = await run_host(manifest(), {"fn.py": FLAKY})
    module = host.functions["notify"].runtime.loaded.module  # type: ignore[union-attr]

    await publish_all(nc, 20)

    await wait_for(lambda: len(module.SEEN) >= 20, message="all 20 messages reached the handler")
    assert sorted(module.SEEN) == list(range(20))
    assert sorted(module.DONE) == list(range(0, 20, 2))
    assert host.functions["notify"].status == "running"

    # And the function still works afterwards.
    await nc.publish("events.happened", b'{"i": 100}')
    await wait_for(lambda: 100 in module.DONE, message="a later message handled")


TRANSFORM = """\
    SEEN = []


    async def handle(data: dict) -> dict | None:
        SEEN.append(data)
        if data.get("skip"):
            return None
        return {"tripled": data["n"] * 3}
"""


async def test_output_publishes_the_return_value(run_host, nc: NatsClient) -> None:
    host = await run_host(
        """\
        version: 1
        http: false
        functions:
          notify:
            module: fn.py
            trigger: {subject: "events.happened"}
            output: events.tripled
        """,
        {"fn.py": TRANSFORM},
    )
    out = await nc.subscribe("events.tripled")
    await nc.flush()
    await nc.publish("events.happened", b'{"n": 1, "skip": true}')
    await nc.publish("events.happened", b'{"n": 5}')

    published = await out.next_msg(timeout=5)
    assert json.loads(published.data) == {"tripled": 15}, "None is not published"
    await wait_for(lambda: len(seen(host)) == 2, message="both messages handled")

    await nc.publish("events.happened", b'{"n": 2}')
    published = await out.next_msg(timeout=5)
    assert json.loads(published.data) == {"tripled": 6}
    assert out.pending_msgs == 0, "exactly one output per non-None result"


TYPED = """\
    from pydantic import BaseModel

    SEEN = []


    class Event(BaseModel):
        i: int


    async def handle(event: Event) -> None:
        SEEN.append(event.i)
"""


async def test_an_undecodable_message_is_logged_with_the_function_and_skipped(
    run_host, nc: NatsClient, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost")
    host = await run_host(manifest(), {"fn.py": TYPED})
    await nc.publish("events.happened", b"not json")
    await nc.publish("events.happened", b'{"i": "one"}')
    await nc.publish("events.happened", b'{"i": 1}')

    def failures() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and "function notify" in r.getMessage()
        ]

    await wait_for(lambda: seen(host) == [1], message="the good message handled")
    await wait_for(lambda: len(failures()) == 2, message="both bad messages logged")
    assert all("payload does not fit Event" in message for message in failures()), failures()
    assert host.functions["notify"].status == "running"


GATED = """\
    import asyncio

    GATE = asyncio.Event()
    SEEN = []


    async def handle(data: dict) -> None:
        SEEN.append(data["i"])
        await GATE.wait()
"""


async def test_messages_dropped_for_a_subscription_that_fell_behind_are_counted_and_logged(
    run_host, nc: NatsClient, monkeypatch, caplog
) -> None:
    """Core NATS is at-most-once: when a function's handlers fall behind, the client's
    buffer for its subscription fills and nats-py drops messages. That must not pass as
    a routine warning per message: each drop is counted on /metrics, and one error line
    per subscription names the function (more lines would flood the log)."""
    caplog.set_level(logging.INFO, logger="fnhost")
    buffered = 5
    monkeypatch.setattr("fnhost.triggers.subject.PENDING_MSGS_LIMIT", buffered)
    host = await run_host(
        manifest().replace("trigger:", "concurrency: 1\n            trigger:"), {"fn.py": GATED}
    )
    module = module_of(host, "notify")

    def dropped() -> float:
        return host.metrics.value(
            "fnhost_slow_consumer_dropped_total", function="notify", subscription="events.happened"
        )

    try:
        await publish_all(nc, 40)
        # One runs (blocked), the next waits for its slot, the buffer holds a few.
        await wait_for(lambda: dropped() >= 40 - 2 * buffered, message="the drops counted")
    finally:
        module.GATE.set()
    await wait_for(lambda: len(seen(host)) + dropped() == 40, message="each run or dropped")
    assert len(seen(host)) <= buffered + 2
    alarms = [r for r in caplog.records if "slow consumer" in r.getMessage()]
    assert len(alarms) == 1, [r.getMessage() for r in alarms]
    assert alarms[0].levelno == logging.ERROR
    assert "function notify" in alarms[0].getMessage()
    assert not [r for r in caplog.records if "NATS error" in r.getMessage()]
