"""``store: kv`` (the default): keys and leases in a JetStream key-value bucket.

No server beyond NATS. One KV entry per key, whose value says what it is:
``L<expires>`` a lease, ``D<expires>`` a record (epoch seconds). Every lease
change is a compare-and-set on the entry's revision (``Nats-Expected-Last-
Subject-Sequence``), so the server decides races:

- begin: *create* (expected revision 0) writes our lease in one round trip
  for a key never seen; if the key exists, read it: a live record is
  ``DONE``, a live lease ``LEASED``, an expired one is overwritten with our
  lease at the revision we read (if someone else got there first, read again).
- record: the record is written whatever the entry holds now, with no
  compare-and-set: the effect happened, so remembering it is right even if
  our lease expired and another delivery took it meanwhile. (A conditional
  write would end in the same record, one round trip later when the lease
  moved, and costs the server a check on every message.)
- release: our lease -> an expired lease, at our lease's revision (nothing if
  it moved); an expired entry is free for the next begin.

Expiry is stored in the value, so functions with different ``ttl`` share a
bucket; the bucket's ``max_age`` (the largest ``ttl`` of the functions that
use it, when fnhost creates the bucket) lets the server drop old entries.
A bucket declared under ``kv:`` in fn.yaml is used as it is.

Writes are pipelined across concurrent invocations
(:class:`fnhost_sdk.replies.Replies`, shared with the connection's stream
publishes): a plain publish whose PubAck resolves a future, no timer or inbox
per write, so many writes are in flight at once; the server's answer still
comes back before the invocation goes on (never an ack before the record is
stored).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new
from fnhost_sdk.replies import Replies, replies_for

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue


_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = (10071, 10164)
_RACE_ROUNDS = 16
TIMEOUT = 5.0
"""Seconds to wait for the server's answer to one store operation."""


class WrongLast(Exception):
    """The entry's revision is not the one the write expected."""


async def _put(replies: Replies, subject: str, value: bytes, last: int | None) -> int:
    """Store ``value``; with ``last``, only if the subject's last revision is ``last``."""
    headers = None if last is None else {_EXPECTED_LAST: str(last)}
    try:
        msg = await replies.request(subject, value, headers, TIMEOUT)
    except nats.errors.NoRespondersError:
        raise StoreUnavailable("no JetStream stream answers (the bucket is gone?)") from None
    data = msg.data
    # A PubAck is {"stream":"KV_b","seq":N[,...]}: read N without a JSON parse.
    at = data.find(b'"seq":')
    if at >= 0 and b'"error"' not in data:
        end = at + 6
        while end < len(data) and data[end] in _DIGITS:
            end += 1
        return int(data[at + 6 : end])
    error = json.loads(data).get("error") if data else None
    if error is not None and error.get("err_code") in _WRONG_LAST:
        raise WrongLast()
    raise StoreUnavailable(f"JetStream: {error or data!r}")


_DIGITS = frozenset(b"0123456789")


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
        managed: bool = True,
    ) -> None:
        self._js = js
        self._nc = nc or (lambda: js()._nc)
        self._writes: Replies | None = None
        self.bucket = bucket
        self._holder = holder
        self._ttl = ttl
        self._managed = managed
        self._prefix = f"$KV.{bucket}."
        self._kv: KeyValue | None = None

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{function}."
        b64 = base64.urlsafe_b64encode

        def encode(key: str) -> str:
            # KV keys allow few characters; base64url uses only allowed ones.
            return prefix + b64(key.encode()).rstrip(b"=").decode()

        return encode

    def widen(self, ttl: float) -> None:
        """Another function shares the bucket: keep entries for the longest ``ttl``."""
        self._ttl = max(self._ttl, ttl)

    async def start(self) -> None:
        js = self._js()
        try:
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                if not self._managed:
                    raise StoreUnavailable(f"KV bucket {self.bucket} does not exist") from None
                config = KeyValueConfig(
                    bucket=self.bucket, history=1, ttl=self._ttl, storage=StorageType.FILE
                )
                try:
                    self._kv = await js.create_key_value(config)
                except nats.js.errors.BadRequestError:
                    # Another host created it meanwhile.
                    self._kv = await js.key_value(self.bucket)
            self._writes = replies_for(self._nc())
        except nats.errors.Error as exc:
            raise StoreUnavailable(f"KV bucket {self.bucket}: {_why(exc)}") from exc

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        writes = self._open()
        subject = self._prefix + key
        try:
            try:
                return new(await _put(writes, subject, b"L%.3f" % (time.time() + lease_ttl), 0))
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
                expires = _expiry(value)
                now = time.time()
                if expires > now:
                    return DONE if value[:1] == b"D" else leased(expires)
                try:
                    lease = b"L%.3f" % (now + lease_ttl)
                    return new(await _put(writes, subject, lease, revision))
                except WrongLast:
                    continue
            raise StoreUnavailable(f"key {key} changed {_RACE_ROUNDS} times while we read it")
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def record(self, key: str, token: Token, ttl: float) -> None:
        writes = self._open()
        subject = self._prefix + key
        value = b"D%.3f" % (time.time() + ttl)
        try:
            await _put(writes, subject, value, None)
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def release(self, key: str, token: Token) -> None:
        try:
            await _put(self._open(), self._prefix + key, b"L0", int(token))
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


def _expiry(value: bytes) -> float:
    try:
        return float(value[1:]) if value[:1] in (b"L", b"D") else 0.0
    except ValueError:
        return 0.0


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
