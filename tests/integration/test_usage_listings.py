"""The usage API's listings (every user, per API key) on a real port, over the memory store and a
real Redis: pages, sort orders, filters, the per-key view, access, and hostile parameters."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from extproc.authz.api_keys import ApiKeyIdentities
from extproc.observability.usage_api import UsageApi
from extproc.observability.usage_listing import PageToken, SnapshotCache
from extproc.observability.usage_query import SUBSCRIPTION_GROUPS
from extproc.observability.usage_routes import LISTING_MAX_DAYS
from extproc.store import keys
from extproc.store.base import NO_ATTRIBUTION, Attribution, CounterStore, LedgerEntry
from tests.helpers import KEYS, LOCAL
from tests.integration.test_usage_api import REDIS_DB, TODAY, empty_store
from tests.redis_fixtures import RedisServer, free_port

DAY = TODAY.strftime("%Y%m%d")
PREMIUM = "models-as-a-service/premium-subscription"
FREE = "models-as-a-service/simulator-subscription"
ADMIN = {"Authorization": "Bearer demo-admin-key"}
ALICE = {"Authorization": f"Bearer {KEYS['free']}"}  # user alice, not an admin
USERS = 23  # user-00 .. user-22: three pages of ten


def entry(
    user: str, model: str, total: int, booked: Attribution = NO_ATTRIBUTION, requests: int = 1
) -> LedgerEntry:
    return LedgerEntry(user, DAY, model, total, 0, total, 0, requests, booked)


def seed_entries() -> list[LedgerEntry]:
    """user-NN used NN+1 tokens of opt in one request each (user-07: two); alice has two keys."""
    entries = [
        entry(f"user-{n:02d}", "opt", n + 1, requests=2 if n == 7 else 1) for n in range(USERS)
    ]
    entries += [
        entry("alice", "opt", 100, Attribution(PREMIUM, "alice-ci", "org-1", "cc-1")),
        entry("alice", "llama", 50, Attribution(PREMIUM, "alice-laptop", "org-1", "cc-1")),
        entry("alice", "opt", 7, Attribution(FREE, "alice-laptop")),
        entry("bob", "llama", 30, Attribution(FREE, "bob-key")),
    ]
    return entries


async def settle_all(store: CounterStore, entries: list[LedgerEntry]) -> None:
    now_ms = time.time_ns() // 1_000_000
    for item in entries:
        await store.settle([], item, now_ms)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    backend = empty_store(request)
    if request.param == "redis":  # every hash carries its totals: listings read only those
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli_command("-n", str(REDIS_DB), "set", keys.ledger_totals_since_key(), "20000101")
    await settle_all(backend, seed_entries())
    yield backend
    await backend.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(store: CounterStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    api = UsageApi(
        store,
        ApiKeyIdentities.from_file(LOCAL / "api-keys.yaml"),
        retention_days=90,
        admin_group="maas-admins",
        groups=SUBSCRIPTION_GROUPS,
        snapshots=SnapshotCache(clock=clock),
    )
    port = free_port()
    await api.start("127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        await api.stop()


async def every_page(
    client: httpx.AsyncClient, path: str, params: dict[str, str]
) -> list[dict[str, object]]:
    """Follow next_page_token to the end; every page's rows, in order."""
    rows: list[dict[str, object]] = []
    token = None
    for _ in range(50):
        asked = params if token is None else {**params, "page_token": token}
        response = await client.get(path, params=asked, headers=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        rows += body["rows"]
        token = body["next_page_token"]
        assert ("link" in response.headers) == (token is not None)
        if token is None:
            return rows
    raise AssertionError("no last page")


def users_of(rows: list[dict[str, object]]) -> list[object]:
    return [row["user"] for row in rows]


async def test_pages_of_every_user_by_name_with_totals_of_all(client: httpx.AsyncClient) -> None:
    first = await client.get("/v1/usage/users", params={"limit": "10"}, headers=ADMIN)
    body = first.json()
    assert (body["count"], body["sort"], body["order"], body["limit"]) == (25, "user", "asc", 10)
    assert users_of(body["rows"]) == ["alice", "bob", *(f"user-{n:02d}" for n in range(8))]
    everyone = sum(range(1, USERS + 1)) + 187
    assert body["totals"]["total_tokens"] == everyone  # of the whole listing, not the page
    assert first.headers["link"].endswith('>; rel="next"')
    assert "page_token=" in first.headers["link"]
    rows = await every_page(client, "/v1/usage/users", {"limit": "10"})
    assert users_of(rows) == ["alice", "bob", *(f"user-{n:02d}" for n in range(USERS))]


async def test_sorted_by_an_amount_either_way_with_ties_by_name(
    client: httpx.AsyncClient,
) -> None:
    rows = await every_page(
        client, "/v1/usage/users", {"sort": "total_tokens", "order": "desc", "limit": "7"}
    )
    totals = [row["total_tokens"] for row in rows]
    assert users_of(rows)[:3] == ["alice", "bob", "user-22"]
    assert totals == sorted(totals, reverse=True)
    by_requests = await client.get(
        "/v1/usage/users", params={"sort": "requests", "limit": "3"}, headers=ADMIN
    )
    # 1 request each except user-07 (2) and alice (3); ties by user name
    assert users_of(by_requests.json()["rows"]) == ["bob", "user-00", "user-01"]
    last = await client.get(
        "/v1/usage/users", params={"sort": "requests", "order": "desc", "limit": "2"}, headers=ADMIN
    )
    assert users_of(last.json()["rows"]) == ["alice", "user-07"]


async def test_pages_come_from_one_snapshot_while_usage_moves(
    client: httpx.AsyncClient, store: CounterStore
) -> None:
    """Settles between pages (a user on a later page overtaking everyone, new users) neither
    repeat nor skip a row: the listing is the one its first page saw."""
    params = {"sort": "total_tokens", "order": "desc", "limit": "10"}
    first = (await client.get("/v1/usage/users", params=params, headers=ADMIN)).json()
    await settle_all(
        store, [entry("user-00", "opt", 10_000), entry("aaron", "opt", 5), entry("zed", "opt", 1)]
    )
    rows = list(first["rows"])
    token = first["next_page_token"]
    while token:
        page = await client.get(
            "/v1/usage/users", params={**params, "page_token": token}, headers=ADMIN
        )
        rows += page.json()["rows"]
        token = page.json()["next_page_token"]
    assert sorted(users_of(rows)) == sorted(
        ["alice", "bob", *(f"user-{n:02d}" for n in range(USERS))]
    )
    assert rows[-1] == {**rows[-1], "user": "user-00", "total_tokens": 1}
    fresh = await every_page(client, "/v1/usage/users", {"sort": "user", "limit": "100"})
    assert "aaron" not in users_of(fresh)  # a new first page within fresh_s reads the snapshot


async def test_a_new_listing_after_fresh_s_sees_new_usage(
    client: httpx.AsyncClient, store: CounterStore, clock: Clock
) -> None:
    await client.get("/v1/usage/users", headers=ADMIN)
    await settle_all(store, [entry("aaron", "opt", 5)])
    clock.now += 11
    body = (await client.get("/v1/usage/users", params={"limit": "1"}, headers=ADMIN)).json()
    assert users_of(body["rows"]) == ["aaron"]


async def test_filters_choose_the_rows_that_count(client: httpx.AsyncClient) -> None:
    llama = (await client.get("/v1/usage/users", params={"model": "llama"}, headers=ADMIN)).json()
    assert [(r["user"], r["total_tokens"]) for r in llama["rows"]] == [("alice", 50), ("bob", 30)]
    assert llama["totals"]["total_tokens"] == 80
    assert llama["filters"] == {"model": "llama"}
    free = await client.get("/v1/usage/users", params={"subscription": FREE}, headers=ADMIN)
    assert [(r["user"], r["total_tokens"]) for r in free.json()["rows"]] == [
        ("alice", 7),
        ("bob", 30),
    ]
    tier_era = await client.get(
        "/v1/usage/users", params={"subscription": "", "user_prefix": "user-1"}, headers=ADMIN
    )
    assert users_of(tier_era.json()["rows"]) == [f"user-{n}" for n in range(10, 20)]
    laptop = await client.get("/v1/usage/users", params={"key": "alice-laptop"}, headers=ADMIN)
    assert [(r["user"], r["total_tokens"]) for r in laptop.json()["rows"]] == [("alice", 57)]
    none = await client.get("/v1/usage/users", params={"model": "nope"}, headers=ADMIN)
    assert none.json()["rows"] == []
    assert none.json()["count"] == 0
    own = await client.get("/v1/usage", params={"model": "llama"}, headers=ALICE)
    assert own.json()["totals"]["total_tokens"] == 50


async def test_the_per_key_view(client: httpx.AsyncClient) -> None:
    everyone = await every_page(
        client, "/v1/usage/keys", {"user_prefix": "", "sort": "total_tokens", "order": "desc"}
    )
    assert [(r["user"], r["key"], r["subscription"], r["total_tokens"]) for r in everyone[:4]] == [
        ("alice", "alice-ci", PREMIUM, 100),
        ("alice", "alice-laptop", PREMIUM, 50),
        ("bob", "bob-key", FREE, 30),
        ("user-22", "", "", 23),
    ]
    own = (await client.get("/v1/usage/keys", params={"sort": "key"}, headers=ALICE)).json()
    assert [(r["key"], r["subscription"], r["total_tokens"]) for r in own["rows"]] == [
        ("alice-ci", PREMIUM, 100),
        ("alice-laptop", PREMIUM, 50),
        ("alice-laptop", FREE, 7),
    ]
    assert {r["user"] for r in own["rows"]} == {"alice"}
    as_csv = await client.get(
        "/v1/usage/keys", params={"format": "csv", "subscription": FREE}, headers=ALICE
    )
    assert as_csv.text.splitlines()[0].startswith("user,key,subscription,prompt_tokens")
    assert as_csv.text.splitlines()[1].startswith(f"alice,alice-laptop,{FREE},7")
    bob = await client.get("/v1/usage/keys", params={"user": "bob"}, headers=ADMIN)
    assert [r["key"] for r in bob.json()["rows"]] == ["bob-key"]


async def test_access_stays_as_it_was(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/usage/users", headers=ALICE)).status_code == 403
    other = await client.get("/v1/usage/keys", params={"user": "bob"}, headers=ALICE)
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "forbidden"
    for path in ("/v1/usage/users", "/v1/usage/keys"):
        anonymous = await client.get(path)
        assert anonymous.status_code == 401
    # alice's own listing cannot be continued as bob's, nor an admin's as alice's
    mine = (await client.get("/v1/usage/keys", params={"limit": "1"}, headers=ALICE)).json()
    theirs = await client.get(
        "/v1/usage/keys",
        params={"limit": "1", "user": "bob", "page_token": mine["next_page_token"]},
        headers=ADMIN,
    )
    assert theirs.status_code == 400
    assert theirs.json()["error"]["parameter"] == "page_token"


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/v1/usage/users", {"limit": "0"}, "limit"),
        ("/v1/usage/users", {"limit": "1001"}, "limit"),
        ("/v1/usage/users", {"limit": "+5"}, "limit"),
        ("/v1/usage/users", {"limit": "\u0665"}, "limit"),  # an Arabic-Indic five: int() takes it
        ("/v1/usage/users", {"limit": "1e3"}, "limit"),
        ("/v1/usage/users", {"sort": "key"}, "sort"),  # a column of the per-key view only
        ("/v1/usage/keys", {"sort": "day"}, "sort"),
        ("/v1/usage/users", {"order": "up"}, "order"),
        ("/v1/usage/users", {"page_token": "garbage!"}, "page_token"),
        ("/v1/usage/users", {"page_token": "W10"}, "page_token"),  # "[]"
        ("/v1/usage/users", {"page_token": "x" * 300}, "page_token"),
        ("/v1/usage/users", {"model": "m" * 513}, "model"),
        ("/v1/usage/keys", {"user": "a", "group_by": "key"}, "group_by"),
        ("/v1/usage/users", {"sort": "user", "user_prefix": "a", "x": "1"}, "x"),
        ("/v1/usage/openapi.json", {"format": "json"}, "format"),
    ],
)
async def test_hostile_parameters_are_400_naming_them(
    client: httpx.AsyncClient, path: str, params: dict[str, str], parameter: str
) -> None:
    response = await client.get(path, params=params, headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["parameter"]) == ("bad_parameter", parameter)
    assert error["message"].startswith(f"{parameter}: expected")


async def test_a_token_is_bound_to_its_listing_and_expires(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    params = {"sort": "total_tokens", "limit": "5"}
    token = (await client.get("/v1/usage/users", params=params, headers=ADMIN)).json()[
        "next_page_token"
    ]
    other_sort = {**params, "sort": "requests", "page_token": token}
    assert (
        await client.get("/v1/usage/users", params=other_sort, headers=ADMIN)
    ).status_code == 400
    other_model = {**params, "model": "opt", "page_token": token}
    assert (
        await client.get("/v1/usage/users", params=other_model, headers=ADMIN)
    ).status_code == 400
    decoded = PageToken.decode(token)
    past_the_end = PageToken(decoded.snapshot, 10**6, decoded.fingerprint).encode()
    response = await client.get(
        "/v1/usage/users", params={**params, "page_token": past_the_end}, headers=ADMIN
    )
    assert response.status_code == 400
    bigger_pages = {**params, "limit": "50", "page_token": token}
    page = await client.get("/v1/usage/users", params=bigger_pages, headers=ADMIN)
    assert page.status_code == 200
    assert len(page.json()["rows"]) == 20
    clock.now += 301
    expired = await client.get(
        "/v1/usage/users", params={**params, "page_token": token}, headers=ADMIN
    )
    assert expired.status_code == 400
    assert "expired" in expired.json()["error"]["message"]


async def test_a_listing_of_every_user_spans_at_most_a_month(client: httpx.AsyncClient) -> None:
    start = (TODAY - dt.timedelta(days=LISTING_MAX_DAYS)).isoformat()
    response = await client.get("/v1/usage/users", params={"from": start}, headers=ADMIN)
    assert response.status_code == 400
    assert response.json()["error"]["parameter"] == "from"
    assert "at most 31 days" in response.json()["error"]["message"]
    month = (TODAY - dt.timedelta(days=LISTING_MAX_DAYS - 1)).isoformat()
    assert (
        await client.get("/v1/usage/users", params={"from": month}, headers=ADMIN)
    ).status_code == 200
    # one user's keys may span the whole retention
    assert (
        await client.get("/v1/usage/keys", params={"from": start}, headers=ALICE)
    ).status_code == 200


async def test_sorted_by_cost_with_null_where_nothing_was_priced(
    client: httpx.AsyncClient, store: CounterStore
) -> None:
    priced = [
        LedgerEntry("user-03", DAY, "opt", 1, 0, 1, 0, cost_micros=900, priced_requests=1),
        LedgerEntry("user-05", DAY, "opt", 1, 0, 1, 0, cost_micros=2500, priced_requests=1),
        LedgerEntry("bob", DAY, "opt", 1, 0, 1, 0, cached_tokens=1, cached_reported=1),
    ]
    await settle_all(store, priced)
    params = {"sort": "cost_micros", "order": "desc", "limit": "3"}
    body = (await client.get("/v1/usage/users", params=params, headers=ADMIN)).json()
    assert [(r["user"], r["cost_micros"]) for r in body["rows"]] == [
        ("user-05", 2500),
        ("user-03", 900),
        ("user-22", None),  # never priced: null, not 0, and ordered as 0 (ties by name)
    ]
    assert body["totals"]["cost_micros"] == 3400
    cached = await client.get(
        "/v1/usage/users", params={"sort": "cached_tokens", "order": "desc"}, headers=ADMIN
    )
    assert cached.json()["rows"][0]["user"] == "bob"
    assert cached.json()["rows"][0]["cached_tokens"] == 1
    assert cached.json()["rows"][1]["cached_tokens"] is None
