"""The export stream: one record per applied charge, none for a replay, on the memory store, a
real Redis (the pipelined hot path), redis-py's client and a real Redis Cluster; the group
reader's at-least-once reading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from extproc.config import ExportStreamConfig, Secret, StoreConfig
from extproc.domain import Charge, Usage
from extproc.export import record
from extproc.export.stream import GroupReader, MemoryRecords, RecordStream, redis_records
from extproc.store import keys, ledger
from extproc.store.base import Adjustment, CounterStore
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.redis_fixtures import RedisClusterProcesses, RedisServer

pytestmark = pytest.mark.redis

NOW = 1_796_127_018_372
BASE = "maas:export"


@dataclass
class Subject:
    store: CounterStore
    records: RecordStream
    raw: Any = None


def charge_of(user: str, request_id: str, total: int = 7) -> Charge:
    return Charge(user, "premium", "m1", Usage(3, total - 3, total), request_id=request_id)


async def settle(store: CounterStore, c: Charge, now: int = NOW) -> bool:
    return await store.settle(
        [],
        ledger.entry_for(c, now),
        now,
        request_id=c.request_id,
        record=record.encode_charge(c, now),
    )


@pytest.fixture(params=["memory", "redis", "redis-py", "cluster"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    stream = ExportStreamConfig(key=BASE, maxlen=0)
    if request.param == "memory":
        records = MemoryRecords(BASE)
        yield Subject(MemoryStore(records=records), records)
        return
    if request.param == "cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        url = cluster.url
        raw: Any = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        # redis-py's client serves a URL the pipelined connection does not take (a query option).
        url = server.url + ("?health_check_interval=0" if request.param == "redis-py" else "")
        raw = Redis.from_url(server.url, decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=2.0), stream)
    assert (store._hot is None) == (request.param != "redis")  # the path under test
    records = redis_records(url, BASE, 5.0)
    yield Subject(store, records, raw)
    await store.close()
    await records.close()
    await raw.aclose()


async def read_all(reader: GroupReader) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while entries := await reader.next_batch(0):
        out += [record.decode(e.record) for e in entries]
        await reader.ack(entries)
    return out


async def test_an_applied_charge_adds_one_record_and_a_replay_none(subject: Subject) -> None:
    reader = GroupReader(subject.records, "g", "c1", from_start=True)
    users = ["bob", "alice", "carol{x}", "dave"]  # several slots on Cluster
    for n, user in enumerate(users):
        assert await settle(subject.store, charge_of(user, f"r{n}", 10 + n))
    assert not await settle(subject.store, charge_of("bob", "r0", 10))  # a replay: no record
    got = await read_all(reader)
    assert sorted((r["user"], r["request_id"], r["charged_tokens"]) for r in got) == sorted(
        (user, f"r{n}", 10 + n) for n, user in enumerate(users)
    )
    assert all(r["time_ms"] == NOW for r in got)
    await settle(subject.store, charge_of("bob", "r9"))
    assert [r["request_id"] for r in await read_all(reader)] == ["r9"]  # only what is new


async def test_a_cluster_writes_each_record_on_its_users_slot(
    redis_cluster: RedisClusterProcesses,
) -> None:
    url = redis_cluster.url
    raw = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(
        StoreConfig(url=Secret(url), timeout_s=2.0), ExportStreamConfig()
    )
    try:
        users = [f"user-{n}" for n in range(12)]
        for n, user in enumerate(users):
            assert await settle(store, charge_of(user, f"r{n}"))
        streams = await raw.smembers(keys.EXPORT_STREAMS_KEY)
        expected = {keys.export_stream_key(BASE, u, cluster=True) for u in users}
        assert streams == expected
        assert len(expected) > 1
        for user in users:
            stream = keys.export_stream_key(BASE, user, cluster=True)
            assert key_slot(stream.encode()) == key_slot(keys.ledger_key(user, "x").encode())
        assert sum([await raw.xlen(s) for s in streams]) == len(users)
    finally:
        await store.close()
        await raw.aclose()


async def test_no_record_without_the_switch(redis_server: RedisServer) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await raw.flushall()
    off = ExportStreamConfig(enabled=False)
    store = RedisStore.from_config(StoreConfig(url=Secret(redis_server.url)), off)
    try:
        assert await settle(store, charge_of("bob", "r1"))
        assert await raw.exists(BASE) == 0
        assert await raw.hgetall(keys.ledger_key("bob", ledger.day_of(NOW)))  # charged all the same
    finally:
        await store.close()
        await raw.aclose()


async def test_maxlen_trims_approximately_and_a_lagging_group_sees_gaps(
    redis_server: RedisServer,
) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(
        StoreConfig(url=Secret(redis_server.url)), ExportStreamConfig(maxlen=100)
    )
    records = redis_records(redis_server.url, BASE, 5.0)
    try:
        reader = GroupReader(records, "lagging", "c", from_start=True)
        assert await reader.next_batch(0) == []  # the group exists before any record
        for n in range(1000):
            await settle(store, charge_of("bob", f"r{n}"))
        length = await raw.xlen(BASE)
        assert 100 <= length < 300  # "~": whole macro nodes go, never below MAXLEN
        got = await read_all(reader)
        assert len(got) == length
        assert got[-1]["request_id"] == "r999"
    finally:
        await store.close()
        await records.close()
        await raw.aclose()


async def test_what_a_consumer_read_and_never_acknowledged_comes_again(subject: Subject) -> None:
    for n in range(5):
        await settle(subject.store, charge_of("bob", f"r{n}"))
    crashed = GroupReader(subject.records, "g", "c1", from_start=True, claim_idle_ms=0)
    first = await crashed.next_batch(0)
    assert len(first) == 5  # read, written nowhere, never acknowledged: the reader "crashed"
    again = GroupReader(subject.records, "g", "c1", claim_idle_ms=0)  # same consumer, restarted
    assert [e.id for e in await again.next_batch(0)] == [e.id for e in first]
    assert await again.next_batch(0) == []  # pending read once per run; nothing new


async def test_another_consumer_takes_over_what_an_idle_one_left(subject: Subject) -> None:
    for n in range(3):
        await settle(subject.store, charge_of("bob", f"r{n}"))
    gone = GroupReader(subject.records, "g", "replica-1", from_start=True)
    taken = await gone.next_batch(0)
    assert len(taken) == 3
    await asyncio.sleep(0.05)
    other = GroupReader(subject.records, "g", "replica-2", claim_idle_ms=20)
    claimed = await other.next_batch(0)
    assert [e.id for e in claimed] == [e.id for e in taken]
    await other.ack(claimed)
    assert await GroupReader(subject.records, "g", "replica-1", claim_idle_ms=0).next_batch(0) == []


async def test_a_slot_first_used_while_the_reader_was_away_is_read_whole(
    redis_cluster: RedisClusterProcesses,
) -> None:
    url = redis_cluster.url
    raw = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(
        StoreConfig(url=Secret(url), timeout_s=2.0), ExportStreamConfig()
    )
    records = redis_records(url, BASE, 5.0)
    try:
        await settle(store, charge_of("user-0", "first"))
        assert [
            r["request_id"] for r in await read_all(GroupReader(records, "g", "c", from_start=True))
        ] == ["first"]
        # The reader is away; new users bring records on slots whose streams did not exist.
        for n in range(1, 12):
            await settle(store, charge_of(f"user-{n}", f"r{n}"))
        back = await read_all(GroupReader(records, "g", "c"))  # the group exists: a restart
        assert sorted(r["request_id"] for r in back) == sorted(f"r{n}" for n in range(1, 12))
    finally:
        await store.close()
        await records.close()
        await raw.aclose()


async def test_a_settle_spanning_two_slots_adds_one_record_on_the_users(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """A shared budget's counter on another slot: its part of the settle carries no record."""
    raw = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(
        StoreConfig(url=Secret(redis_cluster.url), timeout_s=2.0), ExportStreamConfig()
    )
    shared = keys.tokens_key("team-budget", "shared")
    assert key_slot(shared.encode()) != key_slot(keys.ledger_key("bob", "x").encode())
    c = charge_of("bob", "span-1")
    adjustment = Adjustment(key=shared, window_ms=60_000, window_start_ms=-1, reserved=0, actual=7)
    try:
        for applied in (True, False):  # then a replay of the same settle
            assert (await subject_settle(store, c, [adjustment])) is applied
        streams = await raw.smembers(keys.EXPORT_STREAMS_KEY)
        assert streams == {keys.export_stream_key(BASE, "bob", cluster=True)}
        assert await raw.xlen(next(iter(streams))) == 1
        assert int(await raw.hget(shared, "v") or 0) == 7  # the other slot's part did apply
    finally:
        await store.close()
        await raw.aclose()


async def subject_settle(store: CounterStore, c: Charge, adjustments: list[Adjustment]) -> bool:
    return await store.settle(
        adjustments,
        ledger.entry_for(c, NOW),
        NOW,
        request_id=c.request_id,
        record=record.encode_charge(c, NOW),
    )


async def test_a_group_lost_with_the_data_is_made_again_and_nothing_new_is_skipped(
    redis_server: RedisServer,
) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(StoreConfig(url=Secret(redis_server.url)), ExportStreamConfig())
    records = redis_records(redis_server.url, BASE, 5.0)
    try:
        reader = GroupReader(records, "g", "c", from_start=True)
        await settle(store, charge_of("bob", "before"))
        assert [r["request_id"] for r in await read_all(reader)] == ["before"]
        await raw.flushall()  # what a Redis without persistence is after a restart
        await settle(store, charge_of("bob", "after"))
        got: list[dict[str, Any]] = []
        for _ in range(3):  # the first read meets NOGROUP; the next makes the group again
            got += await read_all(reader)
        assert [r["request_id"] for r in got] == ["after"]
    finally:
        await store.close()
        await records.close()
        await raw.aclose()


async def test_the_charger_prices_the_charge_before_its_record_is_written() -> None:
    from extproc.charger import Charger
    from extproc.config import LimitsConfig, parse
    from extproc.limits.limiter import Limiter
    from extproc.observability.metrics import Metrics

    prices = parse(
        {"pricing": {"default": {"input": "2.00", "output": "10.00"}}}, serving=False
    ).pricing
    records = MemoryRecords(BASE)
    limiter = Limiter(MemoryStore(records=records), LimitsConfig(), lambda: NOW, export=True)
    charger = Charger(limiter, Metrics(), prices=prices, wait_s=0)
    usage = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500, cached_tokens=0)
    await charger.charge(Charge("bob", "premium", "m1", usage, request_id="priced-1"))
    await charger.drain()
    got = await read_all(GroupReader(records, "g", "c", from_start=True))
    assert len(got) == 1
    # 1000 input tokens at 2.00 and 500 output at 10.00 per million: 0.002 + 0.005 = 7000 micros.
    assert (got[0]["cost_micros"], got[0]["priced"]) == (7000, True)
    assert got[0]["cached_tokens"] == 0
