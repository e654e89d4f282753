"""One CounterStore contract, run against the memory store, a real Redis and a real Redis Cluster."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from extproc.config import Secret, StoreConfig
from extproc.store import keys
from extproc.store.base import (
    Adjustment,
    AdmitResult,
    Attribution,
    CounterState,
    CounterStore,
    Hold,
    LedgerEntry,
    LedgerRow,
    WindowCounter,
)
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore

pytestmark = pytest.mark.redis

T0 = 1_700_000_040_000  # a whole minute, so sliding buckets of 1 s and 60 s start here
DAY = "20231114"  # the UTC day of T0
RETENTION_DAYS = 2


@dataclass
class Subject:
    kind: str
    store: CounterStore
    raw: Any = None  # a plain redis client on the same server, for TTL checks


async def _redis_subject(kind: str, request: pytest.FixtureRequest) -> Subject:
    if kind == "redis":
        url = request.getfixturevalue("redis_server").url
        raw: Any = Redis.from_url(url, decode_responses=True)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        raw = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
        url = cluster.url
    await raw.flushall()
    config = StoreConfig(url=Secret(url), retention_days=RETENTION_DAYS, timeout_s=2.0)
    return Subject(kind, RedisStore.from_config(config), raw)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        # Its request states expire on the caller's clock, which these tests move by days.
        store = MemoryStore(retention_days=RETENTION_DAYS, dedupe_ttl_ms=2 * 86_400_000)
        made = Subject("memory", store)
    else:
        made = await _redis_subject(request.param, request)
    yield made
    await made.store.close()
    if made.raw is not None:
        await made.raw.aclose()


def key(name: str = "tok", user: str = "alice") -> str:
    return keys.tokens_key(user, "free", name)


def counter(
    limit: int, hits: int, window_ms: int = 1000, name: str = "tok", sliding: bool = False
) -> WindowCounter:
    return WindowCounter(key(name), limit, window_ms, hits, sliding)


async def value_of(store: CounterStore, name: str, now_ms: int, **kw: Any) -> CounterState:
    """Read a counter by admitting 0 hits under a limit it cannot reach."""
    result = await store.admit([counter(10**12, 0, name=name, **kw)], now_ms)
    return result.states[0]


async def test_admit_is_all_or_nothing(subject: Subject) -> None:
    store = subject.store
    first = await store.admit([counter(10, 1, name="a"), counter(5, 5, name="b")], T0)
    assert first == AdmitResult(True, (CounterState(1, T0, 1000), CounterState(5, T0, 1000)))

    second = await store.admit([counter(10, 1, name="a"), counter(5, 5, name="b")], T0 + 100)
    assert not second.allowed
    assert second.denied_index == 1
    assert second.states == (CounterState(2, T0, 900), CounterState(5, T0, 900))
    assert (await value_of(store, "a", T0 + 200)).value == 1  # the denied admission added nothing


async def test_denies_once_the_value_reaches_the_limit(subject: Subject) -> None:
    store = subject.store
    values = [(await store.admit([counter(3, 1)], T0 + i)).states[0].value for i in range(3)]
    assert values == [1, 2, 3]
    denied = await store.admit([counter(3, 1)], T0 + 250)
    assert denied == AdmitResult(False, (CounterState(3, T0, 750),), 0)

    # A reservation bigger than the room left still passes while the value is under the limit.
    assert (await store.admit([counter(100, 98, name="big")], T0)).allowed
    crossing = await store.admit([counter(100, 50, name="big")], T0 + 1)
    assert crossing.allowed
    assert crossing.states[0].value == 148
    assert not (await store.admit([counter(100, 1, name="big")], T0 + 2)).allowed


async def test_fixed_window_starts_at_first_hit_and_resets_after_it(subject: Subject) -> None:
    store = subject.store
    start = T0 + 123  # not aligned: the window starts at the first hit
    assert (await store.admit([counter(2, 1)], start)).states[0] == CounterState(1, start, 1000)
    assert (await store.admit([counter(2, 1)], start + 400)).states[0] == CounterState(
        2, start, 600
    )
    assert (await store.admit([counter(2, 1)], start + 999)).states[0] == CounterState(2, start, 1)
    fresh = await store.admit([counter(2, 1)], start + 1000)
    assert fresh == AdmitResult(True, (CounterState(1, start + 1000, 1000),))


async def test_settle_in_the_same_window_moves_by_actual_minus_reserved(subject: Subject) -> None:
    store = subject.store
    admitted = await store.admit([counter(100, 50)], T0)
    window_start = admitted.states[0].window_start_ms
    await store.settle([Adjustment(key(), 1000, window_start, 50, 20)], None, T0 + 10)
    assert (await value_of(store, "tok", T0 + 20)).value == 20
    await store.settle([Adjustment(key(), 1000, window_start, 50, 70)], None, T0 + 30)
    assert (await value_of(store, "tok", T0 + 40)).value == 40
    await store.settle([Adjustment(key(), 1000, window_start, 500, 0)], None, T0 + 50)
    assert (await value_of(store, "tok", T0 + 60)).value == 0  # never below zero


async def test_settle_after_the_window_rolled_charges_actual_to_the_new_one(
    subject: Subject,
) -> None:
    store = subject.store
    await store.admit([counter(100, 50)], T0)
    await store.settle([Adjustment(key(), 1000, T0, 50, 30)], None, T0 + 1500)
    assert await value_of(store, "tok", T0 + 1600) == CounterState(30, T0 + 1500, 900)

    # Another request opened a newer window: the late charge lands in it, whole.
    await store.admit([counter(100, 50, name="other")], T0)
    await store.admit([counter(100, 10, name="other")], T0 + 1200)
    await store.settle([Adjustment(key("other"), 1000, T0, 50, 30)], None, T0 + 1300)
    assert (await value_of(store, "other", T0 + 1400)).value == 40

    # Not admitted at all (no window start): actual goes to the current window.
    await store.settle([Adjustment(key("late"), 1000, -1, 0, 7)], None, T0 + 5000)
    assert await value_of(store, "late", T0 + 5001) == CounterState(7, T0 + 5000, 999)


async def test_sliding_windows_weigh_the_previous_bucket(subject: Subject) -> None:
    store = subject.store
    sliding = {"sliding": True}
    first = await store.admit([counter(100, 60, sliding=True)], T0 + 100)
    assert first.states[0] == CounterState(60, T0, 900)  # aligned bucket, reset at its end
    # 25 % into the next bucket: 75 % of the previous one is still in view.
    second = await store.admit([counter(100, 10, sliding=True)], T0 + 1250)
    assert second.states[0] == CounterState(45 + 10, T0 + 1000, 750)
    assert (await value_of(store, "tok", T0 + 1900, **sliding)).value == 10 + 6
    denied = await store.admit([counter(55, 1, sliding=True)], T0 + 1250)
    assert denied == AdmitResult(False, (CounterState(55, T0 + 1000, 750),), 0)
    # Two buckets on, the first has left the view entirely.
    assert (await value_of(store, "tok", T0 + 2500, **sliding)).value == 5  # floor(10 * 0.5)


async def test_sliding_settle(subject: Subject) -> None:
    store = subject.store
    admitted = await store.admit([counter(100, 40, sliding=True)], T0 + 100)
    start = admitted.states[0].window_start_ms
    await store.settle([Adjustment(key(), 1000, start, 40, 10, sliding=True)], None, T0 + 600)
    assert (await value_of(store, "tok", T0 + 700, sliding=True)).value == 10
    # Next bucket: the reserved bucket is still kept (2 windows), so it is adjusted in place.
    await store.admit([counter(100, 40, sliding=True, name="s2")], T0 + 100)
    await store.settle([Adjustment(key("s2"), 1000, T0, 40, 20, sliding=True)], None, T0 + 1500)
    assert (await value_of(store, "s2", T0 + 1500, sliding=True)).value == 10  # floor(20 * .5)
    # Two windows on, the reserved bucket is gone: actual goes to the current bucket.
    await store.admit([counter(100, 40, sliding=True, name="s3")], T0 + 100)
    await store.settle([Adjustment(key("s3"), 1000, T0, 40, 25, sliding=True)], None, T0 + 2100)
    assert await value_of(store, "s3", T0 + 2200, sliding=True) == CounterState(25, T0 + 2000, 800)


def entry(user: str, model: str, total: int, day: str = DAY, estimated: int = 0) -> LedgerEntry:
    return LedgerEntry(user, day, model, total - 1, 1, total, estimated)


async def test_ledger_rows_and_users(subject: Subject) -> None:
    store = subject.store
    await store.settle([], entry("alice", "granite", 10), T0)
    await store.settle([], entry("alice", "granite", 5, estimated=5), T0 + 1)
    await store.settle([], entry("alice", "llama", 7), T0 + 2)
    await store.settle([], entry("alice", "llama", 3, day="20231115"), T0 + 86_400_000)
    await store.settle([], entry("bob", "granite", 1), T0 + 3)

    rows = await store.ledger("alice", [DAY, "20231115", "20231116"])
    assert rows == [
        LedgerRow(DAY, "granite", 13, 2, 15, 5, 2),
        LedgerRow(DAY, "llama", 6, 1, 7, 0, 1),
        LedgerRow("20231115", "llama", 2, 1, 3, 0, 1),
    ]
    assert await store.ledger("carol", [DAY]) == []
    assert await store.ledger_users([DAY]) == ["alice", "bob"]
    assert await store.ledger_users([DAY, "20231115"]) == ["alice", "bob"]
    assert await store.ledger_users(["20231115"]) == ["alice"]
    assert await store.ledger_users(["20231116"]) == []


async def test_ledger_keeps_token_kinds_cost_and_what_was_reported(subject: Subject) -> None:
    """Issue #16: the informational kinds and the cost add up per row; the ``*_reported`` counts
    keep "reported 0" apart from "not reported"; an entry without them leaves them at 0."""
    store = subject.store
    booked = Attribution("ns/gold", "key-1", "org", "cc")
    kinds = LedgerEntry(
        "alice", DAY, "granite", 100, 50, 150, 0,
        attribution=booked, cached_tokens=60, cache_creation_tokens=10, reasoning_tokens=20,
        cost_micros=2**53 + 1, cached_reported=1, cache_creation_reported=1,
        reasoning_reported=1, priced_requests=1,
    )  # fmt: skip
    zeros = replace(
        kinds, cached_tokens=0, cache_creation_tokens=0, reasoning_tokens=0, cost_micros=7,
        cache_creation_reported=0, reasoning_reported=0,
    )  # fmt: skip
    await store.settle([], kinds, T0, request_id="r1")
    await store.settle([], zeros, T0 + 1, request_id="r2")
    await store.settle([], kinds, T0 + 2, request_id="r1")  # a replay changes nothing
    await store.settle([], entry("alice", "granite", 4), T0 + 3)  # tier era: nothing reported
    rows = await store.ledger("alice", [DAY])
    assert rows == [
        LedgerRow(DAY, "granite", 3, 1, 4, 0, 1),
        LedgerRow(
            DAY, "granite", 200, 100, 300, 0, 2,
            attribution=booked, cached_tokens=60, cache_creation_tokens=10, reasoning_tokens=20,
            cost_micros=2**53 + 8, cached_reported=2, cache_creation_reported=1,
            reasoning_reported=1, priced_requests=2,
        ),
    ]  # fmt: skip


async def test_settle_adjusts_and_records_together(subject: Subject) -> None:
    store = subject.store
    admitted = await store.admit([counter(100, 50)], T0)
    await store.settle(
        [Adjustment(key(), 1000, admitted.states[0].window_start_ms, 50, 12)],
        entry("alice", "granite", 12),
        T0 + 5,
    )
    assert (await value_of(store, "tok", T0 + 6)).value == 12
    assert await store.ledger("alice", [DAY]) == [LedgerRow(DAY, "granite", 11, 1, 12, 0, 1)]


async def test_retention(subject: Subject) -> None:
    store = subject.store
    day_end = T0 - T0 % 86_400_000 + 86_400_000  # end of DAY, UTC
    keep_until = day_end + RETENTION_DAYS * 86_400_000
    if subject.raw is None:
        await store.settle([], entry("alice", "granite", 10), T0)
        await store.settle([], entry("bob", "granite", 1, day="20231116"), keep_until - 1)
        assert await store.ledger_users([DAY]) == ["alice"]
        await store.settle([], entry("bob", "granite", 1, day="20231117"), keep_until)
        assert await store.ledger("alice", [DAY]) == []
        assert await store.ledger_users([DAY]) == []
        return
    # Redis drops the day with a TTL; the caller's clock (not the server's) sets its length.
    now = keep_until - 60_000
    await store.admit([counter(100, 1), counter(100, 1, name="slide", sliding=True)], now)
    await store.settle([], entry("alice", "granite", 10), now)
    raw = subject.raw
    ledger_ttl = await raw.pttl(keys.ledger_key("alice", DAY))
    users_ttl = await raw.pttl(keys.ledger_users_key(DAY))
    assert 50_000 < ledger_ttl <= 60_000
    assert 50_000 < users_ttl <= 60_000
    assert 0 < await raw.pttl(key()) <= 1000  # a fixed window lives one window
    bucket = keys.sliding_bucket_key(key("slide"), now // 1000)
    assert 1000 < await raw.pttl(bucket) <= 2000  # a sliding bucket lives two


async def test_a_settle_lands_once_per_request_id(subject: Subject) -> None:
    store = subject.store
    admitted = await store.admit([counter(1000, 50)], T0)
    start = admitted.states[0].window_start_ms
    adjustment = Adjustment(key(), 1000, start, 50, 12)
    assert await store.settle([adjustment], entry("alice", "granite", 12), T0 + 5, request_id="r1")
    # A replay of the same settle (its first reply was lost) changes nothing.
    replayed = await store.settle(
        [adjustment], entry("alice", "granite", 12), T0 + 6, request_id="r1"
    )
    assert replayed is False
    assert (await value_of(store, "tok", T0 + 7)).value == 12
    assert await store.ledger("alice", [DAY]) == [LedgerRow(DAY, "granite", 11, 1, 12, 0, 1)]
    # Another request's settle, and one without an id, still land.
    assert await store.settle([], entry("alice", "granite", 3), T0 + 8, request_id="r2")
    assert await store.settle([], entry("alice", "granite", 3), T0 + 9)
    assert [r.requests for r in await store.ledger("alice", [DAY])] == [3]
    if subject.raw is not None:
        marker_ttl = await subject.raw.pttl(keys.request_key("alice", "r1"))
        assert 3_500_000 < marker_ttl <= 3_600_000  # the default store.dedupe_ttl_s


async def test_a_hold_stays_unsettled_until_its_settle_releases_it(subject: Subject) -> None:
    store = subject.store
    hold = Hold("alice", DAY, "granite", 40)
    assert (await store.admit([counter(1000, 40)], T0, hold, request_id="a")).allowed
    assert (await store.admit([], T0 + 1, Hold("alice", DAY, "granite", 7))).allowed
    # A refused admission holds nothing.
    assert (await store.admit([counter(1, 1, name="full")], T0 + 2)).allowed
    assert not (await store.admit([counter(1, 1, name="full")], T0 + 2, hold)).allowed
    assert await store.ledger("alice", [DAY]) == [LedgerRow(DAY, "granite", 0, 0, 0, 0, 0, 47, 2)]
    assert await store.ledger_users([DAY]) == ["alice"]
    # Settled the next day: the usage lands on that day, the hold comes off the admission day.
    next_day = T0 + 86_400_000
    await store.settle(
        [], entry("alice", "granite", 9, day="20231115"), next_day, request_id="a", release=hold
    )
    assert await store.ledger("alice", [DAY, "20231115"]) == [
        LedgerRow(DAY, "granite", 0, 0, 0, 0, 0, 7, 1),
        LedgerRow("20231115", "granite", 8, 1, 9, 0, 1),
    ]
    # A replay releases nothing twice.
    await store.settle(
        [], entry("alice", "granite", 9, day="20231115"), next_day, request_id="a", release=hold
    )
    assert (await store.ledger("alice", [DAY]))[0].unsettled_tokens == 7


async def test_an_admission_that_ran_late_is_released_or_void(subject: Subject) -> None:
    """The caller gave up on an admission (a timeout) and let the request through: whether Redis
    ran it before or after the settle, nothing stays held."""
    store = subject.store
    hold = Hold("alice", DAY, "granite", 30)
    # It ran, just too late for the caller: the settle finds it held and releases it.
    assert (await store.admit([counter(1000, 30)], T0, hold, request_id="late")).allowed
    await store.settle([], entry("alice", "granite", 5), T0 + 1, request_id="late", release=hold)
    # It runs only after the settle: void, nothing counted, nothing held.
    await store.settle([], entry("alice", "granite", 6), T0 + 2, request_id="later", release=hold)
    late = await store.admit([counter(1000, 30)], T0 + 3, hold, request_id="later")
    assert late.allowed
    assert (await value_of(store, "tok", T0 + 4)).value == 30  # only the first admission's hits
    assert await store.ledger("alice", [DAY]) == [LedgerRow(DAY, "granite", 9, 2, 11, 0, 2)]
    # Never admitted at all (the store was down): its settle releases nothing.
    await store.settle([], entry("alice", "granite", 1), T0 + 5, request_id="never", release=hold)
    assert (await store.ledger("alice", [DAY]))[0].unsettled_tokens == 0


# ----------------------------------------------------------- the same random history, both stores


@pytest.fixture(params=["redis", "cluster"])
async def redis_subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    made = await _redis_subject(request.param, request)
    yield made
    await made.store.close()
    await made.raw.aclose()


async def test_redis_matches_the_memory_store_on_random_histories(redis_subject: Subject) -> None:
    subject = redis_subject
    for seed in range(3):
        await subject.raw.flushall()
        reference = MemoryStore(retention_days=RETENTION_DAYS)
        await _replay_random_history(random.Random(seed), reference, subject.store)


async def _replay_random_history(rng: random.Random, memory: MemoryStore, other: Any) -> None:
    now = T0
    names = ["a", "b", "c"]
    open_reservations: list[tuple[str, int, int, int, bool]] = []
    for step in range(150):
        now += rng.choice([0, 1, 37, 250, 600, 999, 1000, 1700])
        sliding = rng.random() < 0.5
        window = 1000 if sliding else rng.choice([1000, 1500])
        if rng.random() < 0.6 or not open_reservations:
            picked = rng.sample(names, rng.randint(1, 2))
            counters = [
                WindowCounter(
                    key(f"{n}{int(sliding)}{window}"),
                    rng.choice([1, 50, 100]),
                    window,
                    rng.choice([0, 1, 20, 60]),
                    sliding,
                )
                for n in picked
            ]
            hold = Hold("alice", DAY, rng.choice(["m1", "m2"]), rng.randint(0, 60))
            rid = f"a{step}"
            expected = await memory.admit(counters, now, hold, request_id=rid)
            got = await other.admit(counters, now, hold, request_id=rid)
            assert got == expected, f"admit step {step}"
            if expected.allowed:
                for c, state in zip(counters, expected.states, strict=True):
                    open_reservations.append(
                        (c.key, c.window_ms, state.window_start_ms, c.hits, c.sliding, hold, rid)
                    )
        else:
            k, window_ms, start, reserved, was_sliding, hold, rid = open_reservations.pop(
                rng.randrange(len(open_reservations))
            )
            adjustment = Adjustment(k, window_ms, start, reserved, rng.randint(0, 80), was_sliding)
            ledger = entry("alice", rng.choice(["m1", "m2"]), rng.randint(0, 9))
            request_id = rid if rng.random() < 0.5 else f"r{step}"
            for _ in range(rng.choice([1, 1, 2])):  # now and then a replay of the same settle
                applied = await memory.settle(
                    [adjustment], ledger, now, request_id=request_id, release=hold
                )
                assert applied == await other.settle(
                    [adjustment], ledger, now, request_id=request_id, release=hold
                ), f"settle step {step}"
    assert await other.ledger("alice", [DAY]) == await memory.ledger("alice", [DAY])


# User ids an API-keys file or a token may carry: brace look-alikes, escape look-alikes, the
# separator, empty-ish and unicode. Each must get keys of its own, all in one Cluster slot.
HOSTILE_USERS = [
    "a{b", "a(b", "a}b", "a)b", "a%7Bb", "a%7bb", "{", "}", "{}", "{a}", "%", "%25",
    ":", "a:b", "a", "", " ", "\t", "\x00", "a\nb", "é", "e\u0301", "\u2028", "ユーザー",
]  # fmt: skip


def user_keys(user: str) -> list[str]:
    return [
        keys.requests_key(user, "free"),
        keys.tokens_key(user, "free"),
        keys.tokens_key(user, "free", "granite"),
        keys.sliding_bucket_key(keys.tokens_key(user, "free"), 7),
        keys.ledger_key(user, DAY),
    ]


def test_hostile_user_ids_never_share_a_key() -> None:
    every = [key for user in HOSTILE_USERS for key in user_keys(user)]
    assert len(set(every)) == len(every)
    for user in HOSTILE_USERS:  # the hash tag is the user's part, whole: never empty, no braces
        tag = keys.tokens_key(user, "free").split("{", 1)[1].split("}", 1)[0]
        assert tag
        assert "{" not in tag


async def test_hostile_user_ids_get_counters_and_ledgers_of_their_own(subject: Subject) -> None:
    store = subject.store
    for hits, user in enumerate(HOSTILE_USERS, start=1):
        counters = [WindowCounter(key, 10**6, 60_000, hits) for key in user_keys(user)[:3]]
        assert (await store.admit(counters, T0)).allowed
        await store.settle([], entry(user, "granite", hits), T0)
    for hits, user in enumerate(HOSTILE_USERS, start=1):
        probe = WindowCounter(keys.tokens_key(user, "free"), 10**6, 60_000, 0)
        assert (await store.admit([probe], T0 + 1)).states[0].value == hits, repr(user)
        (row,) = await store.ledger(user, [DAY])
        assert row.total_tokens == hits, repr(user)
    assert sorted(await store.ledger_users([DAY])) == sorted(HOSTILE_USERS)
    if subject.kind == "cluster":
        for user in HOSTILE_USERS:
            slots = {await subject.raw.cluster_keyslot(key) for key in user_keys(user)}
            assert len(slots) == 1, (user, slots)


async def test_a_model_name_with_the_field_separator_round_trips(subject: Subject) -> None:
    store = subject.store
    await store.settle([], entry("alice", "a|prompt", 10), T0)
    await store.settle([], entry("alice", "a", 20), T0)
    await store.settle([], entry("alice", "|", 30), T0)
    rows = {row.model: row.total_tokens for row in await store.ledger("alice", [DAY])}
    assert rows == {"a|prompt": 10, "a": 20, "|": 30}
