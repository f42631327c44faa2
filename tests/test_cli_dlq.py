"""``fnhost dlq`` (fnhost.cli_dlq) through typer's CliRunner, against a real nats-server.

Dead letters are stored the way the host stores them (``dlq.dead_letter_headers``
on a DLQ stream); the commands read them back with message gets, replay them to
their original subject and purge them.
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from rich.console import Console
from typer.testing import CliRunner

from fnhost import cli_dlq, dlq
from fnhost.cli import app
from fnhost_sdk.server import NatsServer

pytestmark = pytest.mark.nats

T = TypeVar("T")

MANIFEST = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"]}
  DLQ: {subjects: ["dlq.>"]}
functions:
  work:
    module: fn.py
    trigger: {stream: IN, subjects: [in.work], durable: work}
    dead_letter: dlq.work
  other:
    module: fn.py
    trigger: {stream: IN, subjects: [in.other], durable: other}
    dead_letter: dlq.other
  plain:
    module: fn.py
    trigger: {stream: IN, subjects: [in.plain], durable: plain}
"""


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables wide enough that no cell is wrapped or cut in the captured output."""
    monkeypatch.setattr(cli_dlq, "out", Console(width=250))
    monkeypatch.setattr(cli_dlq, "err", Console(width=250, stderr=True))


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    (tmp_path / "fn.py").write_text("async def handle(data: bytes) -> None: ...\n")
    path = tmp_path / "fn.yaml"
    path.write_text(MANIFEST)
    return path


def run_js(url: str, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    async def main() -> T:
        nc = await nats.connect(url)
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def store_dead_letters(url: str, letters: list[tuple[str, int, bytes, dict[str, str]]]) -> None:
    """Create IN and DLQ, then store (function, original seq, body, headers) dead letters."""

    async def work(js: JetStreamContext) -> None:
        await js.add_stream(name="IN", subjects=["in.>"])
        await js.add_stream(name="DLQ", subjects=["dlq.>"])
        for function, seq, body, original in letters:
            headers = dlq.dead_letter_headers(
                original,
                subject=f"in.{function}",
                function=function,
                stream="IN",
                sequence=seq,
                stored_at_us=1_764_000_000_000_000 + seq,
                attempts=3,
                error="ValueError: cannot digest",
            )
            await js.publish(f"dlq.{function}", body, headers=headers)

    run_js(url, work)


def stream_messages(url: str, stream: str) -> list[RawStreamMsg]:
    async def work(js: JetStreamContext) -> list[RawStreamMsg]:
        state = (await js.stream_info(stream)).state
        found = []
        for seq in range(max(state.first_seq, 1), state.last_seq + 1):  # 0: never stored
            try:
                found.append(await js.get_msg(stream, seq))
            except nats.js.errors.NotFoundError:
                continue  # deleted
        return found

    return run_js(url, work)


def dlq_cli(manifest: Path, url: str, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    command = ["dlq", *args, "--manifest", str(manifest), "--nats", url]
    return CliRunner().invoke(app, command, input=input)


LETTERS = [
    ("work", 7, b'{"order": 1}', {"X-Trace": "t1", "Nats-Msg-Id": "order-1"}),
    ("other", 8, b"not json \xff", {}),
    ("work", 9, b'{"order": 2}', {"X-Trace": "t2"}),
]


def test_ls_lists_every_dead_letter_with_its_columns(
    manifest: Path, nats_server: NatsServer
) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    result = dlq_cli(manifest, nats_server.url, "ls")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "ValueError: cannot digest" in line]
    assert len(rows) == 3
    first = rows[0].split("│")
    assert [cell.strip() for cell in first[1:6]] == [
        "1",
        "work",
        "in.work",
        "3",
        "ValueError: cannot digest",
    ]
    assert first[6].strip().endswith("s")  # age, e.g. "1s"
    for header in ("seq", "function", "original subject", "attempts", "error", "age"):
        assert header in result.output
    assert "3 shown" in result.output


def test_ls_filters_by_function_and_says_when_empty(
    manifest: Path, nats_server: NatsServer
) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    result = dlq_cli(manifest, nats_server.url, "ls", "--function", "other")
    assert result.exit_code == 0, result.output
    assert "1 shown" in result.output
    assert " in.other " in result.output and " in.work " not in result.output

    run_js(nats_server.url, lambda js: js.purge_stream("DLQ"))
    result = dlq_cli(manifest, nats_server.url, "ls")
    assert result.exit_code == 0
    assert "no dead letters" in result.output


def test_show_prints_headers_and_the_body(manifest: Path, nats_server: NatsServer) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    result = dlq_cli(manifest, nats_server.url, "show", "1")
    assert result.exit_code == 0, result.output
    for text in (
        "Fnhost-Original-Subject",
        "in.work",
        "Fnhost-Stream-Seq",
        "Fnhost-Original-Msg-Id",
        "order-1",
        "X-Trace",
        '"order": 1',
    ):
        assert text in result.output, text
    binary = dlq_cli(manifest, nats_server.url, "show", "2")
    assert binary.exit_code == 0, binary.output
    assert "not json" in binary.output

    for seq in ("99", "0"):
        missing = dlq_cli(manifest, nats_server.url, "show", seq)
        assert missing.exit_code == 1, missing.output
        assert f"no dead letter {seq} in stream DLQ" in missing.output
        assert "Traceback" not in missing.output and "BadRequest" not in missing.output


def test_replay_one_sends_it_back_to_its_original_subject_and_removes_it(
    manifest: Path, nats_server: NatsServer
) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    result = dlq_cli(manifest, nats_server.url, "replay", "1")
    assert result.exit_code == 0, result.output
    assert "replayed 1 dead letter(s)" in result.output

    (replayed,) = stream_messages(nats_server.url, "IN")
    assert replayed.subject == "in.work"
    assert replayed.data == b'{"order": 1}'
    assert dict(replayed.headers or {}) == {
        "X-Trace": "t1",
        "Nats-Msg-Id": "order-1:replay:1",
        "Fnhost-Replayed": "DLQ:1",
        "Nats-Expected-Stream": "IN",  # only the original stream may store it
    }
    assert [m.seq for m in stream_messages(nats_server.url, "DLQ")] == [2, 3]

    again = dlq_cli(manifest, nats_server.url, "replay", "1")
    assert again.exit_code == 1
    assert "no dead letter 1 in stream DLQ" in again.output


def test_replay_a_function_or_all_asks_first(manifest: Path, nats_server: NatsServer) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    refused = dlq_cli(manifest, nats_server.url, "replay", "--function", "work", input="n\n")
    assert refused.exit_code == 1
    assert "Replay 2 dead letter(s)?" in refused.output
    assert len(stream_messages(nats_server.url, "DLQ")) == 3

    result = dlq_cli(manifest, nats_server.url, "replay", "--function", "work", "--yes")
    assert result.exit_code == 0, result.output
    assert "replayed 2 dead letter(s)" in result.output
    back = stream_messages(nats_server.url, "IN")
    assert [(m.subject, m.data) for m in back] == [
        ("in.work", b'{"order": 1}'),
        ("in.work", b'{"order": 2}'),
    ]
    # Without an original id, the replay's id comes from the original stream and sequence.
    assert (back[1].headers or {})["Nats-Msg-Id"] == "IN:9:replay:3"

    rest = dlq_cli(manifest, nats_server.url, "replay", "--all", input="y\n")
    assert rest.exit_code == 0, rest.output
    assert "replayed 1 dead letter(s)" in rest.output
    assert stream_messages(nats_server.url, "DLQ") == []
    assert [m.subject for m in stream_messages(nats_server.url, "IN")][-1] == "in.other"


def test_replay_needs_exactly_one_selection(manifest: Path, nats_server: NatsServer) -> None:
    """A usage error: exit 2 with the usage line, as click's own (docs/cli.md)."""
    for args in ((), ("1", "--all"), ("--function", "work", "--all")):
        result = dlq_cli(manifest, nats_server.url, "replay", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "give exactly one of SEQ, --function NAME or --all" in result.output
        assert "Usage:" in result.output


def test_several_dlq_streams_need_stream_for_a_seq(manifest: Path, nats_server: NatsServer) -> None:
    manifest.write_text(TWO_DLQS)
    for command in ("show", "replay"):
        result = dlq_cli(manifest, nats_server.url, command, "1")
        assert result.exit_code == 2, (command, result.output)
        assert "several DLQ streams (DLQ_A, DLQ_B): pass --stream" in result.output


def test_purge_one_function_or_everything(manifest: Path, nats_server: NatsServer) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    kept = dlq_cli(manifest, nats_server.url, "purge", "--function", "work", input="n\n")
    assert kept.exit_code == 1
    assert "Delete 2 dead letter(s) from DLQ? There is no undo" in kept.output
    assert len(stream_messages(nats_server.url, "DLQ")) == 3

    result = dlq_cli(manifest, nats_server.url, "purge", "--function", "work", "--yes")
    assert result.exit_code == 0, result.output
    assert "purged 2 dead letter(s)" in result.output
    assert [m.subject for m in stream_messages(nats_server.url, "DLQ")] == ["dlq.other"]

    everything = dlq_cli(manifest, nats_server.url, "purge", "--yes")
    assert everything.exit_code == 0, everything.output
    assert "purged 1 dead letter(s)" in everything.output
    assert stream_messages(nats_server.url, "DLQ") == []


def test_user_errors_are_one_line_without_a_traceback(
    manifest: Path, nats_server: NatsServer
) -> None:
    cases = [
        (("ls", "--function", "nope"), "no function 'nope' in"),
        (("ls", "--function", "plain"), "function 'plain' has no dead_letter"),
        (("ls",), "not found on the server"),  # the DLQ stream does not exist yet
    ]
    for args, message in cases:
        result = dlq_cli(manifest, nats_server.url, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output

    unreachable = dlq_cli(manifest, "nats://127.0.0.1:1", "ls")
    assert unreachable.exit_code == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1: " in unreachable.output
    assert "Traceback" not in unreachable.output


def test_dlq_is_a_subcommand_of_fnhost() -> None:
    result = CliRunner().invoke(app, ["dlq", "--help"])
    assert result.exit_code == 0
    for command in ("ls", "show", "replay", "purge"):
        assert command in result.output


def test_replay_keeps_a_letter_another_stream_than_its_original_stored(
    manifest: Path, nats_server: NatsServer
) -> None:
    """IN was removed and OTHER now captures in.work: the replay is refused, the letter kept."""
    store_dead_letters(nats_server.url, LETTERS)

    async def swap(js: JetStreamContext) -> None:
        await js.delete_stream("IN")
        await js.add_stream(name="OTHER", subjects=["in.>"])

    run_js(nats_server.url, swap)
    result = dlq_cli(manifest, nats_server.url, "replay", "1")
    assert result.exit_code == 1, result.output
    assert "not replayed" in result.output
    assert "stream OTHER captures 'in.work' now, not the original stream IN" in result.output
    assert "replayed 0 dead letter(s), 1 failed" in result.output
    assert stream_messages(nats_server.url, "OTHER") == []
    assert [m.seq for m in stream_messages(nats_server.url, "DLQ")] == [1, 2, 3]


def raw_headers(raw: RawStreamMsg) -> dict[str, str]:
    """A message get's headers read from its raw header block as UTF-8 (nats-py's own
    parse turns non-ASCII into U+FFFD)."""
    block = base64.b64decode(raw.hdrs or "").decode()
    pairs = [line.split(":", 1) for line in block.split("\r\n")[1:] if line]  # past NATS/1.0
    return {name.strip(): value.strip() for name, value in pairs}


def test_non_ascii_headers_survive_ls_show_and_replay(
    manifest: Path, nats_server: NatsServer
) -> None:
    async def work(js: JetStreamContext) -> None:
        await js.add_stream(name="IN", subjects=["in.>"])
        await js.add_stream(name="DLQ", subjects=["dlq.>"])
        headers = dlq.dead_letter_headers(
            {"X-Note": "café ☕"},
            subject="in.work",
            function="work",
            stream="IN",
            sequence=4,
            stored_at_us=1_764_000_000_000_004,
            attempts=1,
            error="ValueError: grüß",
        )
        await js.publish("dlq.work", b"{}", headers=headers)

    run_js(nats_server.url, work)
    listed = dlq_cli(manifest, nats_server.url, "ls")
    assert listed.exit_code == 0, listed.output
    assert "ValueError: grüß" in listed.output
    shown = dlq_cli(manifest, nats_server.url, "show", "1")
    assert shown.exit_code == 0, shown.output
    assert "ValueError: grüß" in shown.output and "café ☕" in shown.output
    assert "\ufffd" not in listed.output + shown.output

    replayed = dlq_cli(manifest, nats_server.url, "replay", "1")
    assert replayed.exit_code == 0, replayed.output
    (back,) = stream_messages(nats_server.url, "IN")
    assert raw_headers(back)["X-Note"] == "café ☕"


class CoreSubscriber:
    """A plain (non-stream) subscriber on ``subject``, on its own thread and event loop
    (CliRunner blocks the test's thread); ``received`` lists what it got."""

    def __init__(self, url: str, subject: str) -> None:
        self.received: list[bytes] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._run(url, subject),)
        )
        self._thread.start()
        assert self._ready.wait(10), "subscriber not ready"

    async def _run(self, url: str, subject: str) -> None:
        nc = await nats.connect(url)

        async def got(msg: Msg) -> None:
            self.received.append(msg.data)

        await nc.subscribe(subject, cb=got)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.drain()

    def close(self) -> list[bytes]:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()
        return self.received


def test_replay_to_a_subject_no_stream_captures_is_refused_before_publishing(
    manifest: Path, nats_server: NatsServer
) -> None:
    store_dead_letters(nats_server.url, LETTERS)
    run_js(nats_server.url, lambda js: js.delete_stream("IN"))
    listener = CoreSubscriber(nats_server.url, "in.>")
    try:
        result = dlq_cli(manifest, nats_server.url, "replay", "1")
    finally:
        received = listener.close()
    assert result.exit_code == 1, result.output
    assert "no stream captures 'in.work'" in result.output
    assert "replayed 0 dead letter(s), 1 failed" in result.output
    assert received == []  # not published at all: no copy to core subscribers
    assert [m.seq for m in stream_messages(nats_server.url, "DLQ")] == [1, 2, 3]


TWO_DLQS = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"]}
  DLQ_A: {subjects: ["dlqa.>"]}
  DLQ_B: {subjects: ["dlqb.>"]}
functions:
  work:
    module: fn.py
    trigger: {stream: IN, subjects: [in.work], durable: work}
    dead_letter: dlqa.work
  other:
    module: fn.py
    trigger: {stream: IN, subjects: [in.other], durable: other}
    dead_letter: dlqb.other
"""


def test_ls_is_oldest_first_across_dlq_streams_and_the_limit_keeps_the_oldest(
    manifest: Path, nats_server: NatsServer
) -> None:
    manifest.write_text(TWO_DLQS)

    async def work(js: JetStreamContext) -> None:
        await js.add_stream(name="DLQ_A", subjects=["dlqa.>"])
        await js.add_stream(name="DLQ_B", subjects=["dlqb.>"])
        # Stored in turn: A1 B1 A2 B2 A3 (each publish waits for its PubAck).
        for n, (function, subject) in enumerate(
            [("work", "dlqa.work"), ("other", "dlqb.other")] * 2 + [("work", "dlqa.work")]
        ):
            headers = dlq.dead_letter_headers(
                {},
                subject=f"in.{function}",
                function=function,
                stream="IN",
                sequence=n + 1,
                stored_at_us=None,
                attempts=1,
                error=f"ValueError: letter {n}",
            )
            await js.publish(subject, b"{}", headers=headers)

    run_js(nats_server.url, work)

    def listed(*args: str) -> list[str]:
        result = dlq_cli(manifest, nats_server.url, "ls", *args)
        assert result.exit_code == 0, result.output
        return re.findall(r"letter \d", result.output)

    assert listed() == [f"letter {n}" for n in range(5)]
    three = dlq_cli(manifest, nats_server.url, "ls", "-n", "3")
    assert re.findall(r"letter \d", three.output) == ["letter 0", "letter 1", "letter 2"]
    assert "3 shown (--limit reached: there are more)" in three.output
    assert "5 shown" in dlq_cli(manifest, nats_server.url, "ls", "-n", "5").output
    assert "limit" not in dlq_cli(manifest, nats_server.url, "ls", "-n", "5").output


def test_purge_checks_every_dlq_stream_first_and_names_a_missing_one(
    manifest: Path, nats_server: NatsServer
) -> None:
    manifest.write_text(TWO_DLQS)

    async def work(js: JetStreamContext) -> None:
        await js.add_stream(name="DLQ_A", subjects=["dlqa.>"])  # DLQ_B is missing
        await js.publish("dlqa.work", b"{}", headers={"Fnhost-Function": "work"})

    run_js(nats_server.url, work)
    for args in (("purge", "--yes"), ("ls",), ("replay", "--all", "--yes")):
        result = dlq_cli(manifest, nats_server.url, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "dead-letter stream 'DLQ_B' not found on the server" in result.output, args
        assert "Traceback" not in result.output
    assert len(stream_messages(nats_server.url, "DLQ_A")) == 1  # nothing purged
