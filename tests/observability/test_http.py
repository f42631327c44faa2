"""fnhost.http: health, readiness with reasons, metrics, functions, plugin routes, gateway.

The host serves HTTP on a free port in the test's event loop; requests go out
from a worker thread (see ``_support.http``), as a real client's would.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client as NatsClient
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fnhost.plugins import hookimpl
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import module_of

from ._support import HostFactory, HttpResult, http

if TYPE_CHECKING:
    from fnhost.host import Host

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: {port: 0GATEWAY}
streams:
  IN: {subjects: ["in.>"]}
  DLQ: {subjects: ["dlq.>"]}
functions:
  echo:
    module: fn.py
    handler: echo
    trigger: {request: echo}
  hold:
    module: fn.py
    handler: hold
    trigger: {request: hold}
  consume:
    module: fn.py
    handler: consume
    trigger: {stream: IN, durable: consume}
    dead_letter: dlq.consume
  traced:
    module: fn.py
    handler: traced
    trigger: {request: traced}
  notify:
    module: fn.py
    handler: notify
    trigger: {subject: notify, queue: null}
"""

FUNCTIONS = {
    "fn.py": """\
        import asyncio

        from fnhost_sdk import Context, Reject

        release = asyncio.Event()


        async def echo(data: dict) -> dict:
            return {"echo": data}


        async def hold(data: bytes) -> bytes:
            await release.wait()
            return b"released"


        async def consume(data: dict) -> None:
            if data.get("reject"):
                raise Reject("not wanted")


        async def notify(data: bytes) -> None:
            pass


        async def traced(data: dict, ctx: Context) -> dict:
            return {key: (ctx.headers or {}).get(key) for key in ("traceparent", "tracestate")}
        """
}

GATEWAY = ", gateway: {enabled: true, token: s3cret}"


def manifest(gateway: str = "") -> str:
    return MANIFEST.replace("GATEWAY", gateway)


def release(host: Host) -> None:
    module_of(host, "hold").release.set()


async def get(host: Host, path: str) -> HttpResult:
    assert host.http_url is not None
    return await http(host.http_url + path)


async def test_healthz_and_readyz(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    health = await get(host, "/healthz")
    assert (health.status, health.json()) == (200, {"status": "alive"})
    ready = await get(host, "/readyz")
    assert (ready.status, ready.json()) == (200, {"status": "ready"})


class _HoldStartup:
    """A plugin whose startup waits until the test lets it go: the host is not ready meanwhile."""

    def __init__(self) -> None:
        self.host: Host | None = None
        self.go = asyncio.Event()

    @hookimpl
    async def fnhost_startup(self, host: Host) -> None:
        self.host = host
        await self.go.wait()


async def test_readyz_is_503_with_a_reason_before_ready(host_factory: HostFactory) -> None:
    holder = _HoldStartup()
    starting = asyncio.ensure_future(host_factory(manifest(), FUNCTIONS, plugins=[holder]))
    host = await wait_for(lambda: holder.host, message="startup hook reached")

    before = await get(host, "/readyz")
    assert before.status == 503
    assert before.json() == {"status": "not ready", "reasons": ["starting"]}
    assert (await get(host, "/healthz")).status == 200

    holder.go.set()
    await starting
    assert (await get(host, "/readyz")).status == 200


async def test_readyz_is_503_while_disconnected(
    host_factory: HostFactory, nats_server: NatsServer
) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    await asyncio.to_thread(nats_server.stop)
    try:
        await wait_for(lambda: not host.connected, message="host sees the server gone")
        down = await get(host, "/readyz")
        assert down.status == 503
        assert "disconnected from NATS" in down.json()["reasons"]
    finally:
        await asyncio.to_thread(nats_server.start)
    await wait_for(lambda: host.connected, timeout=20, message="host reconnected")
    assert (await get(host, "/readyz")).status == 200


async def test_readyz_is_503_while_draining(host_factory: HostFactory, nc: NatsClient) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    held = asyncio.ensure_future(nc.request("hold", b"", timeout=10))
    await wait_for(lambda: host.functions["hold"].trigger.inflight == 1)  # type: ignore[union-attr]

    draining = asyncio.ensure_future(host.drain(grace=10))
    await wait_for(lambda: host.draining)
    during = await get(host, "/readyz")
    assert during.status == 503
    assert during.json()["reasons"] == ["draining"]
    functions = (await get(host, "/functions")).json()
    assert {fn["name"]: fn["status"] for fn in functions}["hold"] == "draining"

    release(host)
    assert (await held).data == b"released"
    await draining


async def test_readyz_reports_component_problems(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    host.problems["idempotency:redis"] = "connection refused"
    down = await get(host, "/readyz")
    assert down.status == 503
    assert down.json()["reasons"] == ["idempotency:redis: connection refused"]
    del host.problems["idempotency:redis"]
    assert (await get(host, "/readyz")).status == 200


async def test_metrics_endpoint(host_factory: HostFactory, nc: NatsClient) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    for _ in range(3):
        await nc.request("echo", b"{}", timeout=5)
    metrics = await get(host, "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'fnhost_messages_total{function="echo",outcome="reply"} 3.0' in metrics.text
    assert 'fnhost_invocation_duration_seconds_count{function="echo"} 3.0' in metrics.text


async def test_functions_json(host_factory: HostFactory, nc: NatsClient) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    await nc.request("echo", b"{}", timeout=5)
    js = nc.jetstream()
    await js.publish("in.ok", b"{}")
    await js.publish("in.bad", b'{"reject": true}')
    # The outcome is counted when the chain returns, the copy once stored after that.
    await wait_for(
        lambda: (
            host.metrics.counts("consume")["ack"] == 1
            and host.metrics.counts("consume")["dead_letter"] == 1
            and host.metrics.stats("consume").dead_lettered == 1
        )
    )

    listed = await get(host, "/functions")
    assert listed.status == 200
    by_name: dict[str, dict[str, Any]] = {fn["name"]: fn for fn in listed.json()}
    assert set(by_name) == {"echo", "hold", "consume", "notify", "traced"}
    echo, consume, notify = by_name["echo"], by_name["consume"], by_name["notify"]
    assert echo["trigger"] == {"kind": "request", "subject": "echo", "queue": "echo"}
    assert echo["status"] == "running"
    assert echo["version"] == host.functions["echo"].runtime.version  # type: ignore[union-attr]
    assert echo["counts"]["reply"] == 1 and echo["inflight"] == 0
    assert consume["trigger"] == {
        "kind": "stream",
        "stream": "IN",
        "subjects": ["in.>"],
        "durable": "consume",
    }
    assert consume["counts"]["ack"] == 1 and consume["counts"]["dead_letter"] == 1
    assert consume["dead_letter"] == "dlq.consume"
    assert consume["dead_letter_depth"] == 1
    assert consume["pending"] == 0
    assert notify["trigger"] == {"kind": "subject", "subject": "notify", "queue": None}
    assert notify["pending"] is None and notify["dead_letter_depth"] is None


class _HelloRoutes:
    @hookimpl
    def fnhost_routes(self, host: Host) -> list[Route]:
        async def hello(request: Request) -> Response:
            return PlainTextResponse(f"hello from {len(host.functions)} functions")

        return [Route("/hello", hello)]


async def test_plugins_add_routes(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(), FUNCTIONS, plugins=[_HelloRoutes()])
    hello = await get(host, "/hello")
    assert (hello.status, hello.text) == (200, "hello from 5 functions")


async def test_gateway_is_off_by_default(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    assert host.http_url is not None
    response = await http(
        host.http_url + "/invoke/echo",
        "POST",
        b"{}",
        {"Authorization": "Bearer anything"},
    )
    assert response.status == 404


async def test_gateway_needs_the_bearer_token(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(GATEWAY), FUNCTIONS)
    assert host.http_url is not None
    url = host.http_url + "/invoke/echo"
    body = json.dumps({"n": 1}).encode()

    assert (await http(url, "POST", body)).status == 401
    assert (await http(url, "POST", body, {"Authorization": "Bearer wrong"})).status == 401
    good = {"Authorization": "Bearer s3cret"}
    reply = await http(url, "POST", body, good)
    assert (reply.status, reply.json()) == (200, {"echo": {"n": 1}})
    assert reply.headers["content-type"] == "application/json"
    # Error replies keep their NATS services code; only request functions are invocable.
    bad = await http(url, "POST", b"not json", good)
    assert bad.status == 400 and bad.json()["error"]
    assert (await http(host.http_url + "/invoke/consume", "POST", body, good)).status == 404
    assert (await http(host.http_url + "/invoke/nope", "POST", body, good)).status == 404
    assert (await http(url, "GET", None, good)).status == 405


async def test_gateway_carries_the_callers_trace(host_factory: HostFactory) -> None:
    host = await host_factory(manifest(GATEWAY), FUNCTIONS)
    assert host.http_url is not None
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    reply = await http(
        host.http_url + "/invoke/traced",
        "POST",
        b"{}",
        {"Authorization": "Bearer s3cret", "traceparent": parent, "tracestate": "k=v"},
    )
    assert reply.json() == {"traceparent": parent, "tracestate": "k=v"}
