"""The host as a whole, on a real nats-server: drain, server restarts, bad input.

Drain tests run ``python -m fnhost run`` as a real process (``HostProcess``)
and send it SIGTERM; handlers append to a journal file, so the test sees which
messages started and finished in which life of the host. The consumer state on
the server (ack floor, ack pending) and the redeliveries after a restart tell
what was acked: nothing whose handler did not finish may be.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from chaos.harness import HostProcess
from conftest import HostFactory
from fnhost.cli import YOUNG_GC_THRESHOLD
from fnhost.host import Host, _drain_connection
from fnhost_sdk import headers as h
from fnhost_sdk.server import NatsServer, free_port
from fnhost_sdk.waiting import wait_for, wait_for_sync
from support.journal import JOURNAL_HELPER, Journal

pytestmark = pytest.mark.nats

WORK_MANIFEST = """\
version: 1
http: false
streams:
  WORK: {subjects: ["work.>"]}
functions:
  slow:
    module: slow.py
    trigger: {stream: WORK, subjects: [work.items], durable: slow, ack_wait: 4s}
    concurrency: 4
    timeout: 5m
  slowreq:
    module: slowreq.py
    trigger: {request: slow.req}
"""

# SLOW_SECONDS: how long each message takes; RELEASE_FILE: wait until it exists instead.
SLOW_HANDLER = (
    JOURNAL_HELPER
    + """
import asyncio


async def handle(item: str, ctx) -> None:
    journal = os.environ["JOURNAL"]
    note(journal, "start", item, ctx.attempt, os.getpid())
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
    note(journal, "finish", item, ctx.attempt, os.getpid())
"""
)

SLOW_SYNC_HANDLER = (
    JOURNAL_HELPER
    + """
import time


def handle(item: str, ctx) -> None:
    journal = os.environ["JOURNAL"]
    note(journal, "start", item, ctx.attempt, os.getpid())
    time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
    note(journal, "finish", item, ctx.attempt, os.getpid())
"""
)

SLOW_REQUEST = (
    JOURNAL_HELPER
    + """
import asyncio
from pathlib import Path


async def handle(item: str, ctx) -> str:
    note(os.environ["JOURNAL"], "start", item, 1, os.getpid())
    release = Path(os.environ["RELEASE_FILE"])
    while not release.exists():
        await asyncio.sleep(0.02)
    return f"done {item}"
"""
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "fn.yaml").write_text(WORK_MANIFEST)
    (root / "slow.py").write_text(SLOW_HANDLER)
    (root / "slowreq.py").write_text(SLOW_REQUEST)
    return root


@pytest.fixture
def journal(project: Path) -> Journal:
    return Journal(project / "journal.txt")


@pytest.fixture
def host_process(project: Path, journal: Journal, nats_server: NatsServer) -> Iterator[HostProcess]:
    """A ``fnhost run`` process on the project (not started); killed at teardown."""
    host = HostProcess(
        project / "fn.yaml",
        nats_server.url,
        env={
            "JOURNAL": str(journal.path),
            "RELEASE_FILE": str(project / "release"),
            "SLOW_SECONDS": "1.5",
        },
        grace=30,
    )
    try:
        yield host
    finally:
        host.close()


async def _publish_items(js: JetStreamContext, count: int) -> list[str]:
    items = [f"m{n}" for n in range(count)]
    for item in items:
        await js.publish("work.items", item.encode())
    return items


async def _all_settled(js: JetStreamContext) -> bool:
    """Every stored message delivered and acked (the consumer may count a message
    pending only a moment after its publish, hence the delivered sequence)."""
    last = (await js.stream_info("WORK")).state.last_seq
    info = await js.consumer_info("WORK", "slow")
    caught_up = info.delivered.stream_seq >= last
    return caught_up and info.num_pending == 0 and info.num_ack_pending == 0


def _terminate(host: HostProcess) -> int:
    """SIGTERM and the exit code; 60 s is far beyond any grace used here."""
    return host.terminate(timeout=60)


@pytest.mark.fault
@pytest.mark.slow
async def test_sigterm_mid_batch_acks_exactly_what_finished(
    host_process: HostProcess, journal: Journal, nc: NatsClient
) -> None:
    js = nc.jetstream()
    host_process.start()
    first_life = host_process.pid
    items = await _publish_items(js, 12)
    # Mid-batch: some handlers are running, most messages are still in the stream.
    wait_for_sync(lambda: journal.count("start") >= 3, timeout=30, message="handlers started")

    assert await asyncio.to_thread(_terminate, host_process) == 0
    log = host_process.log()
    assert "SIGTERM received: draining" in log
    assert "drained: all in-flight work finished" in log
    started = journal.items("start", first_life)
    finished = journal.items("finish", first_life)
    assert started, "no handler ran before the SIGTERM"
    # The grace (30 s) is far longer than a handler (1.5 s): every started one finished.
    assert finished == started
    assert len(started) < len(items), "the whole batch ran before the SIGTERM"
    # What finished was acked before the connection closed: the ack floor covers it
    # (messages are delivered in order), and nothing beyond it was acked.
    info = await js.consumer_info("WORK", "slow")
    assert info.ack_floor.stream_seq == len(started), info

    host_process.env["SLOW_SECONDS"] = "0"
    host_process.start()
    second_life = host_process.pid
    await wait_for(lambda: _all_settled(js), timeout=60, message="all messages acked")

    again = journal.items("start", second_life)
    # Acked in life 1 means never delivered again; the rest ran once, in life 2.
    assert not set(again) & set(finished), (again, finished)
    assert set(again) == set(items) - set(finished)
    assert journal.items("finish") == dict.fromkeys(items, 1)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("handler", ["async", "sync"])
async def test_a_handler_longer_than_the_grace_is_not_acked_and_comes_back(
    host_process: HostProcess, journal: Journal, nc: NatsClient, project: Path, handler: str
) -> None:
    if handler == "sync":
        (project / "slow.py").write_text(SLOW_SYNC_HANDLER)
    js = nc.jetstream()
    host_process.grace = 1.0
    host_process.env["SLOW_SECONDS"] = "120"
    host_process.start()
    first_life = host_process.pid
    await js.publish("work.items", b"long")
    wait_for_sync(lambda: journal.count("start") == 1, timeout=30, message="handler started")

    # 60 s to exit while the handler would take 120 s: the 1 s grace cut it short.
    assert await asyncio.to_thread(_terminate, host_process) == 0
    assert "still running after the 1s grace period" in host_process.log()
    assert journal.items("finish", first_life) == {}
    info = await js.consumer_info("WORK", "slow")
    assert info.ack_floor.stream_seq == 0, f"an unfinished message was acked: {info}"

    host_process.env["SLOW_SECONDS"] = "0"
    host_process.start()
    second_life = host_process.pid
    # Redelivered once its ack wait (4 s) runs out, and handled to the end this time.
    await wait_for(
        lambda: journal.items("finish", second_life) == {"long": 1},
        timeout=60,
        message="the cut-short message redelivered and finished",
    )
    assert [e.attempt for e in journal.entries() if e.event == "finish"] == [2]
    await wait_for(lambda: _all_settled(js), timeout=30, message="acked after the redelivery")


@pytest.mark.fault
@pytest.mark.slow
async def test_in_flight_requests_are_answered_and_new_ones_refused_while_draining(
    host_process: HostProcess, journal: Journal, nc: NatsClient, project: Path
) -> None:
    host_process.start()
    in_flight = asyncio.ensure_future(nc.request("slow.req", b"first", timeout=60))
    await wait_for(lambda: journal.count("start") == 1, timeout=30, message="request started")

    terminated = asyncio.ensure_future(asyncio.to_thread(_terminate, host_process))
    await wait_for(
        lambda: "SIGTERM received" in host_process.log(), timeout=30, message="SIGTERM seen"
    )

    async def refused() -> bool:
        # A request that got in would block (the release file does not exist): time out.
        try:
            reply = await nc.request("slow.req", b"late", timeout=1)
        except nats.errors.NoRespondersError:
            return True
        except nats.errors.TimeoutError:
            return False
        assert reply.headers and reply.headers.get(h.SERVICE_ERROR_CODE) == "503", reply
        assert "draining" in reply.headers[h.SERVICE_ERROR]
        return True

    await wait_for(refused, timeout=30, message="new requests refused while draining")
    assert not in_flight.done(), "the in-flight request ended before its handler finished"
    assert journal.items("start") == {"first": 1}, "a request arriving after SIGTERM ran"

    (project / "release").touch()
    reply = await in_flight
    assert reply.data == b"done first"
    assert not (reply.headers or {}).get(h.SERVICE_ERROR_CODE)
    assert await terminated == 0


@pytest.mark.fault
def test_sigterm_while_nats_is_unreachable_exits_promptly(project: Path, journal: Journal) -> None:
    # Nothing listens there: the first connect keeps retrying, as it should.
    host = HostProcess(
        project / "fn.yaml", f"nats://127.0.0.1:{free_port()}", env={"JOURNAL": str(journal.path)}
    )
    try:
        host.start(wait_ready=False)
        wait_for_sync(
            lambda: host.log().count("Connection refused") >= 2,
            timeout=30,
            message="host retrying the connect",
        )
        assert host.alive
        # Within 60 s although the connect would retry forever.
        assert _terminate(host) == 0
        assert "stopped before the host was ready" in host.log()
    finally:
        host.close()


@pytest.mark.fault
@pytest.mark.slow
async def test_sigterm_while_disconnected_exits_promptly_and_cleanly(
    host_process: HostProcess, journal: Journal, nats_server: NatsServer, nc: NatsClient
) -> None:
    js = nc.jetstream()
    host_process.start()
    await js.publish("work.items", b"m0")
    await wait_for(lambda: journal.count("finish") == 1, timeout=30, message="m0 handled")
    await wait_for(lambda: _all_settled(js), timeout=30, message="m0 acked")
    await nc.close()  # before the server goes: no reconnect noise from the test's client

    nats_server.kill()
    wait_for_sync(
        lambda: "disconnected from NATS" in host_process.log(), timeout=30, message="disconnect"
    )
    # Within 60 s although the connection never comes back.
    assert await asyncio.to_thread(_terminate, host_process) == 0
    assert "Traceback" not in host_process.log()


# --------------------------------------------------------------------------- server restart

RESTART_MANIFEST = """\
version: 1
http: false
streams:
  EVENTS: {subjects: ["events.>"]}
functions:
  ask:
    module: fns.py
    handler: ask
    trigger: {request: svc.ask}
  listen:
    module: fns.py
    handler: listen
    trigger: {subject: svc.tell}
  consume:
    module: fns.py
    handler: consume
    trigger: {stream: EVENTS, subjects: [events.happened], durable: consume}
"""

RESTART_FUNCTIONS = """\
from pathlib import Path


def _note(ctx, line):
    with Path(ctx.config["journal"]).open("a") as f:
        f.write(line + "\\n")


async def ask(data: str, ctx) -> str:
    return "answer " + data


async def listen(data: str, ctx) -> None:
    _note(ctx, "subject " + data)


async def consume(data: str, ctx) -> None:
    _note(ctx, "stream " + data)
"""


def _with_journal(manifest: str, journal: Path) -> str:
    """Give every function ``config: {journal: PATH}``."""
    return manifest.replace(
        "    trigger:", f"    config: {{journal: {str(journal)!r}}}\n    trigger:"
    )


async def _every_trigger_works(nc: NatsClient, journal: Path, tag: str) -> None:
    async def answered() -> bool:
        try:
            reply = await nc.request("svc.ask", tag.encode(), timeout=1)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return reply.data == f"answer {tag}".encode()

    await wait_for(answered, timeout=30, message=f"request answered ({tag})")

    def lines() -> list[str]:
        return journal.read_text().splitlines() if journal.exists() else []

    async def heard() -> bool:
        # Core NATS is at-most-once: publish until the (re)subscribed function hears it.
        await nc.publish("svc.tell", tag.encode())
        await nc.flush()
        await asyncio.sleep(0.1)
        return f"subject {tag}" in lines()

    await wait_for(heard, timeout=30, message=f"subject message handled ({tag})")
    js = nc.jetstream()
    await wait_for(
        lambda: js.publish("events.happened", tag.encode(), timeout=1),
        timeout=30,
        message=f"stream publish ({tag})",
        ignore=(nats.errors.Error,),
    )
    await wait_for(
        lambda: f"stream {tag}" in lines(), timeout=30, message=f"stream message handled ({tag})"
    )


@pytest.mark.fault
@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_every_trigger_works_again_after_a_server_restart(
    host_factory: HostFactory,
    nats_server: NatsServer,
    nc: NatsClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost")
    journal = tmp_path / "journal.txt"
    host = await host_factory(
        _with_journal(RESTART_MANIFEST, journal), {"fns.py": RESTART_FUNCTIONS}
    )
    assert {name: state.status for name, state in host.functions.items()} == dict.fromkeys(
        ("ask", "listen", "consume"), "running"
    )
    await _every_trigger_works(nc, journal, "before")

    if how == "kill":
        nats_server.kill()
        nats_server.start()
    else:
        nats_server.restart()

    await wait_for(lambda: host.connected, timeout=30, message="host reconnected")
    await _every_trigger_works(nc, journal, "after")
    messages = [record.getMessage() for record in caplog.records if record.name == "fnhost.nats"]
    assert any("disconnected from NATS" in m for m in messages), messages
    assert any(m.startswith("reconnected to NATS at 127.0.0.1:") for m in messages), messages
    assert not host.draining


# --------------------------------------------------------------------------- bad input

ISOLATION_MANIFEST = """\
version: 1
http: false
streams:
  JOBS: {subjects: ["jobs.>"]}
functions:
  good:
    module: good.py
    trigger: {request: iso.good}
  syntax:
    module: syntax_error.py
    trigger: {request: iso.syntax}
  nohandler:
    module: good.py
    handler: missing
    trigger: {request: iso.nohandler}
  raises:
    module: raises.py
    trigger: {request: iso.raises}
  typed:
    module: typed.py
    trigger: {request: iso.typed}
  job:
    module: typed.py
    trigger: {stream: JOBS, subjects: [jobs.new], durable: job}
"""

ISOLATION_FILES = {
    "good.py": """\
        async def handle(data: str) -> str:
            return data.upper()
    """,
    "syntax_error.py": """\
        async def handle(data: str) -> str
            return data
    """,
    "raises.py": """\
        async def handle(data: str) -> str:
            raise ValueError("the handler broke on " + data)
    """,
    "typed.py": """\
        from pydantic import BaseModel


        class Order(BaseModel):
            order_id: str
            total: float


        async def handle(order: Order) -> dict:
            return {"order_id": order.order_id}
    """,
}


async def _request(nc: NatsClient, subject: str, data: bytes) -> tuple[str, str | None, str]:
    reply = await nc.request(subject, data, timeout=10)
    headers = reply.headers or {}
    return reply.data.decode(), headers.get(h.SERVICE_ERROR_CODE), headers.get(h.SERVICE_ERROR, "")


async def test_broken_modules_raising_handlers_and_bad_payloads_leave_the_rest_running(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost")
    host: Host = await host_factory(ISOLATION_MANIFEST, ISOLATION_FILES)
    status = {name: state.status for name, state in host.functions.items()}
    assert status == {
        "good": "running",
        "syntax": "failed",
        "nohandler": "failed",
        "raises": "running",
        "typed": "running",
        "job": "running",
    }
    syntax_error = host.functions["syntax"].error or ""
    assert "function 'syntax'" in syntax_error
    assert "fn.yaml:" in syntax_error and "syntax_error.py:1" in syntax_error, syntax_error
    missing = host.functions["nohandler"].error or ""
    assert "function 'nohandler'" in missing and "missing" in missing, missing
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert syntax_error in logged and missing in logged

    assert await _request(nc, "iso.good", b"ok") == ("OK", None, "")
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("iso.syntax", b"x", timeout=5)

    body, code, error = await _request(nc, "iso.raises", b"input-7")
    assert (body, code) == ("", "500")
    assert "ValueError: the handler broke on input-7" in error
    assert any(
        "function raises" in record.getMessage() and "the handler broke" in record.getMessage()
        for record in caplog.records
    ), "the failure is not logged with the function's name"

    body, code, error = await _request(nc, "iso.typed", b'{"order_id": 5}')
    assert code == "400" and "Order" in error and "total" in error, error
    body, code, error = await _request(nc, "iso.typed", b"not json at all")
    assert code == "400", error

    js = nc.jetstream()
    await js.publish("jobs.new", b"{broken")
    await js.publish("jobs.new", b'{"order_id": "o-2", "total": 3}')
    await wait_for(
        lambda: _consumer_done(js, "JOBS", "job"), timeout=30, message="stream messages settled"
    )
    assert any(
        "function job" in record.getMessage() and record.levelno >= logging.ERROR
        for record in caplog.records
    ), "the undecodable stream message is not reported with the function's name"

    # After all that, everything that loaded still answers.
    assert await _request(nc, "iso.good", b"still") == ("STILL", None, "")
    assert await _request(nc, "iso.typed", b'{"order_id": "o-3", "total": 1.5}') == (
        '{"order_id":"o-3"}',
        None,
        "",
    )
    assert {name: state.status for name, state in host.functions.items()} == status


async def _consumer_done(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq == 2


GC_MANIFEST = """\
version: 1
http: false
functions:
  thresholds:
    module: thresholds.py
    trigger: {request: gc.thresholds}
"""


async def test_a_host_process_collects_young_objects_every_10000_allocations(
    tmp_path: Path, nats_server: NatsServer, nc: NatsClient
) -> None:
    """At Python's default (700) the objects of invocations waiting on a server round
    trip are scanned at every few messages (docs/cli.md)."""
    (tmp_path / "fn.yaml").write_text(GC_MANIFEST)
    (tmp_path / "thresholds.py").write_text(
        "import gc\n\n\n"
        "async def handle(_: str) -> list[int]:\n"
        "    return list(gc.get_threshold())\n"
    )
    host = HostProcess(tmp_path / "fn.yaml", nats_server.url)
    try:
        host.start()
        answer = await nc.request("gc.thresholds", b'""', timeout=10)
    finally:
        host.close()
    young, *older = json.loads(answer.data)
    assert young == YOUNG_GC_THRESHOLD == 10_000
    assert older == list(gc.get_threshold()[1:])  # the older generations keep Python's


async def test_a_connection_whose_drain_cannot_finish_is_closed_and_said_so(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    await nc.subscribe("orders.>", cb=_ignore)
    nats_server.pause()  # no PONG: nats-py's drain waits on its last flush
    try:
        with caplog.at_level(logging.WARNING, logger="fnhost.host"):
            await _drain_connection(nc)
        assert nc.is_closed
        assert "connection drain did not finish in 5s; closing" in caplog.text
    finally:
        nats_server.resume()


async def _ignore(msg: Msg) -> None:
    del msg
