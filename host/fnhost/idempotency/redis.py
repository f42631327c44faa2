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

Commands are pipelined across concurrent invocations: the calls made in one
turn of the event loop go to Redis as one pipeline (one write, one read), and
each invocation awaits its own answer. The scripts are loaded at start (and
again after a Redis restart forgot them).

Needs the ``redis`` package (``pip install 'fnhost[redis]'``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new
from fnhost.idempotency.keys import plain_encoder

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
        self._shas: dict[str, str] = {}
        self._queue: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{self.bucket}:{function}/"
        return plain_encoder(prefix)

    async def start(self) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.exceptions import RedisError
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StoreUnavailable("the redis store needs: pip install 'fnhost[redis]'") from exc
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry_on_timeout=False,
            )
        try:
            for script in (_BEGIN, _RECORD, _RELEASE):
                self._shas[script] = await self._client.script_load(script)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {type(exc).__name__}: {exc}") from exc

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        token = f"{self._holder}:{next(self._tokens)}"
        state, left = await self._eval(_BEGIN, key, token, _ms(lease_ttl))
        if state == 1:
            return new(token)
        if state == 2:
            return DONE
        return leased(time.time() + max(int(left), 0) / 1000)

    async def record(self, key: str, token: Token, ttl: float) -> None:
        if not await self._eval(_RECORD, key, token, _ms(ttl)):
            log.info("idempotency key %s: our lease was taken over; recorded anyway", key)

    async def release(self, key: str, token: Token) -> None:
        await self._eval(_RELEASE, key, token)

    def transactional(self, ttl: float) -> None:
        return None

    async def close(self) -> None:
        for task in list(self._flushing):
            await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _eval(self, script: str, key: str, *args: Any) -> asyncio.Future[Any]:
        """Queue one script call; the queue goes out as one pipeline after this loop turn."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((script, (key, *args), answer))
        return answer

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        from redis.exceptions import NoScriptError, RedisError

        failure: StoreUnavailable | None = None
        results: list[Any] = []
        try:
            if self._client is None:
                raise StoreUnavailable("the redis store is not started")
            pipe = self._client.pipeline(transaction=False)
            for script, args, _ in batch:
                pipe.evalsha(self._shas[script], 1, *args)
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            failure = StoreUnavailable(f"redis {type(exc).__name__}: {exc}")
        except StoreUnavailable as exc:
            failure = exc
        for index, (_, _, answer) in enumerate(batch):
            if answer.done():
                continue
            result = results[index] if failure is None else failure
            if isinstance(result, NoScriptError):
                result = StoreUnavailable("redis forgot the scripts (restarted?)")
            elif isinstance(result, RedisError):
                result = StoreUnavailable(f"redis {type(result).__name__}: {result}")
            if isinstance(result, StoreUnavailable):
                answer.set_exception(result)
            else:
                answer.set_result(result)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
