"""``store: postgres``: keys and leases in a PostgreSQL table (``url:`` a libpq DSN).

The table (``bucket``, default ``fnhost_idempotency``, created if missing)::

    key text PRIMARY KEY, state char(1) ('L' lease, 'D' done),
    holder text (the lease's token), expires_at double precision (epoch seconds)

Times come from the database's clock, so hosts with skewed clocks agree.

- begin: ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE expires_at <= now``
  takes a new or expired key in one statement; otherwise the row says
  ``DONE`` or ``LEASED``. Row locks serialise racing hosts.
- record (by the host, after the handler): an upsert to ``D``.
- ``ctx.idempotency.record_in(conn)`` (by the handler, inside its own
  transaction): ``UPDATE ... SET state = 'D' WHERE key = .. AND holder = <our
  token> AND state = 'L'``. If no row matches, another delivery took the key
  over (or recorded it): :class:`~fnhost_sdk.idempotency.LeaseLost` is raised
  and the handler's transaction must roll back. So the effect and the record
  commit together, or neither does: an effect exactly once.
- release: delete our own lease row.

Expired rows are deleted now and then (every ``SWEEP_EVERY`` begins).
Connections: a small pool of autocommit connections (``POOL_SIZE``). A
connection the server hung up on while it idled in the pool (a restart) is
replaced before use, so a restart fails no call that comes after it. A
server that does not answer within ``TIMEOUT`` (frozen, or a network that
drops packets) fails the call with :class:`StoreUnavailable` like one that is
down (``CONNECT_TIMEOUT`` for a new connection). A begin that waits over
``LOCK_WAIT_MS`` on the key's row lock (a handler's ``record_in`` transaction
not yet committed) finds the key leased.
Needs psycopg 3 (``pip install 'fnhost[postgres]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import socket
import time
from typing import Any

from fnhost.idempotency import DONE, Begin, KeyEncoder, StoreUnavailable, Token, leased, new
from fnhost.idempotency.keys import plain_encoder
from fnhost_sdk.idempotency import LeaseLost

log = logging.getLogger("fnhost.idempotency")

POOL_SIZE = 8
"""Connections the store keeps to the database."""
CONNECT_TIMEOUT = 5
"""Seconds to wait for a new connection."""
TIMEOUT = 5.0
"""Seconds to wait for a statement's answer (a frozen server is an outage, not a hang)."""
LOCK_WAIT_MS = 1000
"""Longest a statement waits on a row lock (the server's ``lock_timeout``); under
``TIMEOUT``, so a key locked by a handler's open ``record_in`` transaction reads as
leased rather than as an outage."""
SWEEP_EVERY = 4096

_NOW = "extract(epoch from clock_timestamp())"


class PostgresStore:
    """Keys in the table ``bucket`` of the database at ``url``."""

    name = "postgres"

    def __init__(self, url: str, bucket: str, holder: str) -> None:
        self.url = url
        self._holder = holder
        self._tokens = itertools.count(1)
        self._pool: asyncio.Queue[Any] | None = None
        self._begins = 0
        table = f'"{bucket}"'  # the manifest allows only letters, digits, '-' and '_'
        self._create = (
            f"CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, state char(1) NOT NULL,"
            " holder text, expires_at double precision NOT NULL)"
        )
        self._begin = (
            f"INSERT INTO {table} AS t (key, state, holder, expires_at)"
            f" VALUES (%s, 'L', %s, {_NOW} + %s)"
            " ON CONFLICT (key) DO UPDATE SET state = 'L', holder = EXCLUDED.holder,"
            f" expires_at = EXCLUDED.expires_at WHERE t.expires_at <= {_NOW} RETURNING 1"
        )
        self._look = f"SELECT state, expires_at, {_NOW} FROM {table} WHERE key = %s"
        self._record = (
            f"INSERT INTO {table} AS t (key, state, holder, expires_at)"
            f" VALUES (%s, 'D', NULL, {_NOW} + %s)"
            " ON CONFLICT (key) DO UPDATE SET state = 'D', holder = NULL,"
            " expires_at = EXCLUDED.expires_at"
        )
        self._record_ours = (
            f"UPDATE {table} SET state = 'D', holder = NULL, expires_at = {_NOW} + %s"
            " WHERE key = %s AND holder = %s AND state = 'L'"
        )
        self._release = f"DELETE FROM {table} WHERE key = %s AND holder = %s AND state = 'L'"
        self._sweep = f"DELETE FROM {table} WHERE expires_at < {_NOW} - 60"

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{function}/"
        return plain_encoder(prefix)

    async def start(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the installation
            needs = "the postgres store needs: pip install 'fnhost[postgres]'"
            raise StoreUnavailable(needs) from exc
        if self._pool is None:
            pool: asyncio.Queue[Any] = asyncio.Queue()
            for _ in range(POOL_SIZE):
                pool.put_nowait(None)
            self._pool = pool
        await self._execute(self._create, ())

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        self._begins += 1
        if self._begins % SWEEP_EVERY == 0:
            await self._execute(self._sweep, ())
        token = f"{self._holder}:{next(self._tokens)}"
        for _ in range(16):
            try:
                taken = await self._execute(self._begin, (key, token, lease_ttl), fetch=True)
            except _RowLocked:
                # A handler's transaction marked the key done (record_in) and has not
                # committed yet: a lease whose holder is finishing. Ask again at once.
                return leased(time.time())
            if taken:
                return new(token)
            row = await self._execute(self._look, (key,), fetch=True)
            if row:
                state, expires_at, now = row[0]
                if expires_at > now:
                    return DONE if state == "D" else leased(float(expires_at))
        raise StoreUnavailable(f"key {key} changed 16 times while we read it")

    async def record(self, key: str, token: Token, ttl: float) -> None:
        await self._execute(self._record, (key, ttl))

    async def release(self, key: str, token: Token) -> None:
        await self._execute(self._release, (key, token))

    def transactional(self, ttl: float) -> _Recorder:
        return _Recorder(self._record_ours, ttl)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        while pool is not None and not pool.empty():
            conn = pool.get_nowait()
            if conn is not None:
                await conn.close()

    async def _execute(self, query: str, params: tuple[Any, ...], *, fetch: bool = False) -> Any:
        import psycopg

        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the postgres store is not started")
        conn = await pool.get()
        stalled: list[bool] = []
        watchdog: asyncio.TimerHandle | None = None
        try:
            if conn is not None and _cut(conn):
                await conn.close()  # the server hung up while it idled (a restart)
                conn = None
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                )
                await conn.execute(f"SET lock_timeout = {LOCK_WAIT_MS}")
            watchdog = asyncio.get_running_loop().call_later(TIMEOUT, _hang_up, conn, stalled)
            cursor = await conn.execute(query, params, prepare=True)
            result = await cursor.fetchall() if fetch else None
        except psycopg.Error as exc:
            if (
                conn is not None
                and not conn.closed
                and not stalled
                and (
                    not isinstance(exc, psycopg.OperationalError)
                    or isinstance(exc, psycopg.errors.LockNotAvailable)
                )
            ):
                pool.put_nowait(conn)
            else:
                if conn is not None:
                    await conn.close()
                pool.put_nowait(None)
            if stalled:
                raise StoreUnavailable(f"postgres did not answer within {TIMEOUT:g}s") from exc
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                raise _RowLocked(f"row locked for over {LOCK_WAIT_MS} ms") from exc
            raise StoreUnavailable(f"postgres {type(exc).__name__}: {exc}".strip()) from exc
        except BaseException:
            if conn is not None:
                await conn.close()
            pool.put_nowait(None)
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
        pool.put_nowait(conn)
        return result


class _RowLocked(StoreUnavailable):
    """A statement gave up waiting on a row lock (``LOCK_WAIT_MS``)."""


def _cut(conn: Any) -> bool:
    """Whether a pooled connection is unusable. An idle connection is sent nothing
    (no LISTEN here), so one with something to read was hung up on: the server's
    goodbye (its restart or shutdown) or the end of the stream. It would fail the
    next statement, so it is replaced before use instead."""
    import psycopg

    if conn.closed or conn.broken:
        return True
    try:
        poll = select.poll()
        poll.register(conn.fileno(), select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _hang_up(conn: Any, stalled: list[bool]) -> None:
    """The database did not answer in time (a frozen server): shut the connection's
    socket down, so the statement waiting on it fails at once with an
    ``OperationalError``. The socket stays open (psycopg closes it), so its
    descriptor is not reused while the event loop still watches it."""
    import psycopg

    stalled.append(True)
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, ValueError, psycopg.Error):
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Recorder:
    """``record_in(conn)``: mark our lease done inside the handler's transaction."""

    __slots__ = ("_query", "_ttl")

    def __init__(self, query: str, ttl: float) -> None:
        self._query = query
        self._ttl = ttl

    def record_sync(self, conn: Any, key: str, token: int | str) -> None:
        if conn.execute(self._query, (self._ttl, key, token)).rowcount != 1:
            raise LeaseLost(f"idempotency key {key} was taken over by another delivery")

    async def record_async(self, conn: Any, key: str, token: int | str) -> None:
        cursor = await conn.execute(self._query, (self._ttl, key, token))
        if cursor.rowcount != 1:
            raise LeaseLost(f"idempotency key {key} was taken over by another delivery")
