"""fnhost.tracing: W3C trace context across functions, and one span per invocation.

Propagation is checked on the wire (what a plain subscriber receives); spans
are read from an in-memory exporter added at startup, and, for the trace that
crosses two host processes, from the JSON-lines files of the
``span_recorder`` test plugin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from fnhost.logs import InvocationContext
from fnhost_sdk import headers as h
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import collect

from ._support import HostFactory, SpanMemory

pytestmark = pytest.mark.nats

REPO = Path(__file__).resolve().parents[2]

MANIFEST = """\
version: 1
http: false
tracing: {exporter: EXPORTER, sample_ratio: RATIO, service_name: SERVICE}
streams:
  IN: {subjects: ["in.>"], duplicate_window: 1h}
  OUT: {subjects: ["out.>"]}
  DLQ: {subjects: ["dlq.>"]}
functions:
  front:
    module: fn.py
    handler: front
    trigger: {request: front.call}
  back:
    module: fn.py
    handler: back
    trigger: {request: back.call}
  relay:
    module: fn.py
    handler: relay
    trigger: {stream: IN, subjects: [in.relay], durable: relay}
    output: out.relayed
  broken:
    module: fn.py
    handler: broken
    trigger: {stream: IN, subjects: [in.broken], durable: broken}
    dead_letter: dlq.broken
  flaky:
    module: fn.py
    handler: flaky
    trigger: {stream: IN, subjects: [in.flaky], durable: flaky}
    retry: {max_deliver: 3, backoff: [10ms]}
"""

FUNCTIONS = {
    "fn.py": """\
        from fnhost_sdk import Context, Reject, Retry


        async def front(data: dict, ctx: Context) -> dict:
            ctx.log.info("front called")
            await ctx.publish("seen.front", {"from": "front"})
            return await ctx.request("back.call", {}, returns=dict)


        async def back(data: dict, ctx: Context) -> dict:
            headers = ctx.headers or {}
            return {key: headers.get(key) for key in ("traceparent", "tracestate")}


        async def relay(data: dict) -> dict:
            return data


        async def broken(data: dict) -> None:
            raise Reject("never valid")


        async def flaky(data: dict, ctx: Context) -> None:
            if ctx.attempt == 1:
                raise Retry(delay=0.01)
        """
}


def manifest(exporter: str = "none", ratio: float = 1.0, service: str = "fnhost") -> str:
    return (
        MANIFEST.replace("EXPORTER", exporter)
        .replace("RATIO", str(ratio))
        .replace("SERVICE", service)
    )


def traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def parse(value: str | None) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a traceparent header."""
    assert value is not None, "no traceparent header"
    version, trace_id, span_id, flags = value.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), value
    return trace_id, span_id, flags


def new_ids() -> tuple[str, str]:
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


async def stream_message(nc: NatsClient, stream: str, subject: str) -> Msg:
    js = nc.jetstream()
    found = await wait_for(
        lambda: js.get_last_msg(stream, subject),
        message=f"a message on {subject}",
        ignore=(Exception,),
    )
    return found  # type: ignore[return-value]


async def test_publish_and_request_carry_the_trace(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    await host_factory(manifest(), FUNCTIONS)
    seen = await collect(nc, "seen.>")
    trace_id, span_id = new_ids()
    sent = {h.TRACEPARENT: traceparent(trace_id, span_id), h.TRACESTATE: "vendor=abc"}

    reply = await nc.request("front.call", b"{}", timeout=5, headers=sent)

    # back saw what front's ctx.request carried: the same trace, front's own span as parent.
    echoed = json.loads(reply.data)
    back_trace, back_parent, back_flags = parse(echoed["traceparent"])
    assert (back_trace, back_flags) == (trace_id, "01")
    assert back_parent != span_id
    assert echoed["tracestate"] == "vendor=abc"
    # ctx.publish to a core subject carried the same context.
    await wait_for(lambda: seen, message="front's publish")
    assert seen[0].headers is not None
    assert seen[0].headers[h.TRACEPARENT] == echoed["traceparent"]
    assert seen[0].headers[h.TRACESTATE] == "vendor=abc"


async def test_a_message_without_context_starts_a_trace(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    await host_factory(manifest(), FUNCTIONS)
    first = json.loads((await nc.request("front.call", b"{}", timeout=5)).data)
    second = json.loads((await nc.request("front.call", b"{}", timeout=5)).data)

    assert parse(first["traceparent"])[0] != parse(second["traceparent"])[0]
    assert first["tracestate"] is None


async def test_log_lines_and_publishes_share_a_started_trace(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Exporter none makes the context lazily, on the first log line or publish: both
    # must see the same one.
    caplog.handler.addFilter(InvocationContext())
    caplog.set_level(logging.INFO, logger="fnhost.fn.front")
    await host_factory(manifest(), FUNCTIONS)
    seen = await collect(nc, "seen.>")
    await nc.request("front.call", b"{}", timeout=5)
    await wait_for(lambda: seen, message="front's publish")

    (record,) = [r for r in caplog.records if r.getMessage() == "front called"]
    assert seen[0].headers is not None
    assert parse(seen[0].headers[h.TRACEPARENT])[0] == record.__dict__["trace_id"]


async def test_outputs_and_dead_letters_carry_the_trace(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    await host_factory(manifest(), FUNCTIONS)
    js = nc.jetstream()
    relay_trace, relay_span = new_ids()
    broken_trace, broken_span = new_ids()

    await js.publish(
        "in.relay", b'{"n": 1}', headers={h.TRACEPARENT: traceparent(relay_trace, relay_span)}
    )
    await js.publish(
        "in.broken", b'{"n": 2}', headers={h.TRACEPARENT: traceparent(broken_trace, broken_span)}
    )

    output = await stream_message(nc, "OUT", "out.relayed")
    assert output.headers is not None
    out_trace, out_parent, _ = parse(output.headers[h.TRACEPARENT])
    assert out_trace == relay_trace
    assert out_parent != relay_span, "the output's parent is the relay invocation, not its input"

    dead = await stream_message(nc, "DLQ", "dlq.broken")
    assert dead.headers is not None
    dead_trace, dead_parent, _ = parse(dead.headers[h.TRACEPARENT])
    assert dead_trace == broken_trace
    assert dead_parent != broken_span, "the dead letter is a child of the failed invocation"
    assert dead.headers[h.FUNCTION] == "broken"


async def test_no_spans_with_exporter_none(host_factory: HostFactory, nc: NatsClient) -> None:
    host = await host_factory(manifest(), FUNCTIONS)
    assert host.tracing.provider is None
    await nc.request("front.call", b"{}", timeout=5)


async def test_one_span_per_invocation_with_messaging_attributes(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    memory = SpanMemory()
    await host_factory(manifest("console", service="orders-svc"), FUNCTIONS, plugins=[memory])
    js = nc.jetstream()
    trace_id, span_id = new_ids()
    await nc.request(
        "front.call", b"{}", timeout=5, headers={h.TRACEPARENT: traceparent(trace_id, span_id)}
    )
    await js.publish("in.flaky", b"{}", headers={h.MSG_ID: "flaky-1"})

    await wait_for(lambda: len(memory.named("flaky process")) == 2, message="two flaky spans")
    await wait_for(lambda: memory.named("back process"), message="back's span")

    (front,) = memory.named("front process")
    (back,) = memory.named("back process")
    assert front.kind is SpanKind.SERVER
    assert front.context is not None and front.parent is not None
    assert f"{front.context.trace_id:032x}" == trace_id
    assert f"{front.parent.span_id:016x}" == span_id
    assert back.parent is not None and back.parent.span_id == front.context.span_id
    assert front.resource.attributes["service.name"] == "orders-svc"
    attributes = dict(front.attributes or {})
    assert attributes["messaging.system"] == "nats"
    assert attributes["messaging.destination.name"] == "front.call"
    assert attributes["messaging.nats.delivery_count"] == 1
    assert attributes["fnhost.outcome"] == "reply"

    first, second = sorted(
        memory.named("flaky process"),
        key=lambda span: (span.attributes or {})["messaging.nats.delivery_count"],
    )
    for span, attempt in ((first, 1), (second, 2)):
        assert span.kind is SpanKind.CONSUMER
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == "nats"
        assert attributes["messaging.destination.name"] == "in.flaky"
        assert attributes["messaging.message.id"] == "flaky-1"
        assert attributes["messaging.nats.delivery_count"] == attempt
        assert attributes["messaging.nats.stream"] == "IN"
        assert attributes["messaging.consumer.group.name"] == "flaky"
    assert (first.attributes or {})["fnhost.outcome"] == "nak"
    assert (second.attributes or {})["fnhost.outcome"] == "ack"


async def test_sample_ratio_samples_new_traces_and_parents_decide(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    memory = SpanMemory()
    await host_factory(manifest("console", ratio=0.0), FUNCTIONS, plugins=[memory])
    trace_id, span_id = new_ids()

    unsampled = json.loads((await nc.request("front.call", b"{}", timeout=5)).data)
    sampled = json.loads(
        (
            await nc.request(
                "front.call",
                b"{}",
                timeout=5,
                headers={h.TRACEPARENT: traceparent(trace_id, span_id, "01")},
            )
        ).data
    )

    # A new trace at ratio 0 is not recorded, but still propagated (the sampled bit clear).
    assert int(parse(unsampled["traceparent"])[2], 16) & 1 == 0
    # A sampled parent decides for its trace.
    assert parse(sampled["traceparent"])[0] == trace_id
    await wait_for(lambda: memory.named("back process"), message="the sampled trace's spans")
    assert {f"{span.context.trace_id:032x}" for span in memory.spans if span.context} == {trace_id}


# --- one trace, three functions, two host processes --------------------------


def _example_manifest(functions: str, tracing_service: str) -> str:
    return f"""\
version: 1
http: false
plugins: [plugins_for_tests.span_recorder]
tracing: {{exporter: console, service_name: {tracing_service}}}
streams:
  ORDERS: {{subjects: ["orders.created.>"], duplicate_window: 5m}}
  PAYMENTS: {{subjects: ["payments.>"], duplicate_window: 5m}}
  DLQ: {{subjects: ["dlq.>"]}}
kv:
  inventory: {{history: 5}}
functions:
{functions}"""


_ORDER = """\
  create-order:
    module: functions/order.py
    handler: create_order
    trigger: {request: orders.create}
  inventory:
    module: functions/inventory.py
    trigger: {stream: PAYMENTS, subjects: [payments.completed.v1], durable: inventory}
    dead_letter: dlq.inventory
"""

_PAYMENT = """\
  payment:
    module: functions/payment.py
    trigger: {stream: ORDERS, subjects: [orders.created.v1], durable: payment}
    dead_letter: dlq.payment
    output: payments.completed.v1
    config: {ledger: ledger.db}
"""


def _spans(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
async def test_one_trace_across_three_functions_on_two_processes(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    from chaos.harness import HostProcess  # tests/ is the import root of the test packages

    hosts: list[HostProcess] = []
    files: list[Path] = []
    for name, functions in (("orders", _ORDER), ("payments", _PAYMENT)):
        project = tmp_path / name
        shutil.copytree(REPO / "functions", project / "functions")
        (project / "fn.yaml").write_text(_example_manifest(functions, f"svc-{name}"))
        files.append(project / "spans.jsonl")
        hosts.append(
            HostProcess(
                project / "fn.yaml",
                nats_server.url,
                env={"FNHOST_SPAN_FILE": str(files[-1]), "OTEL_BSP_SCHEDULE_DELAY": "100"},
                name=name,
            )
        )
    try:
        for host in hosts:
            await asyncio.to_thread(host.start)
        trace_id, root_span = new_ids()
        reply = await nc.request(
            "orders.create",
            json.dumps(
                {"customer_id": "c1", "items": [{"sku": "A1", "qty": 1, "price": 5}], "total": 5}
            ).encode(),
            timeout=10,
            headers={h.TRACEPARENT: traceparent(trace_id, root_span)},
        )
        assert reply.headers is None or h.SERVICE_ERROR not in reply.headers, reply.headers

        def all_three() -> list[dict[str, object]] | None:
            spans = [span for path in files for span in _spans(path)]
            names = {span["name"] for span in spans}
            wanted = {"create-order process", "payment process", "inventory process"}
            return spans if wanted <= names else None

        spans = await wait_for(all_three, timeout=30, message="spans of all three functions")
    finally:
        for host in hosts:
            await asyncio.to_thread(host.terminate)
    by_name = {str(span["name"]): span for span in spans}
    order, payment, inventory = (
        by_name["create-order process"],
        by_name["payment process"],
        by_name["inventory process"],
    )
    assert {span["trace_id"] for span in (order, payment, inventory)} == {trace_id}
    assert order["parent_span_id"] == root_span
    assert payment["parent_span_id"] == order["span_id"]
    assert inventory["parent_span_id"] == payment["span_id"]
    assert (order["kind"], payment["kind"], inventory["kind"]) == ("SERVER", "CONSUMER", "CONSUMER")
    assert order["pid"] == inventory["pid"] != payment["pid"]
    assert {order["pid"], payment["pid"]} != {os.getpid()}
