"""``store: kv`` (the default): keys and leases in a JetStream key-value bucket.

No server beyond NATS. One KV entry per key, whose value says what it is:
``L<expires>`` a lease, ``D<expires>`` a record (epoch seconds). Every change
is a compare-and-set on the entry's revision (``Nats-Expected-Last-Subject-
Sequence``), so the server decides races:

- begin: *create* (expected revision 0) writes our lease in one round trip
  for a key never seen; if the key exists, read it: a live record is
  ``DONE``, a live lease ``LEASED``, an expired one is overwritten with our
  lease at the revision we read (if someone else got there first, read again).
- record: our lease -> a record, at our lease's revision; if the revision
  moved (our lease expired and another delivery took it), the record is
  written anyway: the effect happened, and remembering it is right.
- release: our lease -> an expired lease, at our lease's revision (nothing if
  it moved); an expired entry is free for the next begin.

Expiry is stored in the value, so functions with different ``ttl`` share a
bucket; the bucket's ``max_age`` (the largest ``ttl`` of the functions that
use it, when fnhost creates the bucket) lets the server drop old entries.
A bucket declared under ``kv:`` in fn.yaml is used as it is.

Concurrent invocations issue their store calls concurrently on the host's
connection: nats-py writes them out together, so the store's round trips
overlap rather than add up.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger("fnhost.idempotency")

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = (10071, 10164)
_RACE_ROUNDS = 16
TIMEOUT = 5.0
"""Seconds to wait for the server's answer to one store operation."""


class KVStore:
    """Keys in the JetStream KV bucket ``bucket``."""

    name = "kv"

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        bucket: str,
        holder: str,
        *,
        ttl: float = 86400.0,
        managed: bool = True,
    ) -> None:
        self._js = js
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
        except nats.errors.Error as exc:
            raise StoreUnavailable(f"KV bucket {self.bucket}: {_why(exc)}") from exc

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        js = self._js()
        subject = self._prefix + key
        now = time.time()
        lease = b"L%.3f" % (now + lease_ttl)
        try:
            try:
                ack = await js.publish(
                    subject, lease, timeout=TIMEOUT, headers={_EXPECTED_LAST: "0"}
                )
                return new(ack.seq)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
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
                    ack = await js.publish(
                        subject,
                        b"L%.3f" % (now + lease_ttl),
                        timeout=TIMEOUT,
                        headers={_EXPECTED_LAST: str(revision)},
                    )
                    return new(ack.seq)
                except nats.js.errors.APIError as exc:
                    if exc.err_code not in _WRONG_LAST:
                        raise
            raise StoreUnavailable(f"key {key} changed {_RACE_ROUNDS} times while we read it")
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def record(self, key: str, token: Token, ttl: float) -> None:
        js = self._js()
        subject = self._prefix + key
        value = b"D%.3f" % (time.time() + ttl)
        try:
            try:
                await js.publish(
                    subject, value, timeout=TIMEOUT, headers={_EXPECTED_LAST: str(token)}
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
                log.info("idempotency key %s: our lease was taken over; recording anyway", key)
                await js.publish(subject, value, timeout=TIMEOUT)
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    async def release(self, key: str, token: Token) -> None:
        try:
            await self._js().publish(
                self._prefix + key, b"L0", timeout=TIMEOUT, headers={_EXPECTED_LAST: str(token)}
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise StoreUnavailable(_why(exc)) from exc
        except nats.errors.Error as exc:
            raise StoreUnavailable(_why(exc)) from exc

    def transactional(self, ttl: float) -> None:
        return None

    async def close(self) -> None:
        self._kv = None

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
