"""Limits per (subscription, model): every rate of the model is one counter with its own reservation,
all admitted in one atomic step, on the memory store, a real Redis and a real Redis Cluster; the
reservation is swapped for the usage in each; the default deny refuses everything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from extproc.config import LimitsConfig, Secret, StoreConfig
from extproc.domain import Charge, Rate, Usage
from extproc.limits.limiter import Limiter, Verdict
from extproc.store import keys
from extproc.store.base import Attribution, CounterStore
from extproc.store.ledger import day_of
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from extproc.subscriptions.plans import DEFAULT_DENY
from tests.helpers import Clock

pytestmark = pytest.mark.redis

SUB = "models-as-a-service/premium-subscription"
MODEL = "llm/facebook-opt-125m-simulated"
# Two rates on one model, as a MaaSSubscription writes them: 300 a minute, 500 an hour.
RATES = (Rate(300, 60), Rate(500, 3600))
WHO = Attribution(SUB, "bob-ci", "org-demo", "cc-4242")


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    made: CounterStore
    raw: Any = None
    if request.param == "memory":
        made = MemoryStore()
    else:
        if request.param == "redis":
            url = request.getfixturevalue("redis_server").url
            raw = Redis.from_url(url)
        else:
            cluster = request.getfixturevalue("redis_cluster")
            url = cluster.url
            raw = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        await raw.flushall()
        made = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=2.0))
    yield made
    await made.close()
    if raw is not None:
        await raw.aclose()


def charge(verdict: Verdict, reserved: int, used: int, rid: str) -> Charge:
    return Charge(
        userid="bob",
        tier="",
        model=MODEL,
        usage=Usage(prompt_tokens=used, completion_tokens=0, total_tokens=used),
        reserved_tokens=reserved,
        token_windows=verdict.token_windows,
        request_id=rid,
        admitted_ms=verdict.admitted_ms,
        subscription=SUB,
        key_name="bob-ci",
        organization_id="org-demo",
        cost_center="cc-4242",
        rate_windows=tuple(r.window_s for r in RATES),
    )


async def test_every_rate_holds_its_own_reservation_and_the_tightest_refuses(
    store: CounterStore,
) -> None:
    clock = Clock()
    limiter = Limiter(store, LimitsConfig(), clock)
    first = await limiter.admit("bob", SUB, MODEL, 200, rates=RATES, attribution=WHO)
    assert first.allowed
    assert len(first.token_windows) == 2  # one counter per rate
    assert (first.kind, first.limit, first.remaining) == ("tokens", 300, 100)
    # 200 of 300 a minute held: the next one is admitted (200 < 300) and crosses the minute.
    second = await limiter.admit("bob", SUB, MODEL, 200, rates=RATES, attribution=WHO)
    assert second.allowed
    third = await limiter.admit("bob", SUB, MODEL, 1, rates=RATES, attribution=WHO)
    assert not third.allowed
    assert (third.kind, third.limit) == ("tokens", 300)
    # Settle both for their real usage: 50 each. Each counter is swapped on its own.
    for n, verdict in enumerate((first, second)):
        applied = await limiter.settle(charge(verdict, 200, 50, f"r{n}"))
        assert applied
    again = await limiter.admit("bob", SUB, MODEL, 150, rates=RATES, attribution=WHO)
    assert again.allowed
    assert again.remaining == 300 - 250  # the minute: 100 used + 150 held
    # A minute later the minute's counter starts over, the hour's does not: 250 of 500 held.
    clock.advance(61)
    hourly = await limiter.admit("bob", SUB, MODEL, 200, rates=RATES, attribution=WHO)
    assert hourly.allowed
    assert (hourly.limit, hourly.remaining) == (500, 500 - 450)
    crossing = await limiter.admit("bob", SUB, MODEL, 60, rates=RATES, attribution=WHO)
    assert crossing.allowed  # the minute at 260, the hour crossed at 510
    refused = await limiter.admit("bob", SUB, MODEL, 1, rates=RATES, attribution=WHO)
    assert not refused.allowed
    assert (refused.limit, refused.retry_after_s > 60) == (500, True)


async def test_a_refusal_takes_nothing_from_any_rate(store: CounterStore) -> None:
    limiter = Limiter(store, LimitsConfig(), Clock())
    tight = (Rate(1000, 3600), Rate(10, 60))  # the second rate is reached first
    assert (await limiter.admit("ann", SUB, MODEL, 10, rates=tight)).allowed
    for _ in range(3):
        refused = await limiter.admit("ann", SUB, MODEL, 10, rates=tight)
        assert not refused.allowed
    # All or nothing: the hour's counter holds the first admission only.
    probe = await limiter.admit("ann", SUB, MODEL, 0, rates=(Rate(10**9, 3600), Rate(10**9, 60)))
    assert probe.remaining == 10**9 - 10  # the hour's counter: only the admitted 10


async def test_concurrent_admissions_never_pass_a_rate_by_more_than_one_reservation(
    store: CounterStore,
) -> None:
    limiter = Limiter(store, LimitsConfig(), Clock())
    rates = (Rate(100, 60), Rate(150, 3600))
    verdicts = await asyncio.gather(
        *(limiter.admit("cy", SUB, MODEL, 30, rates=rates) for _ in range(20))
    )
    assert sum(v.allowed for v in verdicts) == 4  # 0, 30, 60, 90 are below 100; 120 is not


async def test_the_counters_are_per_user_subscription_and_model(store: CounterStore) -> None:
    limiter = Limiter(store, LimitsConfig(), Clock())
    one = (Rate(10, 60),)
    assert (await limiter.admit("dee", SUB, MODEL, 10, rates=one)).allowed
    assert not (await limiter.admit("dee", SUB, MODEL, 1, rates=one)).allowed
    assert (await limiter.admit("dee", SUB, "llm/other", 10, rates=one)).allowed
    assert (await limiter.admit("dee", "ns/other-sub", MODEL, 10, rates=one)).allowed
    assert (await limiter.admit("eli", SUB, MODEL, 10, rates=one)).allowed
    assert keys.subscription_tokens_key("dee", SUB, MODEL, 0, 60) != keys.subscription_tokens_key(
        "dee", SUB, MODEL, 1, 60
    )


async def test_the_default_deny_refuses_every_request(store: CounterStore) -> None:
    limiter = Limiter(store, LimitsConfig(), Clock())
    verdict = await limiter.admit("fay", "", "", 0, rates=DEFAULT_DENY)
    assert not verdict.allowed
    assert (verdict.kind, verdict.limit) == ("tokens", 0)


async def test_the_ledger_books_each_charge_to_its_subscription_and_key(
    store: CounterStore,
) -> None:
    clock = Clock()
    limiter = Limiter(store, LimitsConfig(), clock)
    verdict = await limiter.admit(
        "bob", SUB, MODEL, 200, rates=RATES, attribution=WHO, request_id="x1"
    )
    (held,) = await store.ledger("bob", [day_of(clock())])
    assert (held.unsettled_tokens, held.attribution) == (200, WHO)
    assert await limiter.settle(charge(verdict, 200, 42, "x1"))
    (row,) = await store.ledger("bob", [day_of(clock())])
    assert (row.model, row.total_tokens, row.requests, row.unsettled_tokens) == (MODEL, 42, 1, 0)
    assert row.attribution == WHO
