"""``store: redis``: keys and leases in Redis (``url: redis://host:6379/0``).

One Redis key per message key, ``<bucket>:<function>/<key>``, whose value is
the lease holder's token or ``D`` for a record; Redis expires it (``PX``), so
an expired lease or record simply is not there. Each operation is one round
trip:

- begin: a Lua script: ``SET key token NX PX lease``; if the key exists, its
  value and remaining time say ``DONE`` or ``LEASED``. Atomic on the server.
- record: a Lua script: ``SET key D PX ttl`` (whether or not the lease was
  still ours: the effect happened), answering whether it was ours.
- release: a Lua script: compare-and-delete (only our own lease).

Needs the ``redis`` package (``pip install 'fnhost[redis]'``).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new

log = logging.getLogger("fnhost.idempotency")

TIMEOUT = 5.0
"""Seconds to wait for Redis (connect and each command)."""

_BEGIN = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
local value = redis.call('GET', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if value == 'D' then return {2, left} end
return {3, left}
"""

_RECORD = """
local ours = redis.call('GET', KEYS[1]) == ARGV[1]
redis.call('SET', KEYS[1], 'D', 'PX', ARGV[2])
if ours then return 1 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Keys in the Redis server at ``url``, prefixed with ``bucket``."""

    name = "redis"

    def __init__(self, url: str, bucket: str, holder: str) -> None:
        self.url = url
        self.bucket = bucket
        self._holder = holder
        self._tokens = itertools.count(1)
        self._client: Any = None
        self._begin: Any = None
        self._record: Any = None
        self._release: Any = None

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{self.bucket}:{function}/"
        return prefix.__add__

    async def start(self) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StoreUnavailable("the redis store needs: pip install 'fnhost[redis]'") from exc
        if self._client is None:
            client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry_on_timeout=False,
            )
            self._begin = client.register_script(_BEGIN)
            self._record = client.register_script(_RECORD)
            self._release = client.register_script(_RELEASE)
            self._client = client
        await self._call(self._client.ping)

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        token = f"{self._holder}:{next(self._tokens)}"
        state, left = await self._call(self._begin, keys=[key], args=[token, _ms(lease_ttl)])
        if state == 1:
            return new(token)
        if state == 2:
            return DONE
        return leased(time.time() + max(int(left), 0) / 1000)

    async def record(self, key: str, token: Token, ttl: float) -> None:
        ours = await self._call(self._record, keys=[key], args=[token, _ms(ttl)])
        if not ours:
            log.info("idempotency key %s: our lease was taken over; recorded anyway", key)

    async def release(self, key: str, token: Token) -> None:
        await self._call(self._release, keys=[key], args=[token])

    def transactional(self, ttl: float) -> None:
        return None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {type(exc).__name__}: {exc}") from exc


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
