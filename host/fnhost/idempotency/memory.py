"""``store: memory``: keys in this process's memory, with TTLs.

For tests and single-host development: the keys die with the process, and
two hosts do not see each other's. Every operation is synchronous Python
under one event loop, so begin's check-and-take is atomic without a lock.
Expired entries are dropped lazily, and swept once per ``SWEEP_EVERY`` begins.
"""

from __future__ import annotations

import itertools
import time

from fnhost.idempotency import DONE, Begin, KeyEncoder, Token, leased, new
from fnhost.idempotency.keys import plain_encoder

SWEEP_EVERY = 4096
"""Begins between two sweeps of expired entries."""


class MemoryStore:
    """Keys and leases in a dict: ``key -> (token or None when recorded, expires_at)``."""

    name = "memory"

    def __init__(self, holder: str) -> None:
        self._holder = holder
        self._entries: dict[str, tuple[str | None, float]] = {}
        self._tokens = itertools.count(1)
        self._begins = 0

    def encoder(self, function: str) -> KeyEncoder:
        prefix = f"{function}/"
        return plain_encoder(prefix)

    async def start(self) -> None:
        return None

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        now = time.time()
        self._begins += 1
        if self._begins % SWEEP_EVERY == 0:
            self._sweep(now)
        entry = self._entries.get(key)
        if entry is not None and entry[1] > now:
            return DONE if entry[0] is None else leased(entry[1])
        token = f"{self._holder}:{next(self._tokens)}"
        self._entries[key] = (token, now + lease_ttl)
        return new(token)

    async def record(self, key: str, token: Token, ttl: float) -> None:
        self._entries[key] = (None, time.time() + ttl)

    async def release(self, key: str, token: Token) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == token:
            del self._entries[key]

    def transactional(self, ttl: float) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]
