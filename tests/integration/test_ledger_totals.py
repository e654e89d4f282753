"""Each ledger hash's totals (what listings of every user read, ``ledger_totals``) add up to the
same amounts as its rows, on the memory store, a Redis server and a Redis Cluster; hashes that
may predate the totals are read in full."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.config import Secret, StoreConfig
from extproc.errors import StoreUnavailable
from extproc.store import keys, ledger
from extproc.store.base import NO_ATTRIBUTION, Attribution, Hold, LedgerEntry, LedgerRow
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.integration.test_store_contract import RETENTION_DAYS, Subject, _redis_subject
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis

T0 = 1_700_000_040_000
DAY = "20231114"  # the day of T0
EARLIER = "20231113"
BOOKED = Attribution("ns/sub", "alice-ci", "org-1", "cc-1")


async def made(kind: str, request: pytest.FixtureRequest) -> Subject:
    if kind == "memory":
        return Subject("memory", MemoryStore(retention_days=RETENTION_DAYS))
    subject = await _redis_subject(kind, request)
    await subject.raw.set(keys.ledger_totals_since_key(), EARLIER)  # as start() would have
    return subject


@pytest.fixture(params=["memory", "redis", "cluster"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    subject = await made(request.param, request)
    yield subject
    await subject.store.close()
    if subject.raw is not None:
        await subject.raw.aclose()


@pytest.fixture(params=["redis", "cluster"])
async def redis_subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    subject = await made(request.param, request)
    yield subject
    await subject.store.close()
    await subject.raw.aclose()


AMOUNTS = [f.name for f in dataclasses.fields(LedgerRow) if f.type == "int"]


def sums(rows: list[LedgerRow]) -> dict[str, int]:
    return {name: sum(int(getattr(row, name)) for row in rows) for name in AMOUNTS}


async def test_the_totals_add_up_to_the_rows(subject: Subject) -> None:
    store = subject.store
    entries = [
        LedgerEntry("alice", DAY, "opt", 10, 5, 15, 0),
        LedgerEntry("alice", DAY, "llama", 1, 2, 3, 3, attribution=BOOKED),
        LedgerEntry("alice", DAY, "opt", 7, 1, 8, 0, cached_tokens=4, cached_reported=1,
                    cost_micros=1234, priced_requests=1),
        LedgerEntry("bob", DAY, "opt", 100, 50, 150, 0, attribution=BOOKED),
    ]  # fmt: skip
    for entry in entries:
        await store.settle([], entry, T0)
    await store.admit([], T0, Hold("alice", DAY, "opt", 40))
    await store.admit([], T0, Hold("bob", DAY, "llama", 9, BOOKED))
    await store.settle([], None, T0, release=Hold("bob", DAY, "llama", 9, BOOKED))
    users, days = ["alice", "bob", "carol"], [EARLIER, DAY]
    totals = await store.ledger_totals(users, days)
    full = await store.ledgers(users, days)
    for user, summed, rows in zip(users, totals, full, strict=True):
        assert sums(summed) == sums(rows) == sums(await store.ledger(user, days)), user
        assert all(row.model == "" for row in summed)  # one totals row a user
    assert sums(totals[0])["unsettled_tokens"] == 40
    assert sums(totals[0])["cost_micros"] == 1234
    assert totals[2] == []


async def test_hashes_before_the_totals_are_read_in_full(redis_subject: Subject) -> None:
    subject = redis_subject
    # A hash an older version wrote on an earlier day: its model fields only, no totals.
    old = LedgerEntry("alice", "20231112", "opt", 10, 5, 15, 0)
    pairs = ledger.entry_fields(old)
    for field, amount in pairs:
        if not keys.is_ledger_total(field):
            await subject.raw.hincrby(keys.ledger_key("alice", old.day), field, amount)
    (rows,) = await subject.store.ledger_totals(["alice"], ["20231112", DAY])
    assert sums(rows)["total_tokens"] == 15
    assert [row.model for row in rows] == ["opt"]


async def test_the_first_start_trusts_the_totals_from_the_next_day(redis_subject: Subject) -> None:
    subject = redis_subject
    assert isinstance(subject.store, RedisStore)
    await subject.raw.delete(keys.ledger_totals_since_key())
    await subject.store.start()
    since = await subject.raw.get(keys.ledger_totals_since_key())
    assert since > ledger.day_of(T0)  # tomorrow, by the machine's clock
    await subject.raw.set(keys.ledger_totals_since_key(), "20231101")
    await subject.store.start()  # a later start never moves it
    assert await subject.raw.get(keys.ledger_totals_since_key()) == "20231101"
    await subject.raw.set(keys.ledger_totals_since_key(), "garbage")
    await subject.store.settle([], LedgerEntry("alice", DAY, "opt", 1, 1, 2, 0), T0)
    (rows,) = await subject.store.ledger_totals(["alice"], [DAY])
    assert [row.model for row in rows] == ["opt"]  # an unreadable day: every hash in full


def test_no_model_field_is_a_totals_field() -> None:
    for model in ("", "unknown", "a|b", "total", "%7C"):
        for kind in (*keys.LEDGER_KINDS, ledger.UNSETTLED, ledger.OPEN):
            assert not keys.is_ledger_total(keys.ledger_field(model, kind))
            assert not keys.is_ledger_total(keys.ledger_field(model, kind, BOOKED.parts()))
    assert NO_ATTRIBUTION.parts() == ()


async def test_bulk_reads_time_out_reconnect_and_authenticate(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """The listings' own socket (store/bulk.py): a hung server is a timeout, a restarted one is
    reconnected to, and a password and a database are used."""
    url = f"redis://127.0.0.1:{own_redis_server.port}/3"
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=0.3))
    await store.settle([], LedgerEntry("alice", DAY, "opt", 1, 1, 2, 0), T0)
    assert [row.total_tokens for row in await store.ledger("alice", [DAY])] == [2]
    process = own_redis_server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await store.ledgers(["alice"], [DAY])
    finally:
        process.send_signal(signal.SIGCONT)
    assert [row.total_tokens for row in await store.ledger("alice", [DAY])] == [2]
    own_redis_server.restart()  # no persistence: the hash is gone, the socket too
    assert await store.ledger("alice", [DAY]) == []
    await store.close()

    password = "bulk-Pa55"
    server = RedisServer(tmp_path / "auth", 0, "--requirepass", password)
    server.start()
    try:
        good = RedisStore.from_config(
            StoreConfig(url=Secret(f"redis://:{password}@127.0.0.1:{server.port}/2"), timeout_s=1)
        )
        await good.settle([], LedgerEntry("bob", DAY, "opt", 3, 1, 4, 0), T0)
        assert [row.total_tokens for row in await good.ledger("bob", [DAY])] == [4]
        await good.close()
        wrong = RedisStore.from_config(
            StoreConfig(url=Secret(f"redis://:nope@127.0.0.1:{server.port}/2"), timeout_s=1)
        )
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.ledger("bob", [DAY])
        assert password not in str(refused.value)
        await wrong.close()
    finally:
        server.stop()
