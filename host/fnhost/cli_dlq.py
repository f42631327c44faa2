"""``fnhost dlq``: list, show, replay and purge dead letters.

The DLQ streams are the streams that capture a ``dead_letter`` subject of the
manifest's functions; only messages on those subjects count, so manifests may
share one ``DLQ: {subjects: [dlq.>]}`` stream. Messages are read with message
gets, which move no consumer and ack nothing. NATS is found like ``fnhost
invoke`` finds it: ``--nats``, ``NATS_URL``, the manifest, the embedded server.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import nats
import nats.errors
import typer
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.json import JSON
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from fnhost import dlq
from fnhost.connection import ConnectError, connect_briefly
from fnhost.durations import format_duration
from fnhost.errors import ManifestError
from fnhost.manifest import Manifest, NatsConfig, load_manifest
from fnhost_sdk import headers as h
from fnhost_sdk.session import PublishError, Session

T = TypeVar("T")

REPLAY_DEADLINE = 10.0
"""Seconds one replay publish retries before it counts as failed (the letter stays)."""

dlq_app = typer.Typer(
    name="dlq",
    help="Inspect, replay and purge dead letters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ManifestOption = Annotated[
    Path,
    typer.Option(
        "--manifest", "-m", help="The manifest: its functions' dead_letter subjects name the DLQs."
    ),
]
NatsOption = Annotated[
    str | None,
    typer.Option("--nats", help="NATS URL(s), comma separated; overrides nats.url and NATS_URL."),
]
FunctionOption = Annotated[
    str | None, typer.Option("--function", "-f", help="Only this function's dead letters.")
]
StreamOption = Annotated[
    str | None,
    typer.Option("--stream", help="The DLQ stream of SEQ (needed when there are several)."),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


class UsageError(typer.BadParameter):
    """Arguments that do not go together: the usage line and exit 2, like click's own
    usage errors (``_fail`` is for user errors, exit 1).

    A ``typer.BadParameter`` because that is the usage error every typer exposes:
    recent ones vendor click, so a ``click.UsageError`` from the click package is
    no error of theirs (a traceback, exit 1).
    """

    def format_message(self) -> str:
        return self.message  # not "Invalid value: ..."


@dataclass(frozen=True)
class _Scope:
    """What a command looks at: DLQ stream -> dead-letter subjects, and where NATS is."""

    url: str
    nats: NatsConfig
    streams: dict[str, set[str]]
    function: str | None

    def single_stream(self) -> tuple[str, set[str]]:
        if len(self.streams) > 1:
            raise UsageError(
                f"several DLQ streams ({', '.join(sorted(self.streams))}): pass --stream"
            )
        return next(iter(self.streams.items()))


def dead_letter_streams(manifest: Manifest) -> dict[str, set[str]]:
    """DLQ stream -> the dead-letter subjects of the manifest's functions it captures."""
    streams: dict[str, set[str]] = {}
    for spec in manifest.functions.values():
        if spec.dead_letter and (stream := manifest.stream_for_subject(spec.dead_letter)):
            streams.setdefault(stream, set()).add(spec.dead_letter)
    return streams


def _load(path: Path) -> Manifest:
    if not path.is_file():
        raise _fail(f"{path} not found: fnhost dlq needs the manifest (--manifest)")
    try:
        return load_manifest(path)
    except ManifestError as exc:
        for issue in exc.issues:
            err.print(f"[red]error:[/red] {issue}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _scope(
    path: Path, nats_url: str | None, function: str | None = None, stream: str | None = None
) -> _Scope:
    from fnhost.cli import client_url  # fnhost.cli imports this module: import it late

    manifest = _load(path)
    streams = dead_letter_streams(manifest)
    if function is not None:
        spec = manifest.functions.get(function)
        if spec is None:
            raise _fail(f"no function {function!r} in {path}")
        if spec.dead_letter is None:
            raise _fail(f"function {function!r} has no dead_letter")
        owner = manifest.stream_for_subject(spec.dead_letter)
        streams = {owner: {spec.dead_letter}} if owner else {}
    if stream is not None:
        if stream not in streams:
            known = ", ".join(sorted(streams)) or "none"
            raise _fail(f"{stream!r} is not a DLQ stream of {path} (DLQ streams: {known})")
        streams = {stream: streams[stream]}
    if not streams:
        raise _fail(f"no function in {path} has a dead_letter")
    return _Scope(client_url(nats_url, path), manifest.nats, streams, function)


def _run(scope: _Scope, work: Callable[[Session], Awaitable[T]]) -> T:
    async def main() -> T:
        nc = await connect_briefly(scope.url, scope.nats)
        try:
            session = Session(nc, publish_deadline=REPLAY_DEADLINE)
            await _check_streams(session.js, scope)
            return await work(session)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except ConnectError as exc:
        raise _fail(str(exc)) from None
    except NotFoundError as exc:
        raise _fail(f"not found on the server: {exc.description}") from None
    except (OSError, nats.errors.Error) as exc:
        raise _fail(f"NATS at {scope.url}: {exc}") from None


_NEVER = datetime.min.replace(tzinfo=UTC)


async def _check_streams(js: JetStreamContext, scope: _Scope) -> None:
    """Every DLQ stream of the scope exists, before a command reads or deletes anything
    (a purge must not delete from some and then stop at a missing one)."""
    for stream in sorted(scope.streams):
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise _fail(
                f"dead-letter stream {stream!r} not found on the server "
                "(a host creates it when it starts with this manifest): nothing done"
            ) from None


async def _collect(
    js: JetStreamContext, scope: _Scope, limit: int | None = None
) -> list[dlq.DeadLetterRecord]:
    """The scope's dead letters, oldest first across its DLQ streams (by stored time);
    the ``limit`` oldest when given."""
    per_stream: list[list[dlq.DeadLetterRecord]] = []
    for stream, subjects in scope.streams.items():
        records: list[dlq.DeadLetterRecord] = []
        async for record in dlq.iter_dead_letters(js, stream, subjects, scope.function):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break  # the rest of this stream is newer
        per_stream.append(records)
    # Each stream's list is in sequence order: merging keeps it, whatever the clock did.
    merged = heapq.merge(*per_stream, key=lambda record: record.time or _NEVER)
    return list(itertools.islice(merged, limit))


async def _get(js: JetStreamContext, scope: _Scope, seq: int) -> dlq.DeadLetterRecord:
    stream, subjects = scope.single_stream()
    missing = f"no dead letter {seq} in stream {stream}"
    if seq < 1:  # a message get for 0 is a bad request
        raise _fail(f"{missing}: sequences start at 1")
    try:
        record = dlq.DeadLetterRecord.from_raw(stream, await js.get_msg(stream, seq))
    except NotFoundError:
        raise _fail(missing) from None
    if record.subject not in subjects:
        raise _fail(f"{stream}/{seq} is on {record.subject!r}, not a dead-letter subject here")
    return record


def _age(record: dlq.DeadLetterRecord) -> str:
    if record.time is None:
        return "?"
    return format_duration(max(1, int((datetime.now(UTC) - record.time).total_seconds())))


@dlq_app.command("ls")
def list_dead_letters(
    function: FunctionOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 50,
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
) -> None:
    """List dead letters, oldest first."""
    scope = _scope(manifest, nats_url, function)
    # One more than shown tells whether there are more.
    records = _run(scope, lambda session: _collect(session.js, scope, limit + 1))
    more = len(records) > limit
    records = records[:limit]
    if not records:
        out.print("no dead letters")
        return
    table = Table("seq", title=f"dead letters in {', '.join(sorted(scope.streams))}")
    several = len(scope.streams) > 1
    if several:
        table.add_column("stream")
    for column in ("function", "original subject", "attempts"):
        table.add_column(column)
    table.add_column("error", overflow="fold")
    table.add_column("age", justify="right")
    for r in records:
        cells = [str(r.seq), *([r.stream] if several else [])]
        cells += [r.header(h.FUNCTION), r.header(h.ORIGINAL_SUBJECT), r.header(h.ATTEMPTS)]
        cells += [r.header(h.ERROR), _age(r)]
        table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    note = " (--limit reached: there are more)" if more else ""
    out.print(f"{len(records)} shown{note}")


@dlq_app.command()
def show(
    seq: Annotated[int, typer.Argument(help="The dead letter's sequence in its DLQ stream.")],
    stream: StreamOption = None,
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
) -> None:
    """Show one dead letter: its headers, then its body (pretty JSON when it parses)."""
    scope = _scope(manifest, nats_url, stream=stream)
    scope.single_stream()  # before connecting: a usage error
    record = _run(scope, lambda session: _get(session.js, scope, seq))
    table = Table("header", "value", title=f"{record.stream}/{record.seq} on {record.subject}")
    for key, value in record.headers.items():
        table.add_row(Text(key), Text(value))
    out.print(table)
    try:
        out.print(JSON.from_data(json.loads(record.data)))
    except ValueError:
        text = record.data.decode(errors="replace")
        out.print(Text(text) if text else Text("(empty body)", style="dim"))


@dlq_app.command()
def replay(
    seq: Annotated[int | None, typer.Argument(help="One dead letter's DLQ sequence.")] = None,
    function: FunctionOption = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter of the manifest.")] = False,
    yes: YesOption = False,
    stream: StreamOption = None,
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
) -> None:
    """Publish dead letters back to their original subject, then delete them from the DLQ.

    Each keeps its body and original headers, gains Fnhost-Replayed and a new
    Nats-Msg-Id, and is deleted only after the original stream stored it.
    """
    if (seq is not None) + (function is not None) + all_ != 1:
        raise UsageError("give exactly one of SEQ, --function NAME or --all")
    scope = _scope(manifest, nats_url, function, stream)
    if seq is not None:
        scope.single_stream()  # before connecting: a usage error

    async def work(session: Session) -> tuple[int, list[str]]:
        if seq is not None:
            records = [await _get(session.js, scope, seq)]
        else:
            records = await _collect(session.js, scope)
            if records and not yes:
                typer.confirm(f"Replay {len(records)} dead letter(s)?", abort=True)
        failures: list[str] = []
        with Progress(console=out, disable=len(records) < 2) as progress:
            task = progress.add_task("replaying", total=len(records))
            for record in records:
                try:
                    await dlq.replay(session, record)
                except (dlq.ReplayError, PublishError, nats.errors.Error) as exc:
                    failures.append(f"{record.stream}/{record.seq}: {exc}")
                progress.advance(task)
        return len(records) - len(failures), failures

    replayed, failures = _run(scope, work)
    for failure in failures:
        err.print(f"[red]not replayed[/red] {failure}", highlight=False, soft_wrap=True)
    out.print(
        f"replayed {replayed} dead letter(s)" + (f", {len(failures)} failed" if failures else "")
    )
    if failures:
        raise typer.Exit(1)


@dlq_app.command()
def purge(
    function: FunctionOption = None,
    yes: YesOption = False,
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
) -> None:
    """Delete the manifest's dead letters (or one function's) for good."""
    scope = _scope(manifest, nats_url, function)

    async def work(session: Session) -> int:
        js = session.js
        if not yes:
            count = len(await _collect(js, scope))
            if not count:
                return 0
            where = ", ".join(sorted(scope.streams))
            typer.confirm(
                f"Delete {count} dead letter(s) from {where}? There is no undo", abort=True
            )
        purged = 0
        for stream, subjects in scope.streams.items():
            purged += await dlq.purge(js, stream, subjects, scope.function)
        return purged

    out.print(f"purged {_run(scope, work)} dead letter(s)")
