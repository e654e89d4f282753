"""Usage in the subscription era: ledger rows booked to the subscription, the API key and the
subscription's tokenMetadata, grouped by subscription or key in the usage API (memory and Redis)
and the CLI (a process against Redis), beside tier-era rows in the same ledger."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from extproc.observability.usage_query import SUBSCRIPTION_GROUPS
from extproc.store.base import NO_ATTRIBUTION, Attribution, CounterStore, LedgerEntry
from extproc.store.redis import RedisStore
from tests.helpers import KEYS, LOCAL
from tests.integration.test_usage_api import (
    REDIS_DB,
    TODAY,
    empty_store,
    redis_store,
    serving,
)
from tests.redis_fixtures import RedisServer

PREMIUM = "models-as-a-service/premium-subscription"
FREE = "models-as-a-service/simulator-subscription"
OPT = "llm/facebook-opt-125m-simulated"
DAY = TODAY.strftime("%Y%m%d")


def entry(model: str, prompt: int, booked: Attribution = NO_ATTRIBUTION) -> LedgerEntry:
    return LedgerEntry("alice", DAY, model, prompt, 1, prompt + 1, 0, attribution=booked)


SEED = [
    entry(OPT, 10, Attribution(PREMIUM, "alice-ci", "org-demo", "cc-4242")),
    entry(OPT, 20, Attribution(PREMIUM, "alice-laptop", "org-demo", "cc-4242")),
    entry(OPT, 30, Attribution(PREMIUM, "", "org-demo", "cc-4242")),  # a token: no key
    entry(OPT, 40, Attribution(FREE, "alice-laptop|old")),  # a key name with the separator
    entry("opt", 50),  # a tier-era row in the same ledger
]


async def seed(store: CounterStore) -> None:
    now_ms = time.time_ns() // 1_000_000
    for item in SEED:
        await store.settle([], item, now_ms)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    backend = empty_store(request)
    await seed(backend)
    api, url = await serving(backend, SUBSCRIPTION_GROUPS)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            yield http
    finally:
        await api.stop()
        await backend.close()


ALICE = {"Authorization": f"Bearer {KEYS['free']}"}


def amounts(prompt: int, requests: int) -> dict[str, int | None]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": requests,
        "total_tokens": prompt + requests,
        "estimated_tokens": 0,
        "requests": requests,
        "unsettled_tokens": 0,
        "unsettled_requests": 0,
        "cached_tokens": None,  # not reported by any request (issue #16)
        "cache_creation_tokens": None,
        "reasoning_tokens": None,
        "cost_micros": None,
        "priced_requests": 0,
    }


async def test_grouped_by_subscription_with_its_token_metadata(client: httpx.AsyncClient) -> None:
    body = (
        await client.get("/v1/usage", params={"group_by": "subscription"}, headers=ALICE)
    ).json()
    assert body["group_by"] == "subscription"
    assert body["rows"] == [
        {"subscription": "", "organization_id": "", "cost_center": "", **amounts(50, 1)},
        {
            "subscription": PREMIUM,
            "organization_id": "org-demo",
            "cost_center": "cc-4242",
            **amounts(60, 3),
        },
        {"subscription": FREE, "organization_id": "", "cost_center": "", **amounts(40, 1)},
    ]
    assert body["totals"] == amounts(150, 5)


async def test_the_tier_era_keeps_its_groupings(redis_server: RedisServer) -> None:
    done = usage_cli(redis_server, "json", LOCAL / "config.yaml")
    assert done.returncode == 2
    assert "--group-by: expected one of day, model" in done.stderr


async def test_grouped_by_api_key(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/usage", params={"group_by": "key"}, headers=ALICE)).json()
    assert [(r["key"], r["subscription"], r["requests"]) for r in body["rows"]] == [
        ("", "", 1),
        ("", PREMIUM, 1),
        ("alice-ci", PREMIUM, 1),
        ("alice-laptop", PREMIUM, 1),
        ("alice-laptop|old", FREE, 1),
    ]
    by_model = (await client.get("/v1/usage", params={"group_by": "model"}, headers=ALICE)).json()
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [(OPT, 4), ("opt", 1)]


async def test_csv_names_each_grouping_column(client: httpx.AsyncClient) -> None:
    params = {"group_by": "subscription", "format": "csv"}
    text = (await client.get("/v1/usage", params=params, headers=ALICE)).text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["subscription", "organization_id", "cost_center", "prompt_tokens"]
    assert rows[2][:4] == [PREMIUM, "org-demo", "cc-4242", "60"]


@pytest.mark.redis
async def test_the_cli_groups_by_subscription(redis_server: RedisServer) -> None:
    redis_server.cli_command("-n", str(REDIS_DB), "flushdb")
    store: RedisStore = redis_store(redis_server.port)
    try:
        await seed(store)
    finally:
        await store.close()
    done = usage_cli(redis_server, "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [r["subscription"] for r in rows] == ["", PREMIUM, FREE]
    done = usage_cli(redis_server, "table")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split()[:3] == ["subscription", "organization_id", "cost_center"]
    assert any(line.startswith(PREMIUM) and "org-demo" in line for line in lines)


def usage_cli(
    server: RedisServer, fmt: str, config: Path = LOCAL / "subscriptions" / "config.yaml"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAAS_EXTPROC_STORE_URL": f"redis://127.0.0.1:{server.port}/{REDIS_DB}"}
    args = ["usage", "--config", str(config), "--user", "alice", "--group-by", "subscription"]
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args, "--format", fmt],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
