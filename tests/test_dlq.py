"""Dead letters (fnhost.dlq) on a real nats-server: both paths into the DLQ, one copy each.

F3 (poison after max_deliver), F3b (Reject; a handler that kills its host),
F3c (the DLQ stream missing) from RELIABILITY.md, plus the advisory watcher's
dedup, a vanished original, and several manifests on one server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg

from fnhost import dlq, provision
from fnhost.host import Host
from fnhost.manifest import Manifest, load_manifest
from fnhost.reload import apply_manifest
from fnhost_sdk.server import NatsServer
from fnhost_sdk.session import Session
from fnhost_sdk.testing import wait_for
from support import dead_letter_id_of, module_of

STREAMS = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"], duplicate_window: 1h}
  DLQ: {subjects: ["dlq.>"]}
functions:
"""

FUNCTION = """\
  {name}:
    module: {module}
    trigger: {{stream: {stream}, subjects: [{subject}], durable: {name}{trigger}}}
    retry: {{max_deliver: {max_deliver}, backoff: [100ms]}}
    dead_letter: dlq.{name}
"""


def function(
    name: str = "work",
    *,
    module: str = "fn.py",
    stream: str = "IN",
    subject: str = "in.a",
    max_deliver: int = 3,
    trigger: str = "",
) -> str:
    return FUNCTION.format(
        name=name,
        module=module,
        stream=stream,
        subject=subject,
        max_deliver=max_deliver,
        trigger=trigger,
    )


# Fails on bodies starting with b"poison", rejects b"reject", dies on b"kill".
HANDLER = """\
    import os

    from fnhost_sdk import Reject

    SEEN = []


    async def handle(data: bytes, ctx) -> None:
        SEEN.append((data, ctx.attempt))
        if data.startswith(b"kill"):
            with open(os.environ.get("ATTEMPTS_FILE", os.devnull), "a") as attempts:
                attempts.write(f"{ctx.attempt}\\n")
            os._exit(137)
        if data.startswith(b"reject"):
            raise Reject("not for us")
        if data.startswith(b"poison"):
            raise ValueError("cannot digest")
"""

POISON = b"poison \xff\x00 not utf-8"


def dead_lettered(host: Host, name: str = "work") -> float:
    return host.metrics.value("fnhost_dead_lettered_total", function=name)


async def dead_letters(js: JetStreamContext, stream: str = "DLQ") -> list[RawStreamMsg]:
    """Every message in the DLQ stream (an empty list if the stream is missing)."""
    try:
        last = (await js.stream_info(stream)).state.last_seq
    except nats.js.errors.NotFoundError:
        return []
    found = []
    for seq in range(1, last + 1):
        try:
            found.append(await js.get_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            continue  # deleted (replayed or purged)
    return found


async def copies_of(js: JetStreamContext, seq: int, stream: str = "IN") -> list[RawStreamMsg]:
    return [
        m
        for m in await dead_letters(js)
        if (m.headers or {}).get("Fnhost-Stream") == stream
        and (m.headers or {}).get("Fnhost-Stream-Seq") == str(seq)
    ]


async def watcher(js: JetStreamContext, stream: str = "IN", durable: str = "work") -> ConsumerInfo:
    return await js.consumer_info(dlq.ADVISORY_STREAM, dlq.watcher_consumer_name(stream, durable))


async def fake_advisory(nc: NatsClient, stream: str, durable: str, seq: int) -> None:
    """What JetStream publishes when ``stream``/``durable`` gives up on ``seq``."""
    advisory = {
        "type": "io.nats.jetstream.advisory.v1.max_deliver",
        "stream": stream,
        "consumer": durable,
        "stream_seq": seq,
        "deliveries": 3,
    }
    await nc.publish(dlq.advisory_subject(stream, durable), json.dumps(advisory).encode())
    await nc.flush()


# ------------------------------------------------------------------ no server


def test_dead_letter_headers_keep_the_original_and_drop_publish_directives() -> None:
    original = {
        "X-Trace": "t1",
        "Nats-Msg-Id": "order-7",
        "Nats-Rollup": "sub",
        "Nats-Expected-Last-Sequence": "4",
        "Nats-TTL": "1m",
    }
    headers = dlq.dead_letter_headers(
        original,
        subject="in.a",
        function="work",
        stream="IN",
        sequence=9,
        stored_at_us=1_764_000_000_123_456,
        attempts=3,
        error="E: x",
    )
    assert headers == {
        "X-Trace": "t1",
        "Fnhost-Original-Msg-Id": "order-7",
        "Fnhost-Original-Subject": "in.a",
        "Fnhost-Function": "work",
        "Fnhost-Stream": "IN",
        "Fnhost-Stream-Seq": "9",
        "Fnhost-Attempts": "3",
        "Fnhost-Error": "E: x",
        "Nats-Msg-Id": "dlq:IN:9:1764000000123456",
    }


def test_replay_headers_restore_the_original_with_a_new_id() -> None:
    def record(**headers: str) -> dlq.DeadLetterRecord:
        common = {"X-Trace": "t1", "Fnhost-Stream": "IN", "Fnhost-Stream-Seq": "9"}
        return dlq.DeadLetterRecord("DLQ", 4, "dlq.work", b"", {**common, **headers}, None)

    with_id = dlq.replay_headers(record(**{"Fnhost-Original-Msg-Id": "order-7"}))
    assert with_id == {
        "X-Trace": "t1",
        "Nats-Msg-Id": "order-7:replay:4",
        "Fnhost-Replayed": "DLQ:4",
    }
    assert dlq.replay_headers(record())["Nats-Msg-Id"] == "IN:9:replay:4"


def test_watcher_consumer_names_are_valid_and_distinct() -> None:
    one, two = dlq.watcher_consumer_name("A-B", "C"), dlq.watcher_consumer_name("A", "B-C")
    assert one != two
    assert one.startswith("fnhost-dlq-A-B-C-")
    assert not set(".*> ") & set(one)


# --------------------------------------------------------------- trigger path


@pytest.mark.nats
async def test_poison_reaches_the_dlq_after_exactly_max_deliver_attempts(
    host_factory, js: JetStreamContext, nc: NatsClient
) -> None:
    """F3: byte-identical body, original headers kept, good messages unaffected."""
    host = await host_factory(STREAMS + function(), {"fn.py": HANDLER})
    await js.publish("in.a", b"good 1")
    ack = await js.publish("in.a", POISON, headers={"X-Trace": "abc", "Nats-Msg-Id": "order-7"})
    await js.publish("in.a", b"good 2")

    copy = (await wait_for(lambda: copies_of(js, ack.seq), message="poison dead-lettered"))[0]
    assert copy.data == POISON
    headers = copy.headers or {}
    assert headers["X-Trace"] == "abc"
    assert headers["Fnhost-Original-Msg-Id"] == "order-7"
    assert headers["Nats-Msg-Id"] == await dead_letter_id_of(nc, "IN", ack.seq)
    assert headers["Fnhost-Original-Subject"] == "in.a"
    assert headers["Fnhost-Function"] == "work"
    assert headers["Fnhost-Attempts"] == "3"
    assert headers["Fnhost-Error"] == "ValueError: retries exhausted after 3 attempts: " + (
        "ValueError: cannot digest"
    )
    seen = module_of(host).SEEN
    assert [attempt for body, attempt in seen if body == POISON] == [1, 2, 3]
    assert [s for s in seen if s[0].startswith(b"good")] == [(b"good 1", 1), (b"good 2", 1)]
    assert len(await dead_letters(js)) == 1


@pytest.mark.nats
async def test_reject_reaches_the_dlq_after_one_attempt(host_factory, js: JetStreamContext) -> None:
    host = await host_factory(STREAMS + function(), {"fn.py": HANDLER})
    ack = await js.publish("in.a", b"reject me")
    copy = (await wait_for(lambda: copies_of(js, ack.seq), message="rejected dead-lettered"))[0]
    assert (copy.headers or {})["Fnhost-Attempts"] == "1"
    assert (copy.headers or {})["Fnhost-Error"] == "Reject: not for us"
    assert module_of(host).SEEN == [(b"reject me", 1)]


@pytest.mark.nats
async def test_a_re_created_stream_s_poison_is_not_taken_for_the_old_one_s(
    host_factory, js: JetStreamContext, nc: NatsClient, tmp_path: Path
) -> None:
    """A stream deleted and created again numbers its messages from 1 again. Named by
    stream and sequence alone, the new message's copy would be dropped by the DLQ's
    duplicate window as the old one's, and the original termed: lost."""
    text = STREAMS + function()
    first = await host_factory(text, {"fn.py": HANDLER}, root=tmp_path / "first")
    old = await js.publish("in.a", b"reject me, the first")
    await wait_for(lambda: copies_of(js, old.seq), message="the first dead-lettered")
    old_id = await dead_letter_id_of(nc, "IN", old.seq)
    await first.drain()
    await js.delete_stream("IN")

    second = await host_factory(text, {"fn.py": HANDLER}, root=tmp_path / "second")
    new = await js.publish("in.a", b"reject me, the second")
    assert new.seq == old.seq

    async def both_stored() -> bool:
        return len(await dead_letters(js)) == 2

    await wait_for(both_stored, message="the second dead-lettered")
    copies = await dead_letters(js)
    assert [copy.data for copy in copies] == [b"reject me, the first", b"reject me, the second"]
    ids = [(copy.headers or {})["Nats-Msg-Id"] for copy in copies]
    assert ids == [old_id, await dead_letter_id_of(nc, "IN", new.seq)]
    assert ids[0] != ids[1]
    assert dead_lettered(second) == 1


@pytest.mark.nats
async def test_a_missing_dlq_stream_leaves_the_original_unacked_until_it_exists(
    host_factory, js: JetStreamContext, nc: NatsClient, monkeypatch
) -> None:
    """F3c, trigger path: the copy cannot be stored, so the original is nak'ed (never
    termed or acked) and tried again; once the DLQ exists it lands, once."""
    # A copy's publish gives up after 1 s instead of 30 s, so the test sees the nak.
    monkeypatch.setitem(Session.__init__.__kwdefaults__, "publish_deadline", 1.0)
    settles: list[str] = []

    async def on_settle(msg: Msg) -> None:
        settles.append((msg.data.decode() or "+ACK").split(" ")[0])

    await nc.subscribe("$JS.ACK.IN.work.>", cb=on_settle)
    host = await host_factory(STREAMS + function(max_deliver=50), {"fn.py": HANDLER})
    await js.delete_stream("DLQ")
    ack = await js.publish("in.a", b"reject me")

    await wait_for(lambda: "-NAK" in settles, message="the original nak'ed: its copy not stored")
    assert next(s for s in settles if s != "+WPI") == "-NAK"
    assert "+TERM" not in settles and "+ACK" not in settles
    assert (await js.consumer_info("IN", "work")).ack_floor.stream_seq < ack.seq
    assert module_of(host).SEEN[0] == (b"reject me", 1)
    manifest = host.manifest
    await provision.ensure_stream(js, provision.stream_config("DLQ", manifest.streams["DLQ"]))

    await wait_for(lambda: copies_of(js, ack.seq), message="dead letter stored once the DLQ exists")
    await wait_for(lambda: dead_lettered(host) == 1, message="counted once it was stored")
    await wait_for(
        lambda: _acked(js, "work", ack.seq), message="the original settled after the copy"
    )
    assert len(await copies_of(js, ack.seq)) == 1
    assert settles.count("+TERM") == 1 and settles[-1] == "+TERM"


async def _acked(js: JetStreamContext, durable: str, seq: int) -> bool:
    info = await js.consumer_info("IN", durable)
    return info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0


# -------------------------------------------------------------- advisory path


@pytest.mark.nats
async def test_a_delivery_never_settled_is_dead_lettered_from_the_advisory(
    host_factory, js: JetStreamContext, nc: NatsClient, tmp_path: Path
) -> None:
    """The advisory fires while no host runs; the next host's watcher stores the copy."""
    manifest_text = STREAMS + function(max_deliver=1, trigger=", ack_wait: 1s")
    # A first host provisions everything, then stops: the test plays the host that dies.
    first = await host_factory(manifest_text, {"fn.py": HANDLER}, root=tmp_path / "p")
    await first.drain()
    ack = await js.publish("in.a", b"lost in a crash", headers={"X-Keep": "yes", "X-Note": "grüß"})
    crashed = await js.pull_subscribe_bind("work", "IN")
    (taken,) = await crashed.fetch(1, timeout=5)  # delivered once, never settled
    await crashed.unsubscribe()
    assert taken.data == b"lost in a crash"

    host = await host_factory(manifest_text, {"fn.py": HANDLER}, root=tmp_path / "p")
    copies = await wait_for(lambda: copies_of(js, ack.seq), message="copied from the advisory")
    assert len(copies) == 1
    headers = dlq.headers_of(copies[0])
    assert copies[0].data == b"lost in a crash"
    assert headers["X-Keep"] == "yes"
    assert headers["X-Note"] == "grüß", "read by message get, copied as UTF-8"
    assert headers["Fnhost-Attempts"] == "1"
    assert headers["Fnhost-Error"].startswith("MaxDeliveries: delivered 1 times")
    assert headers["Nats-Msg-Id"] == await dead_letter_id_of(nc, "IN", ack.seq)
    assert module_of(host).SEEN == [], "the message was never handed to the new host"
    await wait_for(lambda: dead_lettered(host) == 1, message="the advisory's copy counted")
    await wait_for(
        lambda: _watcher_done(js, 1), message="the advisory acked after the copy was stored"
    )


async def _watcher_done(js: JetStreamContext, count: int, durable: str = "work") -> bool:
    info = await watcher(js, durable=durable)
    return info.ack_floor.consumer_seq >= count and info.num_ack_pending == 0


@pytest.mark.nats
async def test_an_advisory_for_a_message_already_dead_lettered_stores_no_second_copy(
    host_factory, nc: NatsClient, js: JetStreamContext
) -> None:
    """The race of both paths: same message id, the DLQ's duplicate window keeps one."""
    host = await host_factory(STREAMS + function(), {"fn.py": HANDLER})
    ack = await js.publish("in.a", b"reject me")
    await wait_for(lambda: copies_of(js, ack.seq), message="dead-lettered by the trigger")
    await wait_for(lambda: dead_lettered(host) == 1, message="the trigger's copy counted")

    await fake_advisory(nc, "IN", "work", ack.seq)
    await wait_for(lambda: _watcher_done(js, 1), message="advisory handled")
    assert len(await dead_letters(js)) == 1
    assert dead_lettered(host) == 1, "the dropped duplicate is not counted"


@pytest.mark.nats
async def test_an_advisory_whose_original_is_gone_is_logged_and_acked(
    host_factory, nc: NatsClient, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    await host_factory(STREAMS + function(), {"fn.py": HANDLER})
    with caplog.at_level(logging.ERROR, logger="fnhost.dlq"):
        await fake_advisory(nc, "IN", "work", 4242)
        await wait_for(lambda: _watcher_done(js, 1), message="advisory acked")
    assert "IN/4242 hit max deliveries but is gone" in caplog.text
    assert await dead_letters(js) == []


@pytest.mark.nats
async def test_the_watcher_follows_what_a_reload_adds_changes_and_removes(
    host_factory, nc: NatsClient, js: JetStreamContext
) -> None:
    """A function with a dead letter that a reload adds is watched at once, its changed
    dead letter is followed, and once removed it is no longer watched (its pull requests
    stop). A deploy goes through the same host calls."""
    host = await host_factory(STREAMS + "  {}\n", {"fn.py": HANDLER})
    with pytest.raises(nats.js.errors.NotFoundError):
        await watcher(js)

    await apply_manifest(host, _rewrite(host, STREAMS + function()))
    # in.b: in the stream, not for the function, so only the advisory path touches it.
    first = await js.publish("in.b", b"lost in a crash")
    await fake_advisory(nc, "IN", "work", first.seq)
    copies = await wait_for(lambda: copies_of(js, first.seq), message="copied after the reload")
    assert [c.subject for c in copies] == ["dlq.work"]

    moved = STREAMS + function().replace("dead_letter: dlq.work", "dead_letter: dlq.moved")
    await apply_manifest(host, _rewrite(host, moved))
    second = await js.publish("in.b", b"lost in another crash")
    await fake_advisory(nc, "IN", "work", second.seq)
    copies = await wait_for(lambda: copies_of(js, second.seq), message="copied to the new DLQ")
    assert [c.subject for c in copies] == ["dlq.moved"]

    await apply_manifest(host, _rewrite(host, STREAMS + "  {}\n"))
    await wait_for(
        lambda: _no_pull_waiting(js),
        timeout=dlq.FETCH_WAIT * 3,
        message="the removed function's advisories no longer pulled",
    )


@pytest.mark.nats
async def test_a_stopped_watcher_leaves_no_subscription_behind(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """Stopping the watcher (shutdown, a reload that drops the function) takes its pull
    subscription off the connection. Cancelled mid-fetch, nats-py may leave an answer
    on it unmarked, and a subscription left behind then held the connection's drain
    (``fnhost dev``, Ctrl-C) to its timeout."""
    path = tmp_path / "fn.yaml"
    path.write_text(STREAMS + function())
    (tmp_path / "fn.py").write_text(textwrap.dedent(HANDLER))
    manifest = load_manifest(path)
    conn = await nats.connect(nats_server.url)
    try:
        watching = dlq.AdvisoryWatcher(conn)
        await watching.sync(manifest, manifest.functions.values())
        await wait_for(lambda: _pull_waiting(js), message="the watcher's pull request is waiting")
        assert _plain_subscriptions(nats_server, conn), "the watcher's pull subscription"
        await watching.stop()
        await conn.flush()
        assert _plain_subscriptions(nats_server, conn) == []
    finally:
        await conn.close()


async def _pull_waiting(js: JetStreamContext) -> bool:
    return (await watcher(js)).num_waiting >= 1


def _plain_subscriptions(server: NatsServer, conn: NatsClient) -> list[str]:
    """The subjects ``conn`` subscribes to, but for wildcard reply inboxes (``_INBOX.x.*``)."""
    (connection,) = server.monitor(f"connz?cid={conn.client_id}&subs=1")["connections"]
    return [s for s in connection.get("subscriptions_list", []) if not s.endswith(".*")]


def _rewrite(host: Host, text: str) -> Manifest:
    host.manifest.path.write_text(text)
    return load_manifest(host.manifest.path)


async def _no_pull_waiting(js: JetStreamContext) -> bool:
    return (await watcher(js)).num_waiting == 0


@pytest.mark.nats
async def test_hosts_of_other_manifests_leave_an_advisory_to_its_own(
    host_factory, nc: NatsClient, js: JetStreamContext, tmp_path: Path
) -> None:
    """Two manifests, one server: each advisory waits for a host of its function's manifest."""
    other_text = STREAMS.replace('IN: {subjects: ["in.>"]', 'OTHER: {subjects: ["other.>"]')
    other_text += function("other", stream="OTHER", subject="other.a")
    other = await host_factory(other_text, {"fn.py": HANDLER}, root=tmp_path / "other")
    await other.drain()  # its watcher consumer exists; no host of that manifest runs now
    await host_factory(STREAMS + function(), {"fn.py": HANDLER}, root=tmp_path / "main")

    theirs = await js.publish("other.b", b"theirs")  # outside their filter: stays in the stream
    ours = await js.publish("in.b", b"ours")
    await fake_advisory(nc, "OTHER", "other", theirs.seq)
    await fake_advisory(nc, "IN", "work", ours.seq)
    await wait_for(lambda: copies_of(js, ours.seq), message="our advisory handled")
    info = await watcher(js, "OTHER", "other")
    assert (info.num_pending, info.delivered.consumer_seq) == (1, 0), "theirs left untouched"

    await host_factory(other_text, {"fn.py": HANDLER}, root=tmp_path / "other")
    copy = (await wait_for(lambda: copies_of(js, theirs.seq, "OTHER"), message="theirs"))[0]
    assert copy.subject == "dlq.other"


# ---------------------------------------------------- faults (slow, processes)


@pytest.mark.nats
@pytest.mark.fault
@pytest.mark.slow
async def test_a_handler_that_kills_its_host_reaches_the_dlq_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """F3b: the host dies on every delivery of one payload; restarted each time, it
    dead-letters the message from the advisory after max_deliver deaths, once."""
    manifest = tmp_path / "fn.yaml"
    # One message at a time: a good message fetched beside the killer would die with the
    # host three times too, and rightly reach the DLQ on max_deliver.
    manifest.write_text(STREAMS + function(trigger=", ack_wait: 1s") + "    concurrency: 1\n")
    (tmp_path / "fn.py").write_text(textwrap.dedent(HANDLER))
    attempts_file = tmp_path / "attempts.txt"
    env = {**os.environ, "ATTEMPTS_FILE": str(attempts_file)}
    command = [sys.executable, "-m", "fnhost", "run", str(manifest), "--nats", nats_server.url]
    await js.add_stream(name="IN", subjects=["in.>"], duplicate_window=3600)
    ack = await js.publish("in.a", b"kill the host")
    good = await js.publish("in.a", b"good")

    async def settled(proc: asyncio.subprocess.Process) -> bool:
        return proc.returncode is not None or bool(await copies_of(js, ack.seq))

    deaths = 0
    with (tmp_path / "host.log").open("ab") as log:
        for _life in range(6):
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=tmp_path, env=env, stdout=log, stderr=log
            )
            try:
                await wait_for(
                    lambda proc=proc: settled(proc),
                    timeout=30,
                    message="the host died or dead-lettered the killer",
                )
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                await proc.wait()
            if proc.returncode == 137:
                deaths += 1
                continue
            assert proc.returncode == 0, (tmp_path / "host.log").read_text()
            break
    copies = await copies_of(js, ack.seq)
    assert deaths == 3
    assert attempts_file.read_text().split() == ["1", "2", "3"]
    assert len(copies) == 1
    headers = copies[0].headers or {}
    assert headers["Fnhost-Attempts"] == "3"
    assert headers["Fnhost-Error"].startswith("MaxDeliveries:")
    assert copies[0].data == b"kill the host"
    assert len(await dead_letters(js)) == 1
    assert await copies_of(js, good.seq) == []
    info = await js.consumer_info("IN", "work")
    print(f"F3b: deaths={deaths} attempts={attempts_file.read_text().split()} copies={len(copies)}")
    assert (info.num_pending, info.num_ack_pending) == (0, 0), "the good message was handled"


@pytest.mark.nats
@pytest.mark.slow
async def test_dlq_missing_past_the_publish_deadline_lands_via_the_advisory(
    host_factory, js: JetStreamContext
) -> None:
    """F3c end to end: the trigger gives up storing the copy (30 s) and naks; the message
    exhausts max_deliver; the watcher naks the advisory until the DLQ exists; then once."""
    host = await host_factory(STREAMS + function(max_deliver=1), {"fn.py": HANDLER})
    await js.delete_stream("DLQ")
    ack = await js.publish("in.a", b"reject me")

    async def advisory_retried() -> bool:
        return (await watcher(js)).num_redelivered >= 1

    await wait_for(advisory_retried, timeout=60, message="the advisory nak'ed while no DLQ")
    assert module_of(host).SEEN == [(b"reject me", 1)]
    manifest = host.manifest
    await provision.ensure_stream(js, provision.stream_config("DLQ", manifest.streams["DLQ"]))
    await wait_for(lambda: copies_of(js, ack.seq), timeout=30, message="stored via the advisory")
    await wait_for(lambda: _watcher_done(js, 1), timeout=30, message="advisory acked")
    copies = await copies_of(js, ack.seq)
    assert len(copies) == 1
    assert (copies[0].headers or {})["Fnhost-Error"].startswith("MaxDeliveries:")
