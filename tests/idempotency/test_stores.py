"""Every idempotency store keeps the same contract: begin / record / release,
lease take-over after expiry, record TTLs, and one winner in a race (CAS).

Real servers: nats-server (kv), redis-server, PostgreSQL; nothing mocked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import pytest

from fnhost_sdk.waiting import wait_for

from .conftest import StoreFactory

pytestmark = pytest.mark.nats


async def test_begin_record_duplicate(make_store: StoreFactory) -> None:
    store = await make_store("a")
    key = store.encoder("fn")("msg-1")
    first = await store.begin(key, 30)
    assert first.state == "new"
    again = await store.begin(key, 30)
    assert again.state == "leased"
    assert time.time() < again.expires_at <= time.time() + 31
    await store.record(key, first.token, 3600)
    assert (await store.begin(key, 30)).state == "done"


async def test_functions_do_not_share_keys(make_store: StoreFactory) -> None:
    store = await make_store("a")
    one, two = store.encoder("one")("same id/1"), store.encoder("two")("same id/1")
    assert one != two
    begin = await store.begin(one, 30)
    await store.record(one, begin.token, 3600)
    assert (await store.begin(two, 30)).state == "new"


async def test_release_frees_only_our_own_lease(make_store: StoreFactory) -> None:
    store = await make_store("a")
    key = store.encoder("fn")("msg-2")
    first = await store.begin(key, 30)
    wrong: int | str = 10**9 if isinstance(first.token, int) else "not-the-holder"
    await store.release(key, wrong)
    assert (await store.begin(key, 30)).state == "leased"
    await store.release(key, first.token)
    second = await store.begin(key, 30)
    assert second.state == "new"
    assert second.token != first.token
    await store.release(key, first.token)  # the old holder's late release is a no-op
    assert (await store.begin(key, 30)).state == "leased"


async def test_expired_lease_is_taken_over(make_store: StoreFactory) -> None:
    a, b = await make_store("a"), await make_store("b")
    key = a.encoder("fn")("msg-3")
    first = await a.begin(key, 0.3)
    assert first.state == "new"
    taken: list[object] = []

    async def takeover() -> bool:
        begin = await b.begin(key, 30)
        if begin.state == "new":
            taken.append(begin.token)
        return bool(taken)

    await wait_for(takeover, timeout=10, interval=0.05, message="the expired lease taken over")
    await a.release(key, first.token)  # too late: no longer a's
    assert (await a.begin(key, 30)).state == "leased"
    # a's late record still records: its effect happened
    await a.record(key, first.token, 3600)
    assert (await b.begin(key, 30)).state == "done"


async def test_record_expires_after_its_ttl(make_store: StoreFactory) -> None:
    store = await make_store("a")
    key = store.encoder("fn")("msg-4")
    begin = await store.begin(key, 30)
    await store.record(key, begin.token, 0.3)
    assert (await store.begin(key, 30)).state == "done"

    async def forgotten() -> bool:
        return (await store.begin(key, 30)).state == "new"

    await wait_for(forgotten, timeout=10, interval=0.05, message="the record forgotten")


@pytest.mark.parametrize("expired", [False, True], ids=["fresh", "expired"])
async def test_one_winner_in_a_race(make_store: StoreFactory, expired: bool) -> None:
    stores = [await make_store(f"h{i}") for i in range(4)]
    key = stores[0].encoder("fn")(f"race-{expired}")
    if expired:
        assert (await stores[0].begin(key, 0.2)).state == "new"
        lapsed = time.time() + 0.4
        await wait_for(lambda: time.time() > lapsed, timeout=5, message="the lease lapsed")
    results = await asyncio.gather(*(stores[i % 4].begin(key, 30) for i in range(24)))
    states = sorted(r.state for r in results)
    assert states.count("new") == 1, states
    assert states.count("leased") == 23


async def test_long_and_nul_keys_are_kept_under_distinct_short_keys(
    make_store: StoreFactory,
) -> None:
    """A raw key of kilobytes (a big header, a long Nats-Msg-Id) made the kv store's
    subject too long for the server (which then closed the connection) and
    overflowed PostgreSQL's index row; a NUL byte cannot be stored in PostgreSQL
    text. Such keys are stored under their digest, and two of them never meet."""
    store = await make_store("a")
    encode = store.encoder("fn")
    # Incompressible: PostgreSQL compresses an index entry before it checks its size.
    long = "".join(hashlib.sha256(b"%d" % n).hexdigest() for n in range(160))
    raws = [long, long[:-1] + "!", "é" * 1500, "with\x00nul", "with\x00nuL"]
    keys = [encode(raw) for raw in raws]
    for key in keys:
        begin = await store.begin(key, 30)
        assert begin.state == "new"
        await store.record(key, begin.token, 3600)
    assert [(await store.begin(key, 30)).state for key in keys] == ["done"] * len(raws)
    assert len(set(keys)) == len(raws)
    assert all(len(key.encode()) <= 300 for key in keys), [len(key) for key in keys]
    # A short raw key that spells a long key's digest is not that key.
    digest = keys[0].removeprefix(encode(""))
    assert encode(digest) != keys[0]
    assert (await store.begin(encode(digest), 30)).state == "new"


async def test_short_keys_keep_the_encoding_of_records_already_stored(
    make_store: StoreFactory,
) -> None:
    store = await make_store("a")
    encode = store.encoder("fn")
    if store.name == "kv":
        limit = "k" * 192  # 256 characters of base64url
        b64 = base64.urlsafe_b64encode(limit.encode()).decode()
        assert encode("msg-1") == "fn.bXNnLTE"
        assert encode(limit) == "fn." + b64
    else:
        prefix = "idem:fn/" if store.name == "redis" else "fn/"
        limit = "k" * 256
        assert encode("msg-1") == prefix + "msg-1"
        assert encode("IN:7:1700000000000000000") == prefix + "IN:7:1700000000000000000"
        assert encode(limit) == prefix + limit
    assert encode(limit + "k") != encode(limit) + "k"  # one byte more: digested
