"""Budgets through the limiter on the memory store, a real Redis and a real Redis Cluster, with an
injected clock: calendar periods in a time zone (a month boundary, a DST day), shared group
budgets, cost, shadow mode, and the Cluster path's give-back when one slot refuses."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from extproc.accounting.pricing import ModelPrices, PriceBook, Prices
from extproc.config import LimitsConfig, Secret, StoreConfig
from extproc.domain import Charge, Limits, Rate, Usage
from extproc.limits.alerts import BudgetAlerts
from extproc.limits.budgets import AlertsConfig, parse_budgets
from extproc.limits.limiter import Limiter, Verdict
from extproc.observability.metrics import Metrics
from extproc.store import keys
from extproc.store.base import Attribution, CounterStore
from extproc.store.ledger import day_of
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.helpers import Clock

pytestmark = pytest.mark.redis

MODEL = "facebook/opt-125m"


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


@dataclasses.dataclass
class Subject:
    kind: str
    store: CounterStore
    raw: Any = None


@pytest.fixture(params=["memory", "redis", "cluster"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        made = Subject("memory", MemoryStore(dedupe_ttl_ms=40 * 86_400_000))
    else:
        raw: Any
        if request.param == "redis":
            url = request.getfixturevalue("redis_server").url
            raw = Redis.from_url(url, decode_responses=True)
        else:
            cluster = request.getfixturevalue("redis_cluster")
            url = cluster.url
            raw = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
        await raw.flushall()
        config = StoreConfig(url=Secret(url), timeout_s=2.0, dedupe_ttl_s=40 * 86_400)
        made = Subject(request.param, RedisStore.from_config(config), raw)
    yield made
    await made.store.close()
    if made.raw is not None:
        await made.raw.aclose()


def limits(*budgets: dict[str, Any], tokens: int = 0) -> LimitsConfig:
    tiers = {"free": Limits(tokens=tokens, tokens_window_s=60)}
    return LimitsConfig(tiers=tiers, budgets=parse_budgets(list(budgets)))


def charge(user: str, verdict: Verdict, used: int, rid: str, **kw: Any) -> Charge:
    return Charge(
        userid=user,
        tier="free",
        model=MODEL,
        usage=Usage(prompt_tokens=used // 2, completion_tokens=used - used // 2, total_tokens=used),
        reserved_tokens=verdict.reserved_tokens,
        token_windows=verdict.token_windows,
        request_id=rid,
        admitted_ms=verdict.admitted_ms,
        budgets_held=verdict.budgets_held,
        budget_groups=verdict.budget_groups,
        **kw,
    )


MONTHLY_PARIS = {
    "name": "monthly",
    "limit": 1000,
    "period": "month",
    "time_zone": "Europe/Paris",
}


async def test_a_monthly_quota_refuses_until_the_month_ends_in_its_time_zone(
    subject: Subject,
) -> None:
    clock = Clock(ms("2026-01-31T22:00:00+00:00"))  # 23:00 in Paris, still January there
    limiter = Limiter(subject.store, limits(MONTHLY_PARIS), clock)
    first = await limiter.admit("alice", "free", MODEL, 600, request_id="a1")
    assert first.allowed
    assert first.budgets_held
    assert await limiter.settle(charge("alice", first, 1000, "a1"))
    refused = await limiter.admit("alice", "free", MODEL, 10, request_id="a2")
    assert (refused.allowed, refused.kind, refused.budget) == (False, "budget", "monthly")
    assert refused.retry_after_s == 3600  # midnight in Paris
    assert refused.limit == 1000
    clock.now_ms = ms("2026-01-31T23:00:01+00:00")  # February in Paris, January in UTC
    again = await limiter.admit("alice", "free", MODEL, 10, request_id="a3")
    assert again.allowed
    assert (again.limit, again.remaining) == (1000, 990)


async def test_a_reservation_settled_after_its_month_charges_the_new_month(
    subject: Subject,
) -> None:
    clock = Clock(ms("2026-01-31T22:59:00+00:00"))
    limiter = Limiter(subject.store, limits(MONTHLY_PARIS), clock)
    january = await limiter.admit("alice", "free", MODEL, 900, request_id="b1")
    clock.now_ms = ms("2026-01-31T23:01:00+00:00")  # the response ends in February
    assert await limiter.settle(charge("alice", january, 400, "b1"))
    february = await limiter.admit("alice", "free", MODEL, 100, request_id="b2")
    assert (february.allowed, february.remaining) == (True, 1000 - 400 - 100)


async def test_a_daily_quota_on_a_dst_day_ends_after_23_hours(subject: Subject) -> None:
    daily = {"name": "daily", "limit": 100, "period": "day", "time_zone": "Europe/Paris"}
    clock = Clock(ms("2026-03-29T00:30:00+01:00"))
    limiter = Limiter(subject.store, limits(daily), clock)
    spent = await limiter.admit("alice", "free", MODEL, 100, request_id="c1")
    refused = await limiter.admit("alice", "free", MODEL, 1, request_id="c2")
    assert spent.allowed
    assert not refused.allowed
    assert refused.retry_after_s == 22 * 3600 + 30 * 60  # 23 h day, half an hour gone


async def test_a_group_budget_is_spent_by_every_member(subject: Subject) -> None:
    team = {"name": "team", "scope": "group", "groups": ["eng"], "limit": 1000, "period": "day"}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(team, tokens=10_000), clock)
    alice = await limiter.admit("alice", "free", MODEL, 600, request_id="d1", groups=("eng",))
    bob = await limiter.admit("bob", "free", MODEL, 400, request_id="d2", groups=("ops", "eng"))
    assert alice.allowed
    assert bob.allowed
    assert bob.budget_groups == ("eng",)
    carol = await limiter.admit("carol", "free", MODEL, 1, request_id="d3", groups=("eng",))
    assert (carol.allowed, carol.budget) == (False, "team")
    outsider = await limiter.admit("dave", "free", MODEL, 1, request_id="d4", groups=("ops",))
    assert outsider.allowed
    assert not outsider.budgets_held
    # alice used 100 of her 600: the group gets 500 back, carol fits again.
    assert await limiter.settle(charge("alice", alice, 100, "d1"))
    carol = await limiter.admit("carol", "free", MODEL, 400, request_id="d5", groups=("eng",))
    assert carol.allowed
    assert carol.remaining == 1000 - 100 - 400 - 400


async def test_a_refusal_on_one_slot_takes_nothing_from_the_others(subject: Subject) -> None:
    """On Cluster the group budget and the user's window live on different slots."""
    team = {"name": "team", "scope": "group", "groups": ["eng"], "limit": 500, "period": "day"}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(team, tokens=1000), clock)
    assert (
        await limiter.admit("bob", "free", MODEL, 450, request_id="e0", groups=("eng",))
    ).allowed
    # The group refuses alice's 100 (450 + ... the next check sees 450 < 500: allowed) ...
    second = await limiter.admit("alice", "free", MODEL, 100, request_id="e1", groups=("eng",))
    assert second.allowed
    # ... now at 550 the group refuses; alice's own window must not keep this reservation.
    refused = await limiter.admit("alice", "free", MODEL, 300, request_id="e2", groups=("eng",))
    assert (refused.allowed, refused.budget) == (False, "team")
    rows = await subject.store.ledger("alice", [day_of(clock())])
    assert sum(row.unsettled_tokens for row in rows) == 100  # e2's hold went back too
    own = await limiter.admit("alice", "free", MODEL, 0, request_id="e3")
    assert own.allowed
    assert (own.kind, own.remaining) == ("tokens", 1000 - 100)
    # And the reverse: alice's window refuses, the group keeps nothing of it.
    spend = await limiter.admit("alice", "free", MODEL, 900, request_id="e4")
    assert spend.allowed
    over = await limiter.admit("alice", "free", MODEL, 5, request_id="e5", groups=("eng",))
    assert (over.allowed, over.kind) == (False, "tokens")
    group = keys.period_key(keys.budget_key("team", "group", "eng"), "d20260601")
    if subject.raw is not None:
        assert int(await subject.raw.get(group)) == 550


async def test_a_cost_budget_reserves_at_the_dearest_kind_and_settles_the_actual_cost(
    subject: Subject,
) -> None:
    cost = {"name": "spend", "unit": "cost", "limit": 10_000, "period": "month"}
    book = PriceBook({MODEL: ModelPrices(Prices({"input": 1_000_000, "output": 4_000_000}))})
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(cost), clock, prices=book)
    first = await limiter.admit("alice", "free", MODEL, 2000, request_id="f1")
    assert (first.allowed, first.remaining) == (True, 10_000 - 8000)  # 2000 at 4 each
    used = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500)
    assert await limiter.settle(dataclasses.replace(charge("alice", first, 0, "f1"), usage=used))
    second = await limiter.admit("alice", "free", MODEL, 1000, request_id="f2")
    assert (second.allowed, second.remaining) == (True, 10_000 - 3000 - 4000)
    # The Charger priced this one (Charge.cost_micros): the budget takes its figure.
    charged = dataclasses.replace(charge("alice", second, 0, "f2"), cost_micros=500, priced=True)
    assert await limiter.settle(charged)
    probe = await limiter.admit("alice", "free", MODEL, 0, request_id="f4")
    assert probe.remaining == 10_000 - 3000 - 500
    unpriced = await limiter.admit("alice", "free", "other-model", 10**6, request_id="f3")
    assert unpriced.allowed
    assert not unpriced.budgets_held


async def test_a_subscriptions_billing_rate_prices_its_cost_budget(subject: Subject) -> None:
    """No pricing configured: the subscription's billingRate.perToken (2 micro-units a token,
    handed to admission and to the settle) is what a cost budget counts."""
    cost = {"name": "spend", "unit": "cost", "limit": 10_000, "period": "month"}
    limiter = Limiter(subject.store, limits(cost), Clock(ms("2026-06-01T08:00:00+00:00")))
    rates = (Rate(10**6, 60),)
    booked = Attribution("ns/gold", "", "", "")
    first = await limiter.admit(
        "alice", "ns/gold", MODEL, 1000, rates=rates, attribution=booked, request_id="b1",
        billing_rate=2_000_000,
    )  # fmt: skip
    assert (first.allowed, first.remaining) == (True, 10_000 - 2000)
    used = Usage(prompt_tokens=100, completion_tokens=200, total_tokens=300)
    settled = Charge(
        "alice", "", MODEL, used, first.reserved_tokens, first.token_windows,
        request_id="b1", admitted_ms=first.admitted_ms, subscription="ns/gold",
        rate_windows=(60,), billing_rate=2_000_000, budgets_held=first.budgets_held,
    )  # fmt: skip
    assert await limiter.settle(settled)
    probe = await limiter.admit(
        "alice", "ns/gold", MODEL, 0, rates=rates, attribution=booked, request_id="b2",
        billing_rate=2_000_000,
    )  # fmt: skip
    assert probe.remaining == 10_000 - 600
    unpriced = await limiter.admit(
        "bob", "ns/gold", MODEL, 10**6, rates=rates, attribution=booked, request_id="b3"
    )
    assert (unpriced.allowed, unpriced.budgets_held) == (True, False)


async def test_a_shadow_budget_counts_and_reports_but_never_refuses(subject: Subject) -> None:
    shadow = {"name": "trial", "limit": 100, "period": "day", "mode": "shadow"}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    metrics = Metrics()
    alerts = BudgetAlerts(subject.store, metrics, AlertsConfig(), clock)
    limiter = Limiter(subject.store, limits(shadow, tokens=10_000), clock, events=alerts)
    for number in range(3):
        verdict = await limiter.admit("alice", "free", MODEL, 80, request_id=f"g{number}")
        assert verdict.allowed
        assert verdict.kind == "tokens"
    would = metrics.registry.get_sample_value("maas_budget_would_refuse_total", {"budget": "trial"})
    assert would == 1  # 0 -> 80 -> 160: only the third request found it spent
    await alerts.close()


async def test_requests_budgets_count_one_per_request(subject: Subject) -> None:
    calls = {"name": "calls", "unit": "requests", "limit": 2, "period": {"rolling": "1h"}}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(calls), clock)
    first = await limiter.admit("alice", "free", MODEL, 500, request_id="h1")
    assert await limiter.settle(charge("alice", first, 300, "h1"))
    assert (await limiter.admit("alice", "free", MODEL, 500, request_id="h2")).allowed
    refused = await limiter.admit("alice", "free", MODEL, 500, request_id="h3")
    assert (refused.allowed, refused.budget) == (False, "calls")


async def _calls(raw: Any) -> dict[str, int]:
    stats = await raw.info("commandstats")
    return {name: int(values["calls"]) for name, values in stats.items()}


async def test_without_budgets_an_admission_is_one_script_call_as_before(
    redis_server: Any,
) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await raw.flushall()
    store = RedisStore.from_config(StoreConfig(url=Secret(redis_server.url), timeout_s=2.0))
    limiter = Limiter(store, limits(tokens=1000), Clock(ms("2026-06-01T08:00:00+00:00")))
    await limiter.admit("alice", "free", MODEL, 10, request_id="i1")  # the day's SADD too
    await raw.config_resetstat()
    verdict = await limiter.admit("alice", "free", MODEL, 10, request_id="i2")
    calls = await _calls(raw)
    calls.pop("cmdstat_config|resetstat", None)
    calls.pop("cmdstat_info", None)
    # One EVALSHA; inside it, admit.lua's work for one fixed window, the hold (its model's two
    # fields and the ledger hash's two totals) and the state.
    inside = {"get": 1, "hmget": 2, "hincrby": 5, "pexpire": 1, "set": 1}
    assert verdict.allowed
    assert calls == {"cmdstat_evalsha": 1} | {f"cmdstat_{k}": v for k, v in inside.items()}
    await store.close()
    await raw.aclose()


async def test_a_settle_replayed_lands_once_on_every_slot(subject: Subject) -> None:
    team = {"name": "team", "scope": "group", "groups": ["eng"], "limit": 1000, "period": "day"}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(team, tokens=10_000), clock)
    first = await limiter.admit("alice", "free", MODEL, 500, request_id="j1", groups=("eng",))
    settled = charge("alice", first, 100, "j1")
    assert await limiter.settle(settled)
    assert not await limiter.settle(settled)  # a replay: applied already
    probe = await limiter.admit("bob", "free", MODEL, 0, request_id="j2", groups=("eng",))
    assert (probe.kind, probe.remaining) == ("budget", 1000 - 100)


async def test_an_organization_budget_is_shared_by_its_subscriptions(subject: Subject) -> None:
    org = {"name": "org-month", "scope": "organization", "limit": 300, "period": "month"}
    rates = (Rate(10_000, 60),)
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    limiter = Limiter(subject.store, limits(org), clock)
    first = Attribution("ns/gold", "key-a", "org-42", "cc")
    other = Attribution("ns/silver", "key-b", "org-42", "cc")
    elsewhere = Attribution("ns/silver", "key-c", "org-7", "cc")
    admitted = await limiter.admit(
        "alice", "ns/gold", MODEL, 300, rates=rates, attribution=first, request_id="k1"
    )
    assert admitted.allowed
    refused = await limiter.admit(
        "bob", "ns/silver", MODEL, 10, rates=rates, attribution=other, request_id="k2"
    )
    assert (refused.allowed, refused.budget) == (False, "org-month")
    fine = await limiter.admit(
        "bob", "ns/silver", MODEL, 10, rates=rates, attribution=elsewhere, request_id="k3"
    )
    assert fine.allowed


async def test_a_shadow_budget_alone_settles_its_reservation(subject: Subject) -> None:
    shadow = {"name": "trial", "limit": 100, "period": "day", "mode": "shadow"}
    clock = Clock(ms("2026-06-01T08:00:00+00:00"))
    metrics = Metrics()
    alerts = BudgetAlerts(subject.store, metrics, AlertsConfig(), clock)
    limiter = Limiter(subject.store, limits(shadow), clock, events=alerts)  # no window at all
    first = await limiter.admit("alice", "free", MODEL, 80, request_id="l1")
    assert first.budgets_held
    assert await limiter.settle(charge("alice", first, 10, "l1"))
    for number in range(2):  # 10 -> 90 -> 170: neither found it spent
        assert (
            await limiter.admit("alice", "free", MODEL, 80, request_id=f"l{number + 2}")
        ).allowed
    would = metrics.registry.get_sample_value("maas_budget_would_refuse_total", {"budget": "trial"})
    assert would is None
    await alerts.close()
