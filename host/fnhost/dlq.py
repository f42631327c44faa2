"""Dead letters: the copy's headers, the max-deliveries advisory watcher, and the
read / replay / purge helpers behind ``fnhost dlq``. User guides: docs/delivery.md
(dead letters, the advisory path) and docs/cli.md (``fnhost dlq``).

A stream message is dead-lettered on one of two paths, and both store the same
copy under the same ``Nats-Msg-Id`` (``dlq:<stream>:<seq>:<stored_at_us>``), so
when both happen the DLQ stream's duplicate window keeps one:

1. The stream trigger: ``Reject``, an undecodable payload or the last allowed
   attempt -> copy, then term (:mod:`fnhost.triggers.stream`).
2. The advisory watcher (this module): a message that reached ``max_deliver``
   without being settled (the host died during the last attempt, or the
   trigger could not store the copy and nak'ed) makes JetStream publish
   ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``.
   Advisories are core NATS (at-most-once), so the stream ``FNHOST_ADVISORIES``
   stores them even while no host runs; the watcher fetches the original by
   sequence, stores the copy, and acks the advisory only after the PubAck.

Who processes which advisory: one durable consumer per watched function
consumer (:func:`watcher_consumer_name`), filtered on exactly that consumer's
advisory subject. Every host whose manifest dead-letters that function shares
it (one host handles each advisory), and a host never sees, let alone acks, the
advisories of another manifest's functions on the same server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RawStreamMsg,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from fnhost.manifest import FunctionSpec, Manifest
from fnhost.tasks import cancel_and_wait
from fnhost_sdk import headers as h
from fnhost_sdk.session import PublishError, Session

log = logging.getLogger("fnhost.dlq")

ORIGINAL_MSG_ID = "Fnhost-Original-Msg-Id"
"""The original ``Nats-Msg-Id``: the copy needs its own id for dedup, and replay derives from it."""

ADVISORY_STREAM = "FNHOST_ADVISORIES"
ADVISORY_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ADVISORY_MAX_AGE = 7 * 86400.0
"""Seconds an advisory waits for a host: a week of downtime before a crash's message is lost."""

ADVISORY_ACK_WAIT = 60.0
"""Well above one advisory's work: a message get plus a publish with its deadline."""

ADVISORY_PUBLISH_DEADLINE = 5.0
"""Seconds the watcher retries one dead-letter publish. Short, because the advisory
itself is stored: a nak with back-off retries it without holding up the others."""

ADVISORY_RETRY = (1.0, 60.0)
"""First and longest nak delay of an advisory that could not be handled (doubling)."""

FETCH_WAIT = 5.0
"""Seconds one pull for advisories waits on the server."""

NO_MESSAGE_FOUND = 10037
"""JetStream's error code for a message get past the last match (vs. a missing stream)."""

EXPECTED_STREAM = "Nats-Expected-Stream"
"""A publish header JetStream checks: a stream of another name refuses the message."""

WRONG_STREAM = 10060
"""JetStream's error code for a publish whose ``Nats-Expected-Stream`` is not the storing stream."""

# Directives to JetStream on the original publish, not message content. On the
# copy they would act on the DLQ stream: ``Nats-Rollup`` would purge every
# earlier dead letter, ``Nats-Expected-*`` would make the copy fail forever,
# ``Nats-TTL`` would expire it. ``Nats-Msg-Id`` is kept as ORIGINAL_MSG_ID.
_DIRECTIVES = frozenset({"nats-msg-id", "nats-rollup", "nats-ttl"})
_DIRECTIVE_PREFIXES = ("nats-expected-", "nats-schedule")


def dead_letter_id(stream: str, sequence: int | None, stored_at_us: int | None) -> str:
    """The message id of a stream message's dead-letter copy: one per message, dedup-safe.

    The storage time (µs since the epoch, what a JetStream message get gives
    nats-py) tells apart two messages with one sequence, in a stream deleted and
    created again: without it the second's copy would be dropped as a duplicate
    of the first's, and the original termed, lost.
    """
    return f"dlq:{stream}:{sequence}:{stored_at_us}"


def microseconds_since_epoch(moment: datetime) -> int:
    """``moment`` (timezone-aware) in whole µs since the epoch, exactly (no float)."""
    return (moment - _EPOCH) // _MICROSECOND


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _is_directive(name: str) -> bool:
    lower = name.lower()
    return lower in _DIRECTIVES or lower.startswith(_DIRECTIVE_PREFIXES)


def dead_letter_headers(
    original: Mapping[str, str] | None,
    *,
    subject: str,
    function: str,
    stream: str,
    sequence: int | None,
    stored_at_us: int | None,
    attempts: int,
    error: str,
) -> dict[str, str]:
    """The headers of a dead-letter copy: the original's, plus the ``Fnhost-*`` ones.

    ``error`` is ``"<type>: <reason>"`` on one line (header values cannot hold breaks).
    """
    headers = {k: v for k, v in (original or {}).items() if not _is_directive(k)}
    if original and (message_id := original.get(h.MSG_ID)):
        headers[ORIGINAL_MSG_ID] = message_id
    headers[h.ORIGINAL_SUBJECT] = subject
    headers[h.FUNCTION] = function
    headers[h.STREAM] = stream
    headers[h.STREAM_SEQ] = str(sequence)
    headers[h.ATTEMPTS] = str(attempts)
    headers[h.ERROR] = error
    headers[h.MSG_ID] = dead_letter_id(stream, sequence, stored_at_us)
    return headers


# --- the max-deliveries advisory watcher --------------------------------------


def advisory_subject(stream: str, consumer: str) -> str:
    return f"{ADVISORY_PREFIX}.{stream}.{consumer}"


def watcher_consumer_name(stream: str, consumer: str) -> str:
    """``fnhost-dlq-<stream>-<consumer>-<hash>``: readable, and the hash keeps
    ``A-B``/``C`` and ``A``/``B-C`` apart."""
    digest = hashlib.sha256(f"{stream}.{consumer}".encode()).hexdigest()[:8]
    return f"fnhost-dlq-{stream}-{consumer}-{digest}"


async def ensure_advisory_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """Create ``FNHOST_ADVISORIES`` if missing; raise its replicas to ``replicas``, never lower
    (hosts of several manifests share it)."""
    try:
        info = await js.stream_info(ADVISORY_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=ADVISORY_STREAM,
                subjects=[f"{ADVISORY_PREFIX}.>"],
                storage=StorageType.FILE,
                max_age=ADVISORY_MAX_AGE,
                num_replicas=replicas,
            )
        )
        log.info("created stream %s for max-deliveries advisories", ADVISORY_STREAM)
        return
    if (info.config.num_replicas or 1) < replicas:
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
        log.info("stream %s: replicas raised to %d", ADVISORY_STREAM, replicas)


def watcher_consumer_config(stream: str, consumer: str) -> ConsumerConfig:
    """The shared durable that delivers one function consumer's advisories.

    ``max_deliver`` is unlimited: an advisory is given up only by an ack, never
    by the server. No ``inactive_threshold``: a re-created consumer would
    deliver every stored advisory again, including handled ones.
    """
    name = watcher_consumer_name(stream, consumer)
    return ConsumerConfig(
        name=name,
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ADVISORY_ACK_WAIT,
        max_deliver=-1,
        max_ack_pending=256,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=advisory_subject(stream, consumer),
    )


@dataclass(frozen=True, slots=True)
class _Target:
    """A stream function with a ``dead_letter``: its consumer's advisories are ours."""

    function: str
    stream: str
    consumer: str
    dead_letter: str


def _targets(functions: Iterable[FunctionSpec]) -> dict[tuple[str, str], _Target]:
    return {
        (spec.trigger.stream, spec.trigger.durable_name): _Target(
            spec.name, spec.trigger.stream, spec.trigger.durable_name, spec.dead_letter
        )
        for spec in functions
        if spec.trigger.stream and spec.trigger.durable_name and spec.dead_letter
    }


class AdvisoryWatcher:
    """Copies messages that hit ``max_deliver`` unsettled to their function's dead letter.

    :meth:`sync` says which functions run; the watcher follows them as a reload
    or a deploy adds, changes and removes functions, one task per watched
    function consumer. A changed dead letter keeps the task: each advisory is
    copied to the dead letter its function has when the advisory arrives
    (restarting the task would strand an advisory on its pull request until
    the advisory's ack wait).
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        on_dead_lettered: Callable[[str], None] | None = None,
    ) -> None:
        self._on_dead_lettered = on_dead_lettered
        self._session = Session(nc, publish_deadline=ADVISORY_PUBLISH_DEADLINE)
        self._js = self._session.js
        self._targets: dict[tuple[str, str], _Target] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def sync(self, manifest: Manifest, functions: Iterable[FunctionSpec]) -> None:
        """Watch the advisories of exactly ``functions`` (those with a ``dead_letter``).

        A function consumer no longer among them stops being watched; one new
        to the watcher has the advisory stream and its watcher consumer
        provisioned first (before its trigger can use up a delivery, when
        called before the trigger starts). A provisioning failure is logged,
        not raised: the host still serves, and the new tasks keep trying.
        """
        wanted = _targets(functions)
        gone = [key for key in self._tasks if key not in wanted]
        await cancel_and_wait([self._tasks.pop(key) for key in gone])
        new = [target for key, target in wanted.items() if key not in self._tasks]
        self._targets = wanted
        if not new:
            return
        # As durable as the dead letters it protects.
        dlq_streams = {manifest.stream_for_subject(t.dead_letter) for t in wanted.values()}
        replicas = max(
            (manifest.streams[s].replicas for s in dlq_streams if s in manifest.streams), default=1
        )
        provisioned = True
        for target in new:
            try:
                await self._provision(target, replicas)
            except nats.errors.Error as exc:
                log.error("max-deliveries advisories not watched yet (will retry): %s", exc)
                provisioned = False
                break
        loop = asyncio.get_running_loop()
        for target in new:
            self._tasks[(target.stream, target.consumer)] = loop.create_task(
                self._watch(target, provisioned, replicas), name=f"fnhost-dlq-{target.function}"
            )

    async def stop(self) -> None:
        """Stop watching. An advisory cut off mid-way is redelivered; its copy dedups."""
        tasks, self._tasks = self._tasks, {}
        await cancel_and_wait(tasks.values())

    async def _provision(self, target: _Target, replicas: int) -> None:
        await ensure_advisory_stream(self._js, replicas)
        config = watcher_consumer_config(target.stream, target.consumer)
        await self._js.add_consumer(ADVISORY_STREAM, config)

    async def _watch(self, target: _Target, provisioned: bool, replicas: int) -> None:
        name = watcher_consumer_name(target.stream, target.consumer)
        sub: JetStreamContext.PullSubscription | None = None
        try:
            while True:
                try:
                    if not provisioned:
                        await self._provision(target, replicas)
                        provisioned = True
                    if sub is None:
                        sub = await self._js.pull_subscribe_bind(name, ADVISORY_STREAM)
                    # One at a time: nats-py holds a batch's first message until the batch fills.
                    msgs = await sub.fetch(1, timeout=FETCH_WAIT)
                except nats.errors.TimeoutError:
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:
                    # Deleted consumer or stream, lost server...: re-provision after a real pause.
                    log.warning("watching advisories for %s: %s", target.function, exc)
                    if sub is not None:
                        with contextlib.suppress(nats.errors.Error):
                            await sub.unsubscribe()
                        sub = None
                    provisioned = False
                    await asyncio.sleep(ADVISORY_RETRY[0])
                    continue
                for msg in msgs:
                    await self.handle(self._targets[(target.stream, target.consumer)], msg)
        finally:
            # Cancelled (stop, reload) mid-fetch, nats-py may have taken the answer off
            # the subscription's queue without marking it done; a subscription left
            # behind would then hold the connection's drain to its timeout.
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def handle(self, target: _Target, msg: Msg) -> None:
        """Settle one advisory: ack once the copy is stored (or cannot ever be), else nak."""
        try:
            advisory = json.loads(msg.data)
            stream, consumer = advisory["stream"], advisory["consumer"]
            seq, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring a malformed advisory on %s: %s", msg.subject, exc)
            await msg.ack()
            return
        if (stream, consumer) != (target.stream, target.consumer):
            await msg.ack()  # not this consumer's (the filter should make this impossible)
            return
        name, where = target.function, f"{stream}/{seq}"
        try:
            original = await self._js.get_msg(stream, seq)
        except NotFoundError:
            log.error(
                "function %s: %s hit max deliveries but is gone (max_age, purge)", name, where
            )
            await msg.ack()
            return
        except nats.errors.Error as exc:
            await self._retry_later(msg, f"cannot read {where}: {exc}")
            return
        error = (
            f"MaxDeliveries: delivered {deliveries} times without being settled; the host "
            "likely crashed during the last attempt or could not store the dead letter"
        )
        headers = dead_letter_headers(
            headers_of(original),
            subject=original.subject or "",
            function=name,
            stream=stream,
            sequence=seq,
            stored_at_us=microseconds_since_epoch(original.time) if original.time else None,
            attempts=deliveries,
            error=error,
        )
        try:
            ack = await self._session.publish_durable(
                target.dead_letter, original.data or b"", headers
            )
        except (PublishError, nats.errors.Error) as exc:
            await self._retry_later(msg, f"dead letter for {where} not stored: {exc}")
            return
        if ack.duplicate:
            log.info("function %s: %s was already dead-lettered", name, where)
        else:
            log.error("function %s: %s dead-lettered after %d deliveries", name, where, deliveries)
            if self._on_dead_lettered is not None:
                self._on_dead_lettered(name)
        await msg.ack()

    async def _retry_later(self, msg: Msg, why: str) -> None:
        first, most = ADVISORY_RETRY
        delay = min(most, first * 2 ** (msg.metadata.num_delivered - 1))
        log.warning("%s; retrying in %gs", why, delay)
        with contextlib.suppress(nats.errors.Error):  # unsettled, it comes back after ack_wait
            await msg.nak(delay)


# --- reading, replaying, purging (fnhost dlq) ----------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One message in a DLQ stream."""

    stream: str
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime | None

    @classmethod
    def from_raw(cls, stream: str, raw: RawStreamMsg) -> DeadLetterRecord:
        """From a message get."""
        return cls(
            stream, raw.seq or 0, raw.subject or "", raw.data or b"", headers_of(raw), raw.time
        )

    def header(self, name: str) -> str:
        """A header's value, ``""`` when absent."""
        return self.headers.get(name, "")


def headers_of(raw: RawStreamMsg) -> dict[str, str]:
    """A message get's headers, from its raw block (see :func:`parse_header_block`)."""
    if raw.hdrs:
        return parse_header_block(base64.b64decode(raw.hdrs))
    return {k: str(v) for k, v in (raw.headers or {}).items()}


def parse_header_block(block: bytes) -> dict[str, str]:
    """The headers of a raw ``NATS/1.0`` header block, values decoded as UTF-8.

    nats-py's message get parses them with the e-mail parser, which turns every
    non-ASCII byte into U+FFFD (``Fnhost-Error: ValueError: grüß``); clients
    send UTF-8. A name given twice keeps its last value, as nats-py does.
    """
    headers: dict[str, str] = {}
    for line in block.decode(errors="replace").split("\r\n")[1:]:  # past the NATS/1.0 line
        name, colon, value = line.partition(":")
        if colon and name.strip():
            headers[name.strip()] = value.strip()
    return headers


async def iter_dead_letters(
    js: JetStreamContext, stream: str, subjects: Collection[str], function: str | None = None
) -> AsyncIterator[DeadLetterRecord]:
    """The dead letters on ``subjects`` in ``stream``, oldest first; read by message get,
    which moves no consumer and acks nothing."""
    wanted = next(iter(subjects)) if len(subjects) == 1 else ">"
    seq = 1
    while True:
        try:
            raw = await js.get_msg(stream, seq=seq, subject=wanted, next=True)
        except NotFoundError as exc:
            if exc.err_code == NO_MESSAGE_FOUND:
                return
            raise  # the stream itself is missing: say so rather than list nothing
        seq = (raw.seq or seq) + 1
        record = DeadLetterRecord.from_raw(stream, raw)
        if record.subject in subjects and function in (None, record.header(h.FUNCTION)):
            yield record


class ReplayError(Exception):
    """A dead letter that cannot be replayed (the reason is the message)."""


def replay_headers(record: DeadLetterRecord) -> dict[str, str]:
    """The original headers back (no ``Fnhost-*``), ``Fnhost-Replayed`` and a new message id.

    The id is new so the original stream's duplicate window does not drop the
    replay, and deterministic so replaying the same dead letter twice stores one.
    """
    headers = {k: v for k, v in record.headers.items() if not k.lower().startswith("fnhost-")}
    origin = (
        record.header(ORIGINAL_MSG_ID) or f"{record.header(h.STREAM)}:{record.header(h.STREAM_SEQ)}"
    )
    headers[h.MSG_ID] = f"{origin}:replay:{record.seq}"
    headers[h.REPLAYED] = f"{record.stream}:{record.seq}"
    return headers


async def replay(session: Session, record: DeadLetterRecord) -> PubAck:
    """Publish ``record`` to its original subject, wait for the PubAck, then delete it
    from the DLQ, only when the original stream (``Fnhost-Stream``) stored it.
    Raises :class:`ReplayError` or :class:`PublishError`."""
    target = record.header(h.ORIGINAL_SUBJECT)
    if not target:
        raise ReplayError(f"{record.stream}/{record.seq} has no {h.ORIGINAL_SUBJECT} header")
    original = record.header(h.STREAM)
    if not original:
        raise ReplayError(
            f"{record.stream}/{record.seq} has no {h.STREAM} header: "
            "no way to tell that its original stream stores the replay"
        )
    # Checked before publishing: a core subscriber would get a message no stream stores,
    # and again on every retry or replay.
    try:
        capturing = await session.js.find_stream_name_by_subject(target)
    except NotFoundError:
        raise ReplayError(
            f"no stream captures {target!r} (the original stream {original} is gone?): "
            "not published"
        ) from None
    if capturing != original:
        raise ReplayError(
            f"stream {capturing} captures {target!r} now, not the original stream {original}: "
            "not published"
        )
    # And checked by JetStream, should the streams change meanwhile.
    headers = {**replay_headers(record), EXPECTED_STREAM: original}
    try:
        ack = await session.publish_durable(target, record.data, headers)
    except nats.js.errors.APIError as exc:
        if exc.err_code != WRONG_STREAM:
            raise
        raise ReplayError(
            f"another stream captures {target!r} now, not the original stream {original}: "
            f"not stored ({exc.description})"
        ) from None
    # Gone meanwhile (a concurrent replay or purge) is as good as deleted.
    with contextlib.suppress(NotFoundError):
        await session.js.delete_msg(record.stream, record.seq)
    return ack


async def purge(
    js: JetStreamContext, stream: str, subjects: Collection[str], function: str | None = None
) -> int:
    """Delete the dead letters on ``subjects`` (only ``function``'s when given); return how many.

    A whole subject goes in one purge; one function's letters go one by one,
    since functions may share a dead-letter subject.
    """
    if function is not None:
        records = [r async for r in iter_dead_letters(js, stream, subjects, function)]
        for record in records:
            with contextlib.suppress(NotFoundError):
                await js.delete_msg(stream, record.seq)
        return len(records)
    purged = 0
    for subject in subjects:
        info = await js.stream_info(stream, subjects_filter=subject)
        purged += (info.state.subjects or {}).get(subject, 0)
        await js.purge_stream(stream, subject=subject)
    return purged
