"""The kv store's record groups, on a real nats-server: many records per write,
found by every host, and the key's own entry when a lease ran out first."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fnhost.idempotency import StoreUnavailable
from fnhost.idempotency.kv import GROUP_PREFIX, GROUP_SIZE
from fnhost_sdk.deploy import bucket_keys
from fnhost_sdk.waiting import wait_for

from .conftest import KV_BUCKET, StoreFactory

pytestmark = [pytest.mark.nats, pytest.mark.parametrize("make_store", ["kv"], indirect=True)]


async def _entries(js: JetStreamContext) -> dict[str, bytes]:
    """Every live entry. Keys from the stream's subjects: nats-py's ``kv.keys()`` can end
    early (or raise NoKeysError) while the machine is loaded."""
    kv = await js.key_value(KV_BUCKET)
    entries = {}
    for key in await bucket_keys(js, KV_BUCKET):
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):  # deleted or purged
            entries[key] = (await kv.get(key)).value or b""
    return entries


async def _writes(js: JetStreamContext) -> int:
    return (await js.stream_info(f"KV_{KV_BUCKET}")).state.last_seq


async def test_concurrent_records_share_group_writes_and_every_host_sees_them(
    make_store: StoreFactory, nc: NatsClient
) -> None:
    a, b = await make_store("a"), await make_store("b")
    encode = a.encoder("fn")
    keys = [encode(f"msg-{n}") for n in range(GROUP_SIZE)]
    begins = await asyncio.gather(*(a.begin(key, 30) for key in keys))
    assert {begin.state for begin in begins} == {"new"}
    leases_written = await _writes(nc.jetstream())
    await asyncio.gather(
        *(a.record(key, begin.token, 3600) for key, begin in zip(keys, begins, strict=True))
    )
    record_writes = await _writes(nc.jetstream()) - leases_written
    print(f"{GROUP_SIZE} records stored in {record_writes} write(s)")
    assert 1 <= record_writes < GROUP_SIZE // 2

    entries = await _entries(nc.jetstream())
    groups = [key for key in entries if key.startswith(GROUP_PREFIX + ".")]
    assert len(groups) == 1, groups
    assert entries[groups[0]].count(b"\n") == GROUP_SIZE
    assert all(entries[key].startswith(b"L") for key in keys)  # leases name the group
    # Another host finds every record through the lease's group.
    assert {(await b.begin(key, 30)).state for key in keys} == {"done"}


async def test_leases_past_a_group_size_start_a_new_group(
    make_store: StoreFactory, nc: NatsClient
) -> None:
    store = await make_store("a")
    encode = store.encoder("fn")
    for n in range(GROUP_SIZE + 1):
        begin = await store.begin(encode(f"msg-{n}"), 30)
        await store.record(encode(f"msg-{n}"), begin.token, 3600)
    entries = await _entries(nc.jetstream())
    assert len([key for key in entries if key.startswith(GROUP_PREFIX + ".")]) == 2


async def test_a_record_after_the_lease_ran_out_goes_to_the_keys_own_entry(
    make_store: StoreFactory, nc: NatsClient
) -> None:
    a, b, c = await make_store("a"), await make_store("b"), await make_store("c")
    key = a.encoder("fn")("slow")
    mine = await a.begin(key, 0.3)
    lapsed = time.time() + 0.4
    await wait_for(lambda: time.time() > lapsed, timeout=5, message="a's lease lapsed")
    taken = await b.begin(key, 30)  # b takes the key over: it now names b's group
    assert taken.state == "new"
    await a.record(key, mine.token, 3600)  # a's effect happened: remember it
    assert (await _entries(nc.jetstream()))[key].startswith(b"D")
    await b.release(key, taken.token)  # b failed; its release no longer matches
    assert (await c.begin(key, 30)).state == "done"


async def test_a_record_with_a_token_the_store_does_not_hold_still_records(
    make_store: StoreFactory,
) -> None:
    a, b = await make_store("a"), await make_store("b")
    key = a.encoder("fn")("unknown-token")
    await a.begin(key, 30)
    await a.record(key, 10**9, 3600)
    assert (await b.begin(key, 30)).state == "done"


async def test_a_group_write_that_fails_fails_the_record(
    make_store: StoreFactory, nc: NatsClient
) -> None:
    store = await make_store("a")
    key = store.encoder("fn")("lost-bucket")
    begin = await store.begin(key, 30)
    await nc.jetstream().delete_key_value(KV_BUCKET)
    with pytest.raises(StoreUnavailable):
        await store.record(key, begin.token, 3600)
