"""Soft budget thresholds: one webhook event per (budget, subject, period, threshold) across two
replicas sharing a real Redis, delivered with retries to a receiver that fails at first, and a
webhook that never answers neither blocks nor refuses a request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from extproc.config import LimitsConfig, Secret, StoreConfig
from extproc.limits.alerts import BudgetAlerts
from extproc.limits.budgets import AlertsConfig, parse_budgets
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.store.redis import RedisStore
from tests.helpers import Clock
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis

MODEL = "facebook/opt-125m"
T0 = 1_780_000_000_000


@dataclass
class Receiver:
    """A webhook endpoint on loopback: answers 500 to the first ``failures`` posts, then 204."""

    failures: int
    stall_s: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        if self.attempts <= self.failures:
            return web.Response(status=500)
        self.bodies.append(json.loads(await request.read()))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver(failures=2)
    app = web.Application()
    app.router.add_post("/hook", made.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    made.url = f"http://127.0.0.1:{port}/hook"
    yield made
    await runner.cleanup()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    raw = Redis.from_url(redis_server.url)
    await raw.flushall()
    await raw.aclose()
    return redis_server.url


def limits() -> LimitsConfig:
    budget = {"name": "monthly", "limit": 1000, "period": "month", "soft": [50, 80, 100]}
    return LimitsConfig(budgets=parse_budgets([budget]))


async def replica(
    url: str, alerts_config: AlertsConfig, clock: Clock
) -> tuple[Limiter, BudgetAlerts, Metrics, RedisStore]:
    store = RedisStore.from_config(StoreConfig(url=Secret(url), timeout_s=2.0))
    metrics = Metrics()
    alerts = BudgetAlerts(store, metrics, alerts_config, clock, backoff_s=0.01)
    return Limiter(store, limits(), clock, events=alerts), alerts, metrics, store


async def test_each_threshold_is_one_event_across_replicas_despite_failures(
    redis_url: str, receiver: Receiver
) -> None:
    clock = Clock(T0)
    config = AlertsConfig(webhook_url=receiver.url, timeout_s=2.0, attempts=5)
    one = await replica(redis_url, config, clock)
    two = await replica(redis_url, config, clock)
    for number in range(9):  # 100 tokens each, alternating replicas: 900 of 1000
        limiter = (one, two)[number % 2][0]
        assert (await limiter.admit("alice", "", MODEL, 100, request_id=f"r{number}")).allowed
    for _, alerts, _, _ in (one, two):
        await alerts.close(timeout_s=5.0)
    thresholds = sorted(body["threshold_percent"] for body in receiver.bodies)
    assert thresholds == [50, 80]
    assert receiver.attempts == 4  # two failures, then one delivery each
    event = next(b for b in receiver.bodies if b["threshold_percent"] == 50)
    assert event["budget"] == "monthly"
    assert event["subject"] == "alice"
    assert event["period"].startswith("m")
    assert event["limit"] == 1000
    crossed = sum(
        metrics.registry.get_sample_value(
            "maas_budget_threshold_crossed_total", {"budget": "monthly", "threshold": "50"}
        )
        or 0
        for _, _, metrics, _ in (one, two)
    )
    assert crossed == 1
    for _, _, _, store in (one, two):
        await store.close()


async def test_a_webhook_that_never_answers_never_slows_or_refuses_requests(
    redis_url: str, receiver: Receiver
) -> None:
    receiver.stall_s = 1.0
    clock = Clock(T0)
    config = AlertsConfig(webhook_url=receiver.url, timeout_s=0.2, attempts=2)
    limiter, alerts, metrics, store = await replica(redis_url, config, clock)
    started = time.perf_counter()
    for number in range(12):
        verdict = await limiter.admit("bob", "", MODEL, 100, request_id=f"s{number}")
        assert verdict.allowed == (number < 10)
    assert time.perf_counter() - started < 1.0
    await alerts.close(timeout_s=3.0)
    assert metrics.registry.get_sample_value("maas_budget_events_total", {"result": "failed"}) == 3
    await store.close()
