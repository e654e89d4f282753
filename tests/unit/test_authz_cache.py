"""Tests for the expiring LRU cache, single-flight calls and the token helpers of kubernetes_identity."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from extproc.authz.cache import ExpiringCache, SingleFlight
from extproc.authz.kubernetes_identity import token_expiry, userid_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_at_their_own_time_and_zero_ttl_forgets() -> None:
    clock = Clock()
    cache: ExpiringCache[str, int | None] = ExpiringCache(10, clock)
    cache.put("a", 1, 5)
    cache.put("none", None, 10)
    clock.now += 5
    assert cache.get("a") is None
    entry = cache.get("none")
    assert entry is not None
    assert entry.value is None  # a cached "no" is a hit, not a miss
    cache.put("none", None, 0)
    assert cache.get("none") is None


def test_the_least_recently_used_entry_is_evicted_first() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(2, Clock())
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a") is not None
    cache.put("c", 3, 60)
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert len(cache) == 2


async def test_concurrent_callers_share_one_call_and_its_error() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def slow() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 7

    waiters = [asyncio.ensure_future(flights.run("k", slow)) for _ in range(10)]
    await asyncio.sleep(0)
    assert flights.joining("k")
    waiters[0].cancel()  # one caller giving up does not cancel the shared call
    release.set()
    results = await asyncio.gather(*waiters[1:])
    assert results == [7] * 9
    assert calls == 1
    assert not flights.joining("k")

    async def broken() -> int:
        raise RuntimeError("down")

    outcomes = await asyncio.gather(
        *(flights.run("e", broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def _jwt(claims: object) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (_jwt({"exp": 1700000000}), 1700000000.0),
        (_jwt({"exp": 1.5}), 1.5),
        (_jwt({"sub": "no-exp"}), None),
        (_jwt({"exp": "soon"}), None),
        (_jwt({"exp": True}), None),
        (_jwt(["not", "a", "mapping"]), None),
        ("opaque-token", None),
        ("a.!!!.c", None),
    ],
)
def test_token_expiry_reads_exp_only_from_well_formed_payloads(
    token: str, expected: float | None
) -> None:
    assert token_expiry(token) == expected


@pytest.mark.parametrize(
    ("username", "userid"),
    [
        ("system:serviceaccount:maas-default-gateway-tier-free:alice-1a2b", "alice-1a2b"),
        ("system:serviceaccount:ns:", None),
        ("system:serviceaccount:ns:a:b", None),
        ("oidc:alice@example.com", None),
    ],
)
def test_userid_is_the_service_account_name(username: str, userid: str | None) -> None:
    assert userid_for(username) == userid
