"""``store: kv`` (the default): keys and leases in a JetStream key-value bucket.

No server beyond NATS. One KV entry per key holds its lease, and records are
stored in *groups*, so that a message costs one write of its own:

- ``L<expires> <group>``: a lease (``expires`` in epoch seconds) whose record,
  once the handler succeeds, goes into the group entry ``<group>``;
- ``=records.<holder>.<n>`` (a *group*, one KV entry per up to
  :data:`GROUP_SIZE` leases a host takes in a row): the records of those
  leases, one line ``<key> <expires>`` each. The host rewrites the whole
  entry (one write in flight per group, each holding every record so far) as
  records come in, so the records of all the invocations that finish while
  one write travels go to the server in the next one;
- ``D<expires>``: a record in the key's own entry (below), also how fnhost
  before record groups stored every record.

Lease changes are compare-and-set on the entry's revision
(``Nats-Expected-Last-Subject-Sequence``), so the server decides races:

- begin: *create* (expected revision 0) writes our lease in one round trip
  for a key never seen. If the key exists, read it (and the group its lease
  names): a live record is ``DONE``, a live lease ``LEASED``, an expired one
  is overwritten with our lease at the revision we read (if someone else got
  there first, read again).
- record: add the key to its lease's group and wait until a write of the
  group holding it is stored; only then is the message acked
  (:meth:`KVStore.record_soon` gives that wait as a future, so the trigger
  acks without the invocation waiting). If our lease
  ran out before that, another delivery may have taken the key over and
  pointed it at its own group, so the record is also written into the key's
  own entry (``D``), whatever the entry holds: the effect happened, so
  remembering it is right.
- release: our lease -> an expired lease, at our lease's revision (nothing if
  it moved); an expired entry is free for the next begin.

Expiry is stored in the value, so functions with different ``ttl`` share a
bucket; the bucket's ``max_age`` (the largest ``ttl`` plus lease of the
functions that use it, so a lease entry outlives the record it leads to; set
when fnhost creates the bucket and raised, never lowered, when a store starts)
lets the server drop old entries. Its replicas are those of the most
replicated stream its functions consume (a record on fewer servers than the
message it guards is out of reach, or lost, with one server), set and raised
the same way.
A bucket declared under ``kv:`` in fn.yaml is used as it is.

Writes are pipelined across concurrent invocations
(:class:`fnhost_sdk.replies.Replies`, shared with the connection's stream
publishes): a plain publish whose PubAck resolves a future, no timer or inbox
per write, so many writes are in flight at once; a lease's create is encoded
once and queued without a coroutine (:mod:`fnhost_sdk.nowait`). The server's
answer still comes back before anything goes on (never an ack before the
record is stored).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, TypeAlias

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new
from fnhost.idempotency.keys import MAX_KEY_BYTES, digest
from fnhost_sdk.nowait import EncodedHeaders
from fnhost_sdk.replies import Replies, no_responders, replies_for

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue


log = logging.getLogger("fnhost.idempotency")

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = (10071, 10164)
_RACE_ROUNDS = 16
TIMEOUT = 5.0
"""Seconds to wait for the server's answer to one store operation."""
GROUP_SIZE = 64
"""Leases a host takes in a row whose records share one group entry."""
GROUP_PREFIX = "=records"
"""Group entries' keys start with this; ``=`` never starts a function's key
(function names are ``[A-Za-z0-9_-]+``)."""


class WrongLast(Exception):
    """The entry's revision is not the one the write expected."""


_CREATE = EncodedHeaders({_EXPECTED_LAST: "0"})
_NO_STREAM = "no JetStream stream answers (the bucket is gone?)"


async def _put(replies: Replies, subject: str, value: bytes, last: int | None) -> int:
    """Store ``value``; with ``last``, only if the subject's last revision is ``last``."""
    headers = None if last is None else {_EXPECTED_LAST: str(last)}
    try:
        return _revision(await replies.request(subject, value, headers, TIMEOUT))
    except nats.errors.NoRespondersError:
        raise StoreUnavailable(_NO_STREAM) from None


def _revision(answer: Msg) -> int:
    """The revision a write was stored at, from the server's answer (raises
    :class:`WrongLast` for a refused compare-and-set, else :class:`StoreUnavailable`)."""
    data = answer.data
    # A PubAck is {"stream":"KV_b","seq":N[,...]}: read N without a JSON parse.
    stored = _PUBACK_SEQ.search(data)
    if stored is not None and b'"error"' not in data:
        return int(stored[1])
    if not data and no_responders(answer):
        raise StoreUnavailable(_NO_STREAM)
    error = json.loads(data).get("error") if data else None
    if error is not None and error.get("err_code") in _WRONG_LAST:
        raise WrongLast()
    raise StoreUnavailable(f"JetStream: {error or data!r}")


_PUBACK_SEQ = re.compile(rb'"seq":(\d+)')


class _Group:
    """The records of up to :data:`GROUP_SIZE` leases, stored as one KV entry."""

    __slots__ = (
        "lease_suffix",
        "lines",
        "subject",
        "taken",
        "waiters",
        "writer",
    )

    def __init__(self, key: str, subject: str) -> None:
        self.subject = subject
        self.lease_suffix = b" " + key.encode()
        self.taken = 0  # leases ever pointed at this group
        self.lines: list[bytes] = []
        self.waiters: list[_Waiter] = []
        self.writer: asyncio.Task[None] | None = None


_Waiter: TypeAlias = tuple[int, "asyncio.Future[None]", str, float, float]
"""A record waiting for a write of its group: (the count of the group's lines that hold
it, the future done once it is stored, its key, its lease's expiry, its own expiry).
A tuple: one is made per message."""


class _Lease:
    """One of our live leases: what its token stands for."""

    __slots__ = ("expires", "group", "revision")

    def __init__(self, group: _Group, revision: int, expires: float) -> None:
        self.group = group
        self.revision = revision
        self.expires = expires


class KVStore:
    """Keys in the JetStream KV bucket ``bucket``."""

    name = "kv"

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        bucket: str,
        holder: str,
        *,
        nc: Callable[[], NatsClient] | None = None,
        ttl: float = 86400.0,
        replicas: int = 1,
        managed: bool = True,
    ) -> None:
        self._js = js
        self._nc = nc or (lambda: js()._nc)
        self._writes: Replies | None = None
        self.bucket = bucket
        self._holder = holder
        self._ttl = ttl
        self._replicas = replicas
        self._managed = managed
        self._prefix = f"$KV.{bucket}."
        self._kv: KeyValue | None = None
        self._widening: asyncio.Task[None] | None = None
        self._filling: _Group | None = None
        self._numbers = itertools.count(1)
        self._leases: dict[Token, _Lease] = {}
        self._tokens = itertools.count(1)
        self._writing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{function}."
        b64 = base64.urlsafe_b64encode

        def encode(key: str) -> str:
            # KV keys allow few characters; base64url uses only allowed ones. A long
            # one would overflow the server's control line: its digest stands in.
            try:
                encoded = b64(key.encode()).rstrip(b"=").decode()
            except UnicodeEncodeError:
                return prefix + digest(key)
            return prefix + (encoded if len(encoded) <= MAX_KEY_BYTES else digest(key))

        return encode

    def widen(self, ttl: float, replicas: int = 1) -> None:
        """A function uses the bucket: keep entries for at least ``ttl`` (its record ttl
        plus its lease, so a lease entry outlives the record it leads to), on at least
        ``replicas`` servers (its trigger stream's). On a running store (a reload
        lengthened a ttl, raised a stream's replicas) the bucket is widened at once."""
        if ttl <= self._ttl and replicas <= self._replicas:
            return
        self._ttl = max(self._ttl, ttl)
        self._replicas = max(self._replicas, replicas)
        if self._kv is not None and self._managed:
            # Held so the task is not garbage-collected before it ran.
            self._widening = asyncio.get_running_loop().create_task(self._widen_now())

    async def _widen_now(self) -> None:
        try:
            await self._raise_bucket_limits(self._js())
        except nats.errors.Error as exc:  # the next start (after an outage) tries again
            log.warning(
                "KV bucket %s not widened to %gs, %d replicas: %s",
                self.bucket,
                self._ttl,
                self._replicas,
                _why(exc),
            )

    async def start(self) -> None:
        js = self._js()
        try:
            try:
                self._kv = await js.key_value(self.bucket)
                if self._managed:
                    await self._raise_bucket_limits(js)
            except nats.js.errors.BucketNotFoundError:
                if not self._managed:
                    raise StoreUnavailable(f"KV bucket {self.bucket} does not exist") from None
                config = KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    ttl=self._ttl,
                    storage=StorageType.FILE,
                    replicas=self._replicas,
                )
                try:
                    self._kv = await js.create_key_value(config)
                except nats.js.errors.BadRequestError:
                    # Another host created it meanwhile.
                    self._kv = await js.key_value(self.bucket)
            self._writes = replies_for(self._nc())
            self._loop = asyncio.get_running_loop()
        except nats.errors.Error as exc:
            raise StoreUnavailable(f"KV bucket {self.bucket}: {_why(exc)}") from exc

    async def _raise_bucket_limits(self, js: JetStreamContext) -> None:
        """Raise the bucket's ``max_age`` and replicas to what the functions now need (never
        lower them: another host may serve functions that need more)."""
        config = (await js.stream_info(f"KV_{self.bucket}")).config
        max_age, replicas = config.max_age or 0.0, config.num_replicas or 1
        wider = config
        if 0 < max_age < self._ttl:
            wider = dataclasses.replace(wider, max_age=self._ttl)
        if replicas < self._replicas:
            wider = dataclasses.replace(wider, num_replicas=self._replicas)
        if wider is config:
            return
        try:
            await js.update_stream(wider)
        except nats.js.errors.APIError as exc:  # e.g. no permission: still usable
            log.warning(
                "KV bucket %s keeps entries %gs on %d servers, its functions need %gs on %d: %s",
                self.bucket,
                max_age,
                replicas,
                self._ttl,
                self._replicas,
                _why(exc),
            )

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        writes = self._open()
        subject = self._prefix + key
        group = self._group_for_lease()
        try:
            expires = time.time() + lease_ttl
            try:
                # A key's first delivery: one create, queued without a coroutine (not
                # through _put or Replies.request: a coroutine more on every message).
                lease = _lease(expires, group)
                sent = writes.request_nowait(subject, lease, _CREATE, TIMEOUT)
                answer = await (
                    writes.request(subject, lease, _CREATE, TIMEOUT) if sent is None else sent
                )
                return new(self._hold(group, _revision(answer), expires))
            except WrongLast:
                pass
            kv = self._bucket()
            for _ in range(_RACE_ROUNDS):
                try:
                    entry = await kv.get(key)
                    value, revision = entry.value or b"", entry.revision or 0
                except nats.js.errors.KeyNotFoundError as missing:
                    value = b""
                    revision = (missing.entry.revision or 0) if missing.entry else 0
                kind, expires_at, recorded_in = _parse(value)
                now = time.time()
                if kind == b"D" and expires_at > now:
                    return DONE
                if recorded_in:
                    # A lease whose key is in its group is finished, live lease or not.
                    recorded_until = await _record_in_group(kv, recorded_in, key)
                    if recorded_until is not None:
                        if recorded_until > now:
                            return DONE
                        expires_at = recorded_until
                if expires_at > now:
                    return leased(expires_at)
                expires = now + lease_ttl
                try:
                    revision = await _put(writes, subject, _lease(expires, group), revision)
                    return new(self._hold(group, revision, expires))
                except WrongLast:
                    continue
            raise StoreUnavailable(f"key {key} changed {_RACE_ROUNDS} times while we read it")
        except nats.errors.NoRespondersError:
            raise StoreUnavailable(_NO_STREAM) from None
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def record(self, key: str, token: Token, ttl: float) -> None:
        await self.record_soon(key, token, ttl)

    def record_soon(self, key: str, token: Token, ttl: float) -> asyncio.Future[None]:
        """Start :meth:`record`: the future is done once the record is stored (or fails
        with :class:`StoreUnavailable`), with no coroutine per record meanwhile."""
        expires = time.time() + ttl
        lease = None if self._writes is None else self._leases.pop(token, None)
        if lease is None:
            # Not open (fails; the lease stays ours for the next try), or not one of ours
            # (forgotten, or taken over while the store was down): the key's own entry.
            return self._spawn(self._record_in_entry(key, expires))
        loop = self._loop
        group = lease.group
        group.lines.append(b"%s %.3f\n" % (key.encode(), expires))
        stored: asyncio.Future[None] = loop.create_future()
        group.waiters.append((len(group.lines), stored, key, lease.expires, expires))
        if group.writer is None:
            group.writer = loop.create_task(self._write_group(group))
        return stored

    async def _record_in_entry(self, key: str, expires: float) -> None:
        try:
            await _put(self._open(), self._prefix + key, b"D%.3f" % expires, None)
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def release(self, key: str, token: Token) -> None:
        lease = self._leases.pop(token, None)
        if lease is None:
            return  # not a live lease of ours: nothing to release
        try:
            await _put(self._open(), self._prefix + key, b"L0", lease.revision)
        except WrongLast:
            pass  # no longer ours: nothing to release
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    def transactional(self, ttl: float) -> None:
        return None

    async def close(self) -> None:
        self._kv = None
        self._writes = None

    def _open(self) -> Replies:
        if self._writes is None:
            raise StoreUnavailable(f"KV bucket {self.bucket} is not open")
        return self._writes

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise StoreUnavailable(f"KV bucket {self.bucket} is not open")
        return self._kv

    def _group_for_lease(self) -> _Group:
        group = self._filling
        if group is None or group.taken >= GROUP_SIZE:
            key = f"{GROUP_PREFIX}.{self._holder}.{next(self._numbers)}"
            group = self._filling = _Group(key, self._prefix + key)
            self._forget_lapsed_leases()
        group.taken += 1
        return group

    def _hold(self, group: _Group, revision: int, expires: float) -> int:
        """Register a lease we took; its token is the key to it."""
        token = next(self._tokens)
        self._leases[token] = _Lease(group, revision, expires)
        return token

    def _forget_lapsed_leases(self) -> None:
        # An invocation cancelled mid-run (a drain past its grace) neither records nor
        # releases. Forgetting its lapsed lease is safe: a record with a token we do not
        # know goes to the key's own entry, and a release of it does nothing.
        now = time.time()
        lapsed = [token for token, lease in self._leases.items() if lease.expires < now]
        for token in lapsed:
            del self._leases[token]

    async def _write_group(self, group: _Group) -> None:
        # One write of a group in flight at a time: each holds every line so far,
        # so a later write never lands before an earlier one and loses lines.
        try:
            writes = self._open()
            while group.waiters:
                count = len(group.lines)
                await _put(writes, group.subject, b"".join(group.lines), None)
                now = time.time()
                waiting = []
                for waiter in group.waiters:
                    wanted, stored, key, lease_expires, record_expires = waiter
                    if wanted > count:
                        waiting.append(waiter)
                    elif stored.done():
                        pass  # its record() was cancelled
                    elif now < lease_expires:
                        stored.set_result(None)
                    else:
                        self._record_late(key, record_expires, stored)
                group.waiters = waiting
        except (StoreUnavailable, nats.errors.Error) as exc:
            failure = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(_why(exc))
            for _, stored, *_ in group.waiters:
                if not stored.done():
                    stored.set_exception(failure)
            group.waiters = []
        finally:
            group.writer = None

    def _record_late(self, key: str, expires: float, stored: asyncio.Future[None]) -> None:
        """The key's lease ran out before its group write was stored: another delivery
        may have taken the key over and pointed it at its own group, so the record also
        goes into the key's own entry (``D``): the effect happened."""

        def settle(late: asyncio.Task[None]) -> None:
            if stored.done():
                return
            if late.cancelled():
                stored.set_exception(StoreUnavailable("the record was cancelled"))
            elif (failure := late.exception()) is not None:
                stored.set_exception(failure)
            else:
                stored.set_result(None)

        self._spawn(self._record_in_entry(key, expires)).add_done_callback(settle)

    def _spawn(self, write: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(write)
        self._writing.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._writing.discard)
        return task


def _lease(expires: float, group: _Group) -> bytes:
    return b"L%.3f" % expires + group.lease_suffix


def _parse(value: bytes) -> tuple[bytes, float, str]:
    """(``L`` or ``D`` or ``b""``, its expiry, the group a lease records into or ``""``)."""
    kind = value[:1]
    if kind not in (b"L", b"D"):
        return b"", 0.0, ""
    expiry, _, group = value[1:].partition(b" ")
    try:
        return kind, float(expiry), group.decode()
    except ValueError:
        return b"", 0.0, ""


async def _record_in_group(kv: KeyValue, group: str, key: str) -> float | None:
    """The expiry of ``key``'s record in the group entry ``group``; None if it has none."""
    try:
        entry = await kv.get(group)
    except nats.js.errors.KeyNotFoundError:
        return None
    lines = b"\n" + (entry.value or b"")
    at = lines.find(b"\n%s " % key.encode())
    if at < 0:
        return None
    start = at + len(key) + 2
    end = lines.find(b"\n", start)
    try:
        return float(lines[start : end if end >= 0 else None])
    except ValueError:
        return None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
