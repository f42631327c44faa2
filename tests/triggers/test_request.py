"""fnhost.triggers.request: request/reply functions on a real nats-server.

Replies carry the encoded return value; errors are replies too, in the NATS
services convention (``Nats-Service-Error`` / ``Nats-Service-Error-Code``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fnhost.host import Host
from fnhost_sdk import Client, ServiceError
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import module_of

pytestmark = pytest.mark.nats


@pytest.fixture
def run_host(host_factory):
    """``host_factory``, then round trips on the host's connection, so that the server
    has registered its subscriptions before the test sends anything.

    Twice: nats-py 2.16's ``flush()`` writes its PING straight to the socket, ahead of
    commands still in the client's buffer; the first round trip lets the flusher run.
    """

    async def go(*args: Any, **kwargs: Any) -> Host:
        host = await host_factory(*args, **kwargs)
        await host.nc.flush()
        await host.nc.flush()
        return host

    return go


ERROR = "Nats-Service-Error"
CODE = "Nats-Service-Error-Code"


def manifest(functions: str) -> str:
    """A manifest with no streams and no HTTP; ``functions`` is the indented body."""
    return "version: 1\nhttp: false\nfunctions:\n" + functions


def subscriptions(server: NatsServer, subject: str) -> list[dict[str, Any]]:
    """The server's subscriptions on ``subject`` (monitoring ``/subsz``)."""
    listing = server.monitor("subsz?subs=1&limit=4096")["subscriptions_list"]
    return [sub for sub in listing if sub["subject"] == subject]


async def subscribed(server: NatsServer, subject: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait until the server lists ``count`` subscriptions on ``subject``; return them.

    (Host.start() returning does not yet guarantee this: see
    test_a_request_right_after_start_is_answered.)
    """
    return await wait_for(
        lambda: len(subs := subscriptions(server, subject)) == count and subs,
        message=f"{count} subscription(s) on {subject} known to the server",
    )


async def send_requests(nc: NatsClient, subject: str, count: int) -> dict[int, list[Msg]]:
    """Publish ``count`` requests, each with its own reply subject; collect every reply.

    Returns replies by request number once each request has at least one; a
    request answered twice shows up as a list of two.
    """
    replies: dict[int, list[Msg]] = {i: [] for i in range(count)}
    prefix = nc.new_inbox()

    async def on_reply(msg: Msg) -> None:
        replies[int(msg.subject.rsplit(".", 1)[1])].append(msg)

    sub = await nc.subscribe(f"{prefix}.*", cb=on_reply)
    try:
        for i in range(count):
            await nc.publish(subject, json.dumps({"i": i}).encode(), reply=f"{prefix}.{i}")
        await nc.flush()
        await wait_for(
            lambda: all(replies.values()), timeout=10, message=f"{count} requests answered"
        )
        await nc.flush()
    finally:
        await sub.unsubscribe()
    return replies


# --------------------------------------------------------------------- replies

ENCODINGS = """\
    from dataclasses import dataclass

    from pydantic import BaseModel


    class Greeting(BaseModel):
        text: str
        count: int


    @dataclass
    class Point:
        x: int
        y: int


    async def as_dict(data: dict) -> dict:
        return {"got": data, "ok": True}


    async def as_str(data: str) -> str:
        return data.upper()


    async def as_bytes(data: bytes) -> bytes:
        return data[::-1]


    async def as_model(data: dict) -> Greeting:
        return Greeting(text=f"hello {data['name']}", count=2)


    async def as_dataclass(data: Point) -> Point:
        return Point(x=data.y, y=data.x)


    async def as_none(data: bytes) -> None:
        return None


    async def as_list(data: list) -> list:
        return list(reversed(data))


    async def model_in(data: Greeting) -> str:
        return data.text * data.count
"""


def encodings_manifest() -> str:
    return manifest(
        "".join(
            f"  {name}:\n    module: fn.py\n    handler: {name.replace('-', '_')}\n"
            f"    trigger: {{request: enc.{name}}}\n"
            for name in (
                "as-dict",
                "as-str",
                "as-bytes",
                "as-model",
                "as-dataclass",
                "as-none",
                "as-list",
                "model-in",
            )
        )
    )


async def test_reply_encodes_the_return_value_by_its_type(run_host, nc: NatsClient) -> None:
    await run_host(encodings_manifest(), {"fn.py": ENCODINGS})

    reply = await nc.request("enc.as-dict", b'{"a": [1, 2]}', timeout=5)
    assert not reply.headers
    assert json.loads(reply.data) == {"got": {"a": [1, 2]}, "ok": True}

    reply = await nc.request("enc.as-str", "grüß".encode(), timeout=5)
    assert reply.data.decode() == "GRÜSS"

    reply = await nc.request("enc.as-bytes", b"\x00\x01\xff", timeout=5)
    assert reply.data == b"\xff\x01\x00"

    reply = await nc.request("enc.as-model", b'{"name": "ada"}', timeout=5)
    assert json.loads(reply.data) == {"text": "hello ada", "count": 2}

    reply = await nc.request("enc.as-dataclass", b'{"x": 1, "y": 2}', timeout=5)
    assert json.loads(reply.data) == {"x": 2, "y": 1}

    reply = await nc.request("enc.as-none", b"anything", timeout=5)
    assert reply.data == b""
    assert not (reply.headers or {}).get(CODE)

    reply = await nc.request("enc.as-list", b'[1, "two", {"three": 3}]', timeout=5)
    assert json.loads(reply.data) == [{"three": 3}, "two", 1]

    reply = await nc.request("enc.model-in", b'{"text": "ab", "count": 3}', timeout=5)
    assert reply.data == b"ababab"


async def test_json_of_the_wrong_shape_is_a_400_reply(run_host, nc: NatsClient) -> None:
    await run_host(encodings_manifest(), {"fn.py": ENCODINGS})
    for subject, payload, expected in (
        ("enc.as-dict", b"[1, 2]", "not an object"),
        ("enc.as-list", b'{"a": 1}', "not an array"),
        ("enc.as-dataclass", b"[1, 2]", "Point"),
        ("enc.model-in", b'{"text": "ab"}', "count"),
    ):
        reply = await nc.request(subject, payload, timeout=5)
        assert reply.headers is not None, subject
        assert reply.headers[CODE] == "400", subject
        assert expected in reply.headers[ERROR], (subject, reply.headers[ERROR])


# ---------------------------------------------------------------------- errors

ERRORS = """\
    from pydantic import BaseModel

    from fnhost_sdk import Reject, Retry


    class Order(BaseModel):
        customer_id: str
        total: float


    async def typed(order: Order) -> dict:
        return {"customer": order.customer_id}


    async def boom(data: dict) -> dict:
        raise ValueError(f"boom {data['n']}")


    async def reject(data: dict) -> dict:
        raise Reject("x is not acceptable")


    async def retry(data: dict) -> dict:
        raise Retry()
"""

ERRORS_MANIFEST = manifest(
    """\
  typed: {module: fn.py, handler: typed, trigger: {request: err.typed}}
  boom: {module: fn.py, handler: boom, trigger: {request: err.boom}}
  reject: {module: fn.py, handler: reject, trigger: {request: err.reject}}
  retry: {module: fn.py, handler: retry, trigger: {request: err.retry}}
"""
)


async def test_undecodable_input_is_a_400_reply(run_host, nc: NatsClient) -> None:
    await run_host(ERRORS_MANIFEST, {"fn.py": ERRORS})

    reply = await nc.request("err.typed", b"this is not json", timeout=5)
    assert reply.headers is not None
    assert reply.headers[CODE] == "400"
    assert "JSON" in reply.headers[ERROR]

    reply = await nc.request("err.typed", b'{"customer_id": "c1"}', timeout=5)
    assert reply.headers is not None
    assert reply.headers[CODE] == "400"
    assert "total" in reply.headers[ERROR]

    reply = await nc.request("err.typed", b'{"customer_id": "c1", "total": 2}', timeout=5)
    assert json.loads(reply.data) == {"customer": "c1"}


async def test_a_raising_handler_is_a_500_reply_with_the_error(run_host, nc) -> None:
    await run_host(ERRORS_MANIFEST, {"fn.py": ERRORS})

    reply = await nc.request("err.boom", b'{"n": 42}', timeout=5)
    assert reply.headers is not None
    assert reply.headers[CODE] == "500"
    assert "ValueError" in reply.headers[ERROR]
    assert "boom 42" in reply.headers[ERROR]
    assert reply.data == b""


async def test_reject_is_400_and_retry_is_503(run_host, nc: NatsClient) -> None:
    await run_host(ERRORS_MANIFEST, {"fn.py": ERRORS})

    reply = await nc.request("err.reject", b"{}", timeout=5)
    assert reply.headers is not None
    assert reply.headers[CODE] == "400"
    assert reply.headers[ERROR] == "x is not acceptable"

    reply = await nc.request("err.retry", b"{}", timeout=5)
    assert reply.headers is not None
    assert reply.headers[CODE] == "503"


async def test_sdk_client_raises_service_error_with_the_code(run_host, nats_url) -> None:
    await run_host(ERRORS_MANIFEST, {"fn.py": ERRORS})
    client = await Client.connect(nats_url)
    try:
        with pytest.raises(ServiceError) as raised:
            await client.request("err.boom", {"n": 7})
        assert raised.value.code == 500
        assert "boom 7" in raised.value.description

        with pytest.raises(ServiceError) as raised:
            await client.request("err.reject", {})
        assert raised.value.code == 400
        assert raised.value.description == "x is not acceptable"

        with pytest.raises(ServiceError) as raised:
            await client.request("err.retry", {})
        assert raised.value.code == 503

        answer = await client.request(
            "err.typed", {"customer_id": "c9", "total": 1.5}, returns=dict
        )
        assert answer == {"customer": "c9"}
    finally:
        await client.close()


# -------------------------------------------------------------- queue groups

COUNTING = """\
    SEEN = []


    async def handle(data: dict, ctx) -> dict:
        SEEN.append(data["i"])
        return {"i": data["i"], "host": ctx.config["host"]}
"""


def counting_manifest(host: str, queue: str | None = None) -> str:
    queue_key = f", queue: {queue}" if queue else ""
    return manifest(
        f"""\
  count:
    module: fn.py
    trigger: {{request: q.count{queue_key}}}
    config: {{host: {host}}}
"""
    )


async def test_two_hosts_share_requests_in_the_default_queue_group(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host_a = await run_host(counting_manifest("a"), {"fn.py": COUNTING})
    host_b = await run_host(counting_manifest("b"), {"fn.py": COUNTING})

    subs = await subscribed(nats_server, "q.count", 2)
    assert [sub.get("qgroup") for sub in subs] == ["count", "count"]

    replies = await send_requests(nc, "q.count", 60)

    assert all(len(answers) == 1 for answers in replies.values()), {
        i: len(a) for i, a in replies.items() if len(a) != 1
    }
    by_host = Counter(json.loads(answers[0].data)["host"] for answers in replies.values())
    seen_a, seen_b = module_of(host_a, "count").SEEN, module_of(host_b, "count").SEEN
    assert sorted(seen_a + seen_b) == list(range(60)), "every request handled exactly once"
    assert by_host == {"a": len(seen_a), "b": len(seen_b)}
    assert seen_a and seen_b, "both hosts took part"


async def test_a_custom_queue_group_is_shared_with_any_subscriber(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host = await run_host(counting_manifest("host", queue="custom"), {"fn.py": COUNTING})
    subs = await subscribed(nats_server, "q.count")
    assert [sub.get("qgroup") for sub in subs] == ["custom"]

    async def plain(msg: Msg) -> None:
        i = json.loads(msg.data)["i"]
        await msg.respond(json.dumps({"i": i, "host": "plain"}).encode())

    other = await nats.connect(nats_server.url)
    try:
        await other.subscribe("q.count", queue="custom", cb=plain)
        # Not flush(): nats-py 2.16 writes its PING ahead of a SUB still in its buffer.
        await subscribed(nats_server, "q.count", 2)
        replies = await send_requests(nc, "q.count", 60)
    finally:
        await other.close()

    assert all(len(answers) == 1 for answers in replies.values())
    by_host = Counter(json.loads(answers[0].data)["host"] for answers in replies.values())
    assert by_host["host"] == len(module_of(host, "count").SEEN)
    assert by_host["host"] + by_host["plain"] == 60
    assert by_host["host"] and by_host["plain"], by_host


# ------------------------------------------------------------ running handlers


async def test_start_returns_once_the_server_knows_the_subscription(
    host_factory, nats_server: NatsServer
) -> None:
    """Once start() returns (and /readyz would say ready), a caller must get an answer, not
    "no responders": the server must already hold the function's subscription.

    The monitoring call below is synchronous, so nothing the host left unflushed can
    reach the server while it runs.
    """
    await host_factory(encodings_manifest(), {"fn.py": ENCODINGS})
    assert subscriptions(nats_server, "enc.as-str"), "subscription not registered yet"


THREADS = """\
    import threading

    BARRIER = threading.Barrier(2, timeout=10)


    def handle(data: dict) -> dict:
        thread = threading.current_thread()
        return {"ident": threading.get_ident(), "name": thread.name}


    def meet(data: dict) -> dict:
        # Returns only once two invocations are inside at the same time: possible only
        # if each runs in its own thread, off the event loop.
        BARRIER.wait()
        return {"ident": threading.get_ident()}


    async def ping(data: dict) -> dict:
        return {"pong": True}
"""

THREADS_MANIFEST = manifest(
    """\
  sync-fn: {module: fn.py, trigger: {request: t.sync}}
  meet: {module: fn.py, handler: meet, trigger: {request: t.meet}, concurrency: 2}
  ping: {module: fn.py, handler: ping, trigger: {request: t.ping}}
"""
)


async def test_a_plain_def_handler_runs_in_a_worker_thread(run_host, nc) -> None:
    await run_host(THREADS_MANIFEST, {"fn.py": THREADS})
    reply = await nc.request("t.sync", b"{}", timeout=5)
    answer = json.loads(reply.data)
    # The host runs on this test's event loop, in this thread.
    assert answer["ident"] != threading.get_ident()
    assert answer["name"].startswith("fnhost-sync-fn")


async def test_plain_def_handlers_run_in_parallel_threads_and_the_loop_stays_free(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host = await run_host(THREADS_MANIFEST, {"fn.py": THREADS})
    await subscribed(nats_server, "t.meet")
    first = asyncio.ensure_future(nc.request("t.meet", b"{}", timeout=15))
    await wait_for(
        lambda: module_of(host, "meet").BARRIER.n_waiting == 1, message="one thread waiting"
    )
    # One handler is blocked in its thread: an async function still answers.
    pong = await nc.request("t.ping", b"{}", timeout=5)
    assert json.loads(pong.data) == {"pong": True}

    second = await nc.request("t.meet", b"{}", timeout=15)
    replies = [await first, second]
    assert all(not reply.headers for reply in replies), [r.headers for r in replies]
    idents = {json.loads(reply.data)["ident"] for reply in replies}
    assert len(idents) == 2
    assert threading.get_ident() not in idents


GATED = """\
    import asyncio

    ACTIVE = 0
    MAX = 0
    CALLS = 0
    OPEN = False


    async def handle(data: dict) -> dict:
        global ACTIVE, MAX, CALLS
        CALLS += 1
        ACTIVE += 1
        MAX = max(MAX, ACTIVE)
        try:
            while not OPEN:
                await asyncio.sleep(0.01)
        finally:
            ACTIVE -= 1
        return {"i": data["i"]}
"""


async def test_concurrency_limits_simultaneous_invocations(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host = await run_host(
        manifest("  gated: {module: fn.py, trigger: {request: t.gated}, concurrency: 2}\n"),
        {"fn.py": GATED},
    )
    module = module_of(host, "gated")
    await subscribed(nats_server, "t.gated")
    calls = [
        asyncio.ensure_future(nc.request("t.gated", json.dumps({"i": i}).encode(), timeout=15))
        for i in range(10)
    ]
    try:
        # All ten reached the host's connection, and only two run.
        await wait_for(
            lambda: subscriptions(nats_server, "t.gated")[0]["msgs"] == 10,
            message="the server delivered all 10 requests to the host",
        )
        await wait_for(lambda: module.ACTIVE == 2, message="two invocations running")
        assert module.CALLS == 2
        assert module.MAX == 2
    finally:
        module.OPEN = True
    replies = await asyncio.gather(*calls)
    assert sorted(json.loads(r.data)["i"] for r in replies) == list(range(10))
    assert module.CALLS == 10
    assert module.MAX == 2


OUTPUT = """\
    async def handle(data: dict) -> dict:
        return {"doubled": data["n"] * 2}
"""


async def test_output_publishes_the_return_value(run_host, nc: NatsClient) -> None:
    await run_host(
        manifest("  out: {module: fn.py, trigger: {request: t.out}, output: t.result}\n"),
        {"fn.py": OUTPUT},
    )
    sub = await nc.subscribe("t.result")
    reply = await nc.request("t.out", b'{"n": 21}', timeout=5)
    assert json.loads(reply.data) == {"doubled": 42}
    published = await sub.next_msg(timeout=5)
    assert json.loads(published.data) == {"doubled": 42}
    await sub.unsubscribe()


# -------------------------------------------------------------------- draining

SLOW = """\
    import asyncio

    STARTED = []
    OPEN = False


    async def handle(data: dict) -> dict:
        STARTED.append(data["i"])
        while not OPEN:
            await asyncio.sleep(0.01)
        return {"done": data["i"]}
"""


async def test_requests_queued_when_the_drain_starts_get_503(
    run_host, nc: NatsClient, nats_server: NatsServer
) -> None:
    host = await run_host(
        manifest("  slow: {module: fn.py, trigger: {request: t.slow}, concurrency: 1}\n"),
        {"fn.py": SLOW},
    )
    module = module_of(host, "slow")
    await subscribed(nats_server, "t.slow")
    first = asyncio.ensure_future(nc.request("t.slow", b'{"i": 1}', timeout=10))
    await wait_for(lambda: module.STARTED == [1], message="the first request is running")
    # The second waits for the only slot; the third waits behind it in the client's buffer.
    second = asyncio.ensure_future(nc.request("t.slow", b'{"i": 2}', timeout=5))
    third = asyncio.ensure_future(nc.request("t.slow", b'{"i": 3}', timeout=5))
    await wait_for(
        lambda: subscriptions(nats_server, "t.slow")[0]["msgs"] == 3,
        message="the queued requests reached the host",
    )

    drain = asyncio.ensure_future(host.drain(grace=10))
    await wait_for(
        lambda: host.functions["slow"].status in ("draining", "stopped"),
        message="the function is draining",
    )
    module.OPEN = True
    try:
        reply_first = await first
        assert not reply_first.headers
        assert json.loads(reply_first.data) == {"done": 1}

        for queued in (second, third):
            reply = await queued
            assert reply.headers is not None, reply.data
            assert reply.headers[CODE] == "503"
            assert "draining" in reply.headers[ERROR]
        assert module.STARTED == [1], "the queued requests never ran"
        counts = host.metrics.counts("slow")
        assert (counts["reply"], counts["refused"]) == (1, 2)  # every message under one outcome
    finally:
        await drain


# ------------------------------------------------------------------ bad input

BAD = """\
    from pydantic import BaseModel


    class Order(BaseModel):
        total: float


    async def typed(order: Order) -> dict:
        return {"total": order.total}


    async def raises(data: dict) -> dict:
        raise KeyError("missing-thing")


    async def ok(data: dict) -> dict:
        return {"ok": data["n"]}
"""

BROKEN = """\
    def handle(data: dict) -> dict
        return data
"""


async def test_bad_input_and_failing_functions_leave_the_others_serving(
    run_host, nc: NatsClient, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost")
    host = await run_host(
        manifest(
            """\
  broken: {module: broken.py, trigger: {request: bad.broken}}
  typed: {module: fn.py, handler: typed, trigger: {request: bad.typed}}
  raises: {module: fn.py, handler: raises, trigger: {request: bad.raises}}
  ok: {module: fn.py, handler: ok, trigger: {request: bad.ok}}
"""
        ),
        {"fn.py": BAD, "broken.py": BROKEN},
    )
    broken = host.functions["broken"]
    assert broken.status == "failed"
    assert broken.error is not None
    assert "broken" in broken.error
    assert "broken.py" in broken.error
    assert [host.functions[name].status for name in ("typed", "raises", "ok")] == ["running"] * 3

    async def ok_still_answers(n: int) -> None:
        reply = await nc.request("bad.ok", json.dumps({"n": n}).encode(), timeout=5)
        assert json.loads(reply.data) == {"ok": n}

    await ok_still_answers(1)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("bad.broken", b"{}", timeout=5)

    for payload in (b"\xff\xfe", b"[1, 2]", b'{"total": "lots"}'):
        reply = await nc.request("bad.typed", payload, timeout=5)
        assert reply.headers is not None and reply.headers[CODE] == "400", payload
        await ok_still_answers(2)
    reply = await nc.request("bad.raises", b"{}", timeout=5)
    assert reply.headers is not None and reply.headers[CODE] == "500"
    assert "missing-thing" in reply.headers[ERROR]
    await ok_still_answers(3)

    def logged(level: int, *words: str) -> bool:
        return any(
            r.levelno == level and all(word in r.getMessage() for word in words)
            for r in caplog.records
        )

    assert logged(logging.ERROR, "broken", "broken.py")
    assert logged(logging.ERROR, "function raises", "500", "KeyError", "missing-thing")
    assert logged(logging.INFO, "function typed", "400", "Invalid JSON")
    assert logged(logging.INFO, "function typed", "400", "Order")
    reply = await nc.request("bad.typed", b'{"total": 2.5}', timeout=5)
    assert json.loads(reply.data) == {"total": 2.5}
    assert all(
        state.status == "running" for name, state in host.functions.items() if name != "broken"
    )
