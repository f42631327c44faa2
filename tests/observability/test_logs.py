"""fnhost.logs: JSON lines under ``run``, readable lines under ``dev``, invocation fields.

Each test runs the real command in a process (logging is process-wide), sends
a request with a known trace, and reads what the process wrote.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from fnhost_sdk import headers as h
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for

from ._support import CliHost

pytestmark = [pytest.mark.nats, pytest.mark.slow]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

MANIFEST = """\
version: 1
http: false
LOGGING
streams:
  IN: {subjects: ["in.>"]}
functions:
  ping:
    module: fn.py
    handler: ping
    trigger: {request: ping}
  greet:
    module: fn.py
    handler: greet
    trigger: {request: greet}
  blocking:
    module: fn.py
    handler: blocking
    trigger: {request: blocking}
  consume:
    module: fn.py
    handler: consume
    trigger: {stream: IN, subjects: [in.a], durable: consume}
    retry: {max_deliver: 3, backoff: [10ms]}
"""

FUNCTIONS = """\
import logging

from fnhost_sdk import Context, Retry

plain = logging.getLogger("userland")


async def ping(data: bytes) -> bytes:
    return b"pong"


async def greet(data: dict, ctx: Context) -> dict:
    ctx.log.info("greeting %s", data["name"])
    ctx.log.info("order lines for %s: %s", data["name"], " ".join(f"sku-{n}" for n in range(30)))
    plain.info("plain logger line")
    plain.debug("a debug line")
    return {"hello": data["name"]}


def blocking(data: dict, ctx: Context) -> dict:
    plain.warning("from a worker thread")
    return {}


async def consume(data: dict, ctx: Context) -> None:
    plain.info("consuming attempt %d", ctx.attempt)
    if ctx.attempt == 1:
        raise Retry(delay=0.01)
"""


def project(tmp_path: Path, logging_line: str = "") -> Path:
    (tmp_path / "fn.py").write_text(FUNCTIONS)
    path = tmp_path / "fn.yaml"
    path.write_text(MANIFEST.replace("LOGGING\n", textwrap.dedent(logging_line)))
    return path


async def traffic(nc: NatsClient) -> None:
    headers = {h.TRACEPARENT: TRACEPARENT, h.MSG_ID: "greet-1"}
    await nc.request("greet", b'{"name": "ada"}', timeout=5, headers=headers)
    await nc.request("blocking", b"{}", timeout=5, headers={h.TRACEPARENT: TRACEPARENT})
    await nc.jetstream().publish(
        "in.a", b"{}", headers={h.TRACEPARENT: TRACEPARENT, h.MSG_ID: "consume-1"}
    )


async def run_host(host: CliHost, nc: NatsClient, until: str) -> str:
    # Ready when it answers: at level WARNING it does not say "host ready".
    host.start(wait_ready=False)
    try:
        await wait_for(
            lambda: host.alive and nc.request("ping", b"", timeout=0.5),
            timeout=30,
            message=f"{host.log_path.name} answers",
            ignore=(nats.errors.NoRespondersError, nats.errors.TimeoutError),
        )
        await traffic(nc)
        deadline = asyncio.get_running_loop().time() + 15
        while until not in host.log():
            assert asyncio.get_running_loop().time() < deadline, host.log()
            await asyncio.sleep(0.05)
    finally:
        code = await asyncio.to_thread(host.stop)
    assert code == 0, host.log()
    return host.log()


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


async def test_run_logs_json_with_invocation_fields(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    host = CliHost(project(tmp_path), nats_server.url, "run")
    text = await run_host(host, nc, "consuming attempt 2")

    records = json_lines(text)
    every = [line for line in text.splitlines() if line.strip()]
    assert len(records) == len(every), "every line is a JSON object"
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)

    def one(msg: str) -> dict[str, Any]:
        (found,) = [r for r in records if r["msg"] == msg]
        return found

    for record in (one("greeting ada"), one("plain logger line")):
        assert record["function"] == "greet"
        assert record["subject"] == "greet"
        assert record["message_id"] == "greet-1"
        assert record["attempt"] == 1
        assert record["trace_id"] == TRACE_ID
    thread = one("from a worker thread")
    assert (thread["function"], thread["trace_id"], thread["level"]) == (
        "blocking",
        TRACE_ID,
        "warning",
    )
    retried = one("consuming attempt 2")
    assert (retried["function"], retried["attempt"], retried["message_id"]) == (
        "consume",
        2,
        "consume-1",
    )
    assert retried["trace_id"] == TRACE_ID
    # The host's own warning about the retry is an invocation line too.
    (nak,) = [r for r in records if r["logger"] == "fnhost.trigger" and "retrying" in r["msg"]]
    assert (nak["function"], nak["attempt"], nak["trace_id"]) == ("consume", 1, TRACE_ID)
    # INFO is the default level.
    assert not [r for r in records if r["msg"] == "a debug line"]


async def test_dev_logs_readable_lines(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    host = CliHost(project(tmp_path), nats_server.url, "dev")
    text = await run_host(host, nc, "consuming attempt 2")

    assert not json_lines(text)
    assert "[greet] greeting ada" in text
    assert "[consume attempt=2] consuming attempt 2" in text
    assert "host ready" in text
    # Piped (here; or into a file or a log collector) a record stays on one line
    # however long, so grepping a message finds all of it.
    skus = " ".join(f"sku-{n}" for n in range(30))
    assert any(line.endswith(f"[greet] order lines for ada: {skus}") for line in text.splitlines())


async def test_level_from_the_manifest(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    host = CliHost(project(tmp_path, "logging: {level: warning}\n"), nats_server.url, "run")
    text = await run_host(host, nc, "from a worker thread")

    messages = [r["msg"] for r in json_lines(text)]
    assert "from a worker thread" in messages
    assert "greeting ada" not in messages
    assert "plain logger line" not in messages


async def test_log_level_option_overrides_the_manifest(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    path = project(tmp_path, "logging: {level: warning}\n")
    host = CliHost(path, nats_server.url, "run", "--log-level", "debug")
    text = await run_host(host, nc, "consuming attempt 2")

    records = json_lines(text)
    debug = [r for r in records if r["msg"] == "a debug line"]
    assert debug and debug[0]["function"] == "greet" and debug[0]["level"] == "debug"
    # With DEBUG on, the logging plugin adds one line per invocation with its outcome.
    outcomes = [r for r in records if r["logger"] == "fnhost.invocation"]
    assert any(r["msg"].startswith("reply in ") and r["function"] == "greet" for r in outcomes)
    assert any(r["msg"].startswith("nak in ") and r["attempt"] == 1 for r in outcomes)
