"""Budgets through real Envoy and a real Redis: a monthly quota in a time zone refuses with a 429,
Retry-After to the end of the month and X-RateLimit-* headers; a group budget is spent by two
users; a shadow budget counts without refusing."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from redis import Redis

from extproc.stack import LocalStack
from tests.e2e.support import sample
from tests.helpers import CHAT, KEYS, LOCAL
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.redis

ENG = {"eng-one-key": "eng1", "eng-two-key": "eng2"}
BUDGETS: list[dict[str, Any]] = [
    {
        "name": "enterprise-monthly",
        "match": {"tiers": ["enterprise"]},
        "limit": 100,
        "period": "month",
        "time_zone": "Europe/Paris",
        "soft": [50],
    },
    {
        "name": "eng-daily",
        "scope": "group",
        "groups": ["team-eng"],
        "limit": 120,
        "period": "day",
        "time_zone": "America/New_York",
    },
    {
        "name": "premium-trial",
        "match": {"tiers": ["premium"]},
        "limit": 1,
        "period": "week",
        "mode": "shadow",
    },
]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[LocalStack]:
    Redis.from_url(redis_server.url).flushall()
    folder: Path = tmp_path_factory.mktemp("budgets")
    api_keys = yaml.safe_load((LOCAL / "api-keys.yaml").read_text())
    for key, user in ENG.items():
        digest = hashlib.sha256(key.encode()).hexdigest()
        groups = ["premium-group", "team-eng"]
        api_keys["keys"].append({"sha256": digest, "user": user, "groups": groups})
    (folder / "api-keys.yaml").write_text(yaml.safe_dump(api_keys))
    config = yaml.safe_load((LOCAL / "config.yaml").read_text())
    config["identity"]["api_keys_file"] = str(folder / "api-keys.yaml")
    config["tiers"]["file"] = str(LOCAL / "tiers.yaml")
    config["limits"]["budgets"] = BUDGETS
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"MAAS_EXTPROC_STORE_URL": redis_server.url}
    with LocalStack(config_path=folder / "config.yaml", env=env) as running:
        yield running


def chat(stack: LocalStack, key: str, max_tokens: int = 10) -> httpx.Response:
    body = {
        "model": "facebook/opt-125m",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(stack.url + CHAT, json=body, headers=headers, timeout=10)


def seconds_to_next_month_in_paris() -> float:
    now = dt.datetime.now(ZoneInfo("Europe/Paris"))
    first = (now.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    start = dt.datetime(first.year, first.month, 1, tzinfo=ZoneInfo("Europe/Paris"))
    return start.timestamp() - time.time()


def test_a_monthly_quota_refuses_until_the_month_ends_in_its_zone(stack: LocalStack) -> None:
    statuses = []
    for _ in range(12):
        response = chat(stack, KEYS["enterprise"], max_tokens=10)
        statuses.append(response.status_code)
        if response.status_code != 200:
            break
    assert statuses[0] == 200
    assert statuses[-1] == 429
    headers = response.headers
    assert abs(int(headers["retry-after"]) - seconds_to_next_month_in_paris()) < 5
    assert headers["x-ratelimit-limit"] == "100"
    assert headers["x-ratelimit-remaining"] == "0"
    assert headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "enterprise-monthly" in error["message"]
    # The 50 % threshold was reached on the way: counted once.
    crossed = sample(
        stack,
        "maas_budget_threshold_crossed_total",
        budget="enterprise-monthly",
        threshold="50",
    )
    assert crossed == 1


def test_a_group_budget_is_spent_by_both_members(stack: LocalStack) -> None:
    first = chat(stack, "eng-two-key", max_tokens=40)
    assert first.status_code == 200
    statuses = [chat(stack, "eng-one-key", max_tokens=40).status_code for _ in range(6)]
    assert 429 in statuses
    refused = chat(stack, "eng-two-key", max_tokens=1)
    assert refused.status_code == 429
    assert "eng-daily" in refused.json()["error"]["message"]
    # Their own windows (premium: 50,000 tokens a minute) are far from spent.
    assert sample(stack, "maas_limited_requests_total", limit="tokens") == 0


def test_a_shadow_budget_counts_but_never_refuses(stack: LocalStack) -> None:
    responses = [chat(stack, KEYS["premium"]) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    # The tightest enforced limit is still the tier's window, not the spent shadow budget.
    assert responses[-1].headers["x-ratelimit-limit"] in ("20", "50000")
    assert sample(stack, "maas_budget_would_refuse_total", budget="premium-trial") >= 2
