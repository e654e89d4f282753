"""Budgets in admission: a spent budget is a quota refusal, the settle finds the caller's group
budgets from the decision, and a store that is down (fail_open) still hands the groups over."""

from __future__ import annotations

import dataclasses

from extproc.config import Config, Secret, StoreConfig
from extproc.domain import Outcome, Usage
from extproc.envoy import handover
from extproc.limits.budgets import parse_budgets
from extproc.limits.limiter import Limiter
from extproc.store.redis import RedisStore
from tests.helpers import CHAT, Clock, build_admission, local_config
from tests.redis_fixtures import free_port
from tests.unit.test_admission import request

FREE_GROUP = {
    "name": "free-team",
    "scope": "group",
    "groups": ["tier-free-users"],
    "limit": 30,
    "period": "day",
    "time_zone": "Asia/Tokyo",
}


def with_budgets() -> Config:
    config = local_config()
    limits = dataclasses.replace(config.limits, budgets=parse_budgets([FREE_GROUP]))
    return dataclasses.replace(config, limits=limits)


async def test_a_spent_group_budget_refuses_with_a_quota_outcome() -> None:
    clock = Clock(1_800_000_000_000)
    admission, limiter, _ = build_admission(with_budgets(), clock)
    first = await admission.decide(request("free", body={"model": "m", "max_tokens": 20}))
    assert first.allowed
    assert (first.budgets_held, first.budget_groups) == (True, ("tier-free-users",))
    billing = handover.Billing.from_decision(first, CHAT)
    assert billing is not None
    assert await limiter.settle(billing.charge(Usage(total_tokens=30), 200))
    refused = await admission.decide(request("free", body={"model": "m", "max_tokens": 1}))
    assert refused.outcome is Outcome.QUOTA_EXCEEDED
    assert refused.limit_kind == "budget"
    assert refused.limit == 30
    assert "free-team" in refused.reason
    assert 0 < refused.retry_after_s <= 86_400


async def test_with_the_store_down_the_groups_still_reach_the_settle() -> None:
    config = with_budgets()
    dead = StoreConfig(url=Secret(f"redis://127.0.0.1:{free_port()}/0"), timeout_s=0.2)
    store = RedisStore.from_config(dead)
    admission, _, _ = build_admission(config, limiter=Limiter(store, config.limits, Clock()))
    assert config.store.failure_policy == "fail_open"
    decision = await admission.decide(request("free"))
    await store.close()
    assert decision.allowed
    assert (decision.budgets_held, decision.budget_groups) == (False, ("tier-free-users",))
