"""fnhost.plugins: third-party plugins from ``plugins:`` and the built-in ``timeout``,
on a real nats-server.

The plugins live in ``tests/plugins_for_tests`` and record what they see in
:mod:`plugins_for_tests.record`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fnhost.host import Host
from fnhost_sdk.testing import wait_for
from plugins_for_tests import record
from support import module_of

pytestmark = pytest.mark.nats

ERROR = "Nats-Service-Error"
CODE = "Nats-Service-Error-Code"

ORDERING_PLUGINS = [
    "plugins_for_tests.alpha",
    "plugins_for_tests.beta",
    "plugins_for_tests.outermost",
    "plugins_for_tests.innermost",
]

# Outermost first: tryfirst, then the manifest's plugins with the last listed outside
# (pluggy calls the last registered first), the built-ins, then trylast.
CHAIN = ["outermost", "beta", "alpha", "innermost"]


@pytest.fixture(autouse=True)
def clean_record() -> Iterator[None]:
    record.reset()
    yield
    record.reset()


@pytest.fixture
def run_host(host_factory):
    """``host_factory``, then two round trips so the server holds the subscriptions."""

    async def go(*args: Any, **kwargs: Any) -> Host:
        host = await host_factory(*args, **kwargs)
        await host.nc.flush()
        await host.nc.flush()
        return host

    return go


def manifest(functions: str, plugins: list[str], streams: str = "") -> str:
    return (
        "version: 1\nhttp: false\n"
        + (f"streams:\n{streams}" if streams else "")
        + f"plugins: [{', '.join(plugins)}]\n"
        + "functions:\n"
        + functions
    )


def events_of(function: str) -> list[tuple[str, str, Any]]:
    """(plugin, enter|exit, detail) for one function, in the order they happened."""
    return [(plugin, what, detail) for plugin, what, fn, detail in record.EVENTS if fn == function]


def one_invocation(data: bytes, inner: str, outer: str | None = None) -> list[tuple[str, str, Any]]:
    """The events of one invocation passing through CHAIN: ``inner`` is what the innermost
    plugin saw come back, ``outer`` what the others saw (the same unless the built-ins
    between them turned an exception into an outcome)."""
    outer = outer or inner
    entering = [(plugin, "enter", data) for plugin in CHAIN]
    leaving = [("innermost", "exit", inner)] + [
        (plugin, "exit", outer) for plugin in reversed(CHAIN[:-1])
    ]
    return entering + leaving


# -------------------------------------------------------------------- ordering

KINDS = """\
    SEEN = []


    async def answer(data: dict) -> dict:
        return {"n": data["n"]}


    async def fail(data: dict) -> dict:
        raise ValueError("no")


    async def note(data: dict) -> None:
        SEEN.append(("note", data["n"]))


    async def consume(data: dict) -> None:
        SEEN.append(("consume", data["n"]))
"""

KINDS_FUNCTIONS = """\
  answer: {module: fn.py, handler: answer, trigger: {request: p.answer}}
  fail: {module: fn.py, handler: fail, trigger: {request: p.fail}}
  note: {module: fn.py, handler: note, trigger: {subject: p.note}}
  consume: {module: fn.py, handler: consume, trigger: {stream: P, subjects: [p.in]}}
"""


async def test_a_third_party_middleware_wraps_every_invocation_in_order(
    run_host, nc: NatsClient
) -> None:
    host = await run_host(
        manifest(KINDS_FUNCTIONS, ORDERING_PLUGINS, streams='  P: {subjects: ["p.in"]}\n'),
        {"fn.py": KINDS},
    )
    reply = await nc.request("p.answer", b'{"n": 1}', timeout=5)
    assert json.loads(reply.data) == {"n": 1}
    assert events_of("answer") == one_invocation(b'{"n": 1}', "Reply")

    # The built-in retry middleware, between alpha and innermost, turns the exception
    # into an error reply: plugins outside it see an outcome, never the exception.
    reply = await nc.request("p.fail", b'{"n": 2}', timeout=5)
    assert reply.headers is not None and reply.headers[CODE] == "500"
    assert events_of("fail") == one_invocation(b'{"n": 2}', "raised ValueError", "Reply")

    await nc.publish("p.note", b'{"n": 3}')
    note = module_of(host, "note")  # (each function loads its own copy of the module)
    await wait_for(lambda: ("note", 3) in note.SEEN, message="the subject function ran")
    await wait_for(lambda: len(events_of("note")) == 8, message="all plugins left")
    assert events_of("note") == one_invocation(b'{"n": 3}', "Ack")

    await nc.jetstream().publish("p.in", b'{"n": 4}')
    consume = module_of(host, "consume")
    await wait_for(lambda: ("consume", 4) in consume.SEEN, message="the stream function ran")
    await wait_for(lambda: len(events_of("consume")) == 8, message="all plugins left")
    assert events_of("consume") == one_invocation(b'{"n": 4}', "Ack")


async def test_plugins_listed_in_the_other_order_nest_the_other_way(
    run_host, nc: NatsClient
) -> None:
    await run_host(
        manifest(
            "  answer: {module: fn.py, handler: answer, trigger: {request: p.answer}}\n",
            ["plugins_for_tests.beta", "plugins_for_tests.alpha"],
        ),
        {"fn.py": KINDS},
    )
    await nc.request("p.answer", b'{"n": 1}', timeout=5)
    assert [(plugin, what) for plugin, what, _ in events_of("answer")] == [
        ("alpha", "enter"),
        ("beta", "enter"),
        ("beta", "exit"),
        ("alpha", "exit"),
    ]


async def test_the_chain_is_composed_once_per_load_and_no_hook_runs_per_message(
    run_host, nc: NatsClient, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("FNHOST_TRACE_HOOKS", "1")
    await run_host(
        manifest(
            "  answer: {module: fn.py, handler: answer, trigger: {request: p.answer}}\n"
            "  note: {module: fn.py, handler: note, trigger: {subject: p.note}}\n",
            ORDERING_PLUGINS,
        ),
        {"fn.py": KINDS},
    )
    at_start = [line for line in capsys.readouterr().err.splitlines() if "fnhost_" in line]
    assert any("fnhost_middleware" in line for line in at_start), "hook tracing is on"
    assert sorted(record.FACTORY_CALLS) == sorted(
        (plugin, function) for plugin in CHAIN for function in ("answer", "note")
    )

    for n in range(100):
        reply = await nc.request("p.answer", json.dumps({"n": n}).encode(), timeout=5)
        assert json.loads(reply.data) == {"n": n}
        await nc.publish("p.note", json.dumps({"n": n}).encode())
    await wait_for(lambda: len(events_of("note")) == 800, message="100 notes through 4 plugins")

    assert len(events_of("answer")) == 800
    during = [line for line in capsys.readouterr().err.splitlines() if "fnhost_" in line]
    assert during == [], "a hook was called while messages flowed"
    assert len(record.FACTORY_CALLS) == 8, "each factory once per function load"


# ------------------------------------------------------------------- lifecycle


async def test_startup_and_shutdown_hooks_bracket_the_functions(run_host, nc) -> None:
    host = await run_host(
        manifest(
            "  answer: {module: fn.py, handler: answer, trigger: {request: p.answer}}\n"
            "  note: {module: fn.py, handler: note, trigger: {subject: p.note}}\n",
            ["plugins_for_tests.lifecycle"],
        ),
        {"fn.py": KINDS},
    )
    # Startup ran connected, before any trigger started.
    assert record.LIFECYCLE == [("startup", {"connected": True, "triggers": 0})]
    await nc.request("p.answer", b'{"n": 1}', timeout=5)

    await host.drain()

    # Shutdown ran after every function drained, before the connection closed.
    assert record.LIFECYCLE == [
        ("startup", {"connected": True, "triggers": 0}),
        ("shutdown", {"connected": True, "statuses": ["stopped", "stopped"]}),
    ]
    assert host.nc.is_closed


# -------------------------------------------------------------------- outgoing

STAMPED = """\
    async def handle(data: dict, ctx) -> dict:
        await ctx.publish("p.side", {"side": data["n"]})
        return {"n": data["n"]}
"""


async def test_an_outgoing_hook_decorates_every_publish_of_the_function(
    run_host, nc: NatsClient
) -> None:
    await run_host(
        manifest(
            "  stamped: {module: fn.py, trigger: {request: p.stamped}, output: p.out}\n",
            ["plugins_for_tests.stamp"],
        ),
        {"fn.py": STAMPED},
    )
    side = await nc.subscribe("p.side")
    out = await nc.subscribe("p.out")
    await nc.request("p.stamped", b'{"n": 5}', timeout=5)

    for sub, subject in ((side, "p.side"), (out, "p.out")):
        msg = await sub.next_msg(timeout=5)
        assert msg.headers is not None
        assert msg.headers["X-Stamped-By"] == "stamped"
        assert msg.headers["X-Stamped-Subject"] == subject


# --------------------------------------------------------------------- timeout

SLOW = """\
    import asyncio
    import threading

    CANCELLED = []
    RELEASE = threading.Event()
    ATTEMPTS = []


    async def sleepy(data: dict) -> dict:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            CANCELLED.append(data["n"])
            raise
        return {"n": data["n"]}


    def blocking(data: dict) -> dict:
        RELEASE.wait(10)
        return {"n": data["n"]}


    async def quick(data: dict) -> dict:
        return {"n": data["n"]}


    async def slow_once(data: dict, ctx) -> None:
        ATTEMPTS.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(30)


    SWALLOWED = []


    async def swallows_its_cancel(data: dict, ctx) -> None:
        SWALLOWED.append((data["n"], ctx.attempt))
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if data["n"] == 1:
                    return
                raise
"""

TIMEOUT_FUNCTIONS = """\
  sleepy: {module: fn.py, handler: sleepy, trigger: {request: p.sleepy}, timeout: 300ms}
  blocking: {module: fn.py, handler: blocking, trigger: {request: p.blocking}, timeout: 300ms}
  quick: {module: fn.py, handler: quick, trigger: {request: p.quick}, timeout: 300ms}
"""


async def test_a_handler_past_its_timeout_is_cancelled_and_answered_with_500(
    run_host, nc: NatsClient
) -> None:
    host = await run_host(manifest(TIMEOUT_FUNCTIONS, []), {"fn.py": SLOW})
    module = module_of(host, "sleepy")

    reply = await nc.request("p.sleepy", b'{"n": 1}', timeout=10)
    assert reply.headers is not None
    assert reply.headers[CODE] == "500"
    assert "'sleepy'" in reply.headers[ERROR]
    assert "timeout of 0.3s" in reply.headers[ERROR]
    assert module.CANCELLED == [1], "the handler was cancelled, not left running"

    # A plain def cannot be interrupted: the caller still gets its 500 at the deadline.
    try:
        reply = await nc.request("p.blocking", b'{"n": 2}', timeout=10)
        assert reply.headers is not None
        assert reply.headers[CODE] == "500"
        assert "'blocking'" in reply.headers[ERROR]
    finally:
        module.RELEASE.set()

    reply = await nc.request("p.quick", b'{"n": 3}', timeout=5)
    assert json.loads(reply.data) == {"n": 3}
    assert not reply.headers


async def run_timing_out_stream_function(
    run_host, nc: NatsClient, name: str, handler: str, payloads: list[bytes], extra: str = ""
) -> Any:
    """Run ``handler`` of SLOW as stream function ``name`` (timeout 300ms, 3 deliveries),
    publish ``payloads`` and wait until all are acked; the function's module."""
    host = await run_host(
        manifest(
            f"  {name}:\n    module: fn.py\n    handler: {handler}\n"
            f"    trigger: {{stream: P, subjects: [p.in]}}\n{extra}"
            "    timeout: 300ms\n    retry: {max_deliver: 3, backoff: [100ms]}\n",
            [],
            streams='  P: {subjects: ["p.in"]}\n',
        ),
        {"fn.py": SLOW},
    )
    js: JetStreamContext = nc.jetstream()
    for payload in payloads:
        await js.publish("p.in", payload)

    async def settled() -> bool:
        info = await js.consumer_info("P", name)
        return info.ack_floor.stream_seq == len(payloads) and info.num_ack_pending == 0

    await wait_for(settled, message="every message acked after its retry")
    return module_of(host, name)


async def test_a_stream_handler_past_its_timeout_is_not_acked_but_retried(
    run_host, nc: NatsClient
) -> None:
    module = await run_timing_out_stream_function(run_host, nc, "slow-once", "slow_once", [b"{}"])
    assert module.ATTEMPTS == [1, 2], "the timed-out attempt was not acked"


async def test_a_handler_that_swallows_its_timeout_is_still_not_acked_and_its_worker_lives(
    run_host, nc: NatsClient
) -> None:
    """A handler that catches the timeout's cancellation and returns has still run
    past its timeout: not acked, retried. The worker that ran it keeps working: with
    concurrency 1, the next message that times out is retried and acked too."""
    module = await run_timing_out_stream_function(
        run_host,
        nc,
        "swallow",
        "swallows_its_cancel",
        [b'{"n": 1}', b'{"n": 2}'],
        extra="    concurrency: 1\n",
    )
    assert sorted(module.SWALLOWED) == [(1, 1), (1, 2), (2, 1), (2, 2)]


async def test_the_timeout_sweeper_fails_only_the_late_call_and_keeps_outside_cancels() -> None:
    """One sweeper watches every invocation of a function: the late one fails with
    HandlerTimeout, a quick one beside it returns, and a cancellation from elsewhere
    (a drain) stays a cancellation, not a timeout."""
    from fnhost.errors import HandlerTimeout
    from fnhost.plugins import timeout as timeout_plugin

    spec = SimpleNamespace(timeout=0.2)
    middleware = timeout_plugin.fnhost_middleware(function=spec)
    call = SimpleNamespace(function="late")

    async def handler(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    async def invoke(seconds: float) -> str:
        return await middleware(call, lambda _: handler(seconds))

    late = asyncio.create_task(invoke(30))
    quick = asyncio.create_task(invoke(0.01))
    assert await quick == "slept 0.01"
    with pytest.raises(HandlerTimeout, match=r"'late' ran past its timeout of 0\.2s"):
        await late

    drained = asyncio.create_task(invoke(30))
    await asyncio.sleep(0.01)
    drained.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drained
    assert await invoke(0.01) == "slept 0.01", "the middleware still works after both"
