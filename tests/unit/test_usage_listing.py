"""Listing snapshots (reuse, expiry, eviction, one aggregation for concurrent first pages), their
sort orders, and the page token codec with hostile tokens."""

from __future__ import annotations

import asyncio
import base64

import pytest

from extproc.errors import ConfigError
from extproc.observability.usage_listing import SUMMED, PageToken, Query, SnapshotCache
from extproc.observability.usage_query import Filters, Row

Entries = list[tuple[tuple[str, ...], tuple[int, ...]]]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def query(route: str = "/v1/usage/users", model: str | None = None) -> Query:
    return Query(route, None, ("20260101",), Filters(model=model))


class Builds:
    """Aggregations handed to the cache: counts them, each answering a distinct listing."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> tuple[Entries, Row]:
        self.count += 1
        await self.gate.wait()
        width = len(SUMMED)  # only their order matters here
        entries: Entries = [
            (("bob",), (5,) * width),
            (("alice",), (5,) * width),
            (("carol",), (9,) * width),
        ]
        return entries, {"total_tokens": self.count}


async def test_a_snapshot_is_reused_while_fresh_then_taken_anew() -> None:
    clock, builds = Clock(), Builds()
    cache = SnapshotCache(fresh_s=10, keep_s=300, max_snapshots=4, clock=clock)
    first = await cache.take(query(), ("user",), builds)
    clock.now = 9
    assert await cache.take(query(), ("user",), builds) is first
    other = await cache.take(query(model="m"), ("user",), builds)
    assert other is not first
    clock.now = 21
    again = await cache.take(query(), ("user",), builds)
    assert again is not first
    assert builds.count == 3
    assert cache.find(first.id, query()) is first  # its page tokens still work
    assert cache.find(first.id, query(model="m")) is None  # only for its own query


async def test_tokens_expire_after_keep_s_without_a_read_and_the_oldest_go_first() -> None:
    clock, builds = Clock(), Builds()
    cache = SnapshotCache(fresh_s=10, keep_s=300, max_snapshots=2, clock=clock)
    kept = await cache.take(query(), ("user",), builds)
    clock.now = 200
    assert cache.find(kept.id, query()) is kept  # a read keeps it another keep_s
    clock.now = 450
    assert cache.find(kept.id, query()) is kept
    clock.now = 751
    assert cache.find(kept.id, query()) is None
    a = await cache.take(query(model="a"), ("user",), builds)
    b = await cache.take(query(model="b"), ("user",), builds)
    clock.now += 1
    assert cache.find(a.id, query(model="a")) is a  # a read: b is now the least recent
    await cache.take(query(model="c"), ("user",), builds)
    assert cache.find(b.id, query(model="b")) is None
    assert cache.find(a.id, query(model="a")) is a


async def test_concurrent_first_pages_share_one_aggregation() -> None:
    builds = Builds()
    builds.gate.clear()
    cache = SnapshotCache(clock=Clock())
    waiting = [asyncio.ensure_future(cache.take(query(), ("user",), builds)) for _ in range(5)]
    await asyncio.sleep(0.01)
    builds.gate.set()
    snapshots = await asyncio.gather(*waiting)
    assert builds.count == 1
    assert len({id(s) for s in snapshots}) == 1


async def test_sort_orders_with_ties_by_name() -> None:
    snapshot = await SnapshotCache(clock=Clock()).take(query(), ("user",), Builds())
    names = [snapshot.row(i)["user"] for i in snapshot.ordered("total_tokens", "asc")]
    assert names == ["alice", "bob", "carol"]
    names = [snapshot.row(i)["user"] for i in snapshot.ordered("total_tokens", "desc")]
    assert names == ["carol", "bob", "alice"]
    assert [snapshot.row(i)["user"] for i in snapshot.ordered("user", "asc")] == [
        "alice",
        "bob",
        "carol",
    ]


def test_a_token_round_trips() -> None:
    token = PageToken("ab" * 16, 300, "f" * 24)
    assert PageToken.decode(token.encode()) == token
    assert "=" not in token.encode()


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "!!!",
        b64("{}"),
        b64("[1, 2, 3]"),
        b64('[2, "s", 0, "f"]'),  # another version
        b64('[1, "s", -1, "f"]'),
        b64('[1, "s", 1.5, "f"]'),
        b64('[1, "s", true, "f"]'),
        b64('[1, "s", 10000000000, "f"]'),
        b64('[1, 7, 0, "f"]'),
        b64("[" * 100_000),  # deeper than the JSON parser recurses
        b64('"\\ud800"'),
        "\u00e9t\u00e9",
    ],
)
def test_hostile_tokens_are_config_errors_naming_page_token(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        PageToken.decode(value)
    assert raised.value.key == "page_token"
