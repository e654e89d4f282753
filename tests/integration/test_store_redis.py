"""The Redis store against real servers: round trips, script reloads, races, outages, URLs, secrets."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from extproc.config import LimitsConfig, Secret, StoreConfig
from extproc.domain import Charge, Limits, Usage
from extproc.errors import StoreUnavailable
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.store import keys
from extproc.store.base import Adjustment, AdmitResult, LedgerEntry, LedgerRow, WindowCounter
from extproc.store.ledger import day_of
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from extproc.store.resilient import ResilientStore
from tests.redis_fixtures import RedisSentinel, RedisServer, free_port, self_signed_cert

pytestmark = pytest.mark.redis

NOW = time.time_ns() // 1_000_000
TODAY = day_of(NOW)


def redis_store(url: str, **config: Any) -> RedisStore:
    return RedisStore.from_config(StoreConfig(url=Secret(url), **{"timeout_s": 1.0, **config}))


def resilient(inner: Any, metrics: Metrics, **config: Any) -> ResilientStore:
    return ResilientStore(
        inner, StoreConfig(**config), metrics, retry_initial_s=0.02, retry_max_s=0.1
    )


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def wait_until(condition: Callable[[], bool], deadline_s: float = 15.0) -> None:
    """Poll until ``condition`` holds; the deadline only guards against a hang."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


def entry(model: str = "granite", total: int = 10, user: str = "alice") -> LedgerEntry:
    return LedgerEntry(user, TODAY, model, total - 2, 2, total, 0)


# -------------------------------------------------------------------------------- round trips


class ClientCommands:
    """The commands clients send (not those scripts run), seen through MONITOR on a real server."""

    def __init__(self, url: str) -> None:
        self._watcher = Redis.from_url(url, decode_responses=True)
        self._marker = Redis.from_url(url, decode_responses=True)

    async def during(self, action: Callable[[], Awaitable[object]]) -> list[str]:
        await self._marker.ping()  # connected before watching, so its handshake is not seen
        seen: list[str] = []
        async with self._watcher.monitor() as monitor:
            await action()
            await self._marker.echo("end-of-count")
            while True:
                command = await monitor.next_command()
                if command["client_type"] == "lua":
                    continue
                if command["command"] == "ECHO end-of-count":
                    return seen
                seen.append(command["command"].split()[0].lower())

    async def close(self) -> None:
        await self._watcher.aclose()
        await self._marker.aclose()


async def test_one_round_trip_per_admit_and_settle(raw: Redis, redis_server: RedisServer) -> None:
    store = redis_store(redis_server.url)
    await store.start()
    commands = ClientCommands(redis_server.url)
    counters = [
        WindowCounter(keys.requests_key("alice", "free"), 5, 120_000, 1),
        WindowCounter(keys.tokens_key("alice", "free"), 100, 60_000, 30),
        WindowCounter(keys.tokens_key("alice", "free", "granite"), 50, 60_000, 30, True),
    ]
    await store.ping()  # the connection exists before counting
    admitted: list[AdmitResult] = []

    async def admit() -> None:
        admitted.append(await store.admit(counters, NOW))

    assert await commands.during(admit) == ["evalsha"]
    states = admitted[0].states
    assert admitted[0].allowed
    adjustments = [
        Adjustment(counters[1].key, 60_000, states[1].window_start_ms, 30, 12),
        Adjustment(counters[2].key, 60_000, states[2].window_start_ms, 30, 12, True),
    ]

    async def settle() -> None:
        await store.settle(adjustments, entry(total=12), NOW)

    # This process's first ledger write of (user, day) also adds the user to the day's set, in
    # one pipelined round trip; from then on a settle is the script alone.
    assert await commands.during(settle) == ["sadd", "pexpire", "evalsha"]
    assert await commands.during(settle) == ["evalsha"]
    assert await commands.during(admit) == ["evalsha"]
    await commands.close()
    await store.close()


async def test_noscript_reloads_and_retries_once(raw: Redis, redis_server: RedisServer) -> None:
    store = redis_store(redis_server.url)
    counter = WindowCounter(keys.tokens_key("alice", "free"), 100, 60_000, 30)
    assert (await store.admit([counter], NOW)).states[0].value == 30
    await raw.script_flush()
    commands = ClientCommands(redis_server.url)
    admitted: list[AdmitResult] = []

    async def admit() -> None:
        admitted.append(await store.admit([counter], NOW))

    assert await commands.during(admit) == ["evalsha", "script", "evalsha"]
    assert admitted[0].states[0].value == 60
    await commands.close()
    await raw.script_flush()
    await store.settle([], entry(), NOW)
    assert await store.ledger("alice", [TODAY]) == [LedgerRow(TODAY, "granite", 8, 2, 10, 0, 1)]
    await store.close()


# -------------------------------------------------------------------------------- concurrency


async def test_concurrent_requests_never_overshoot_by_more_than_one_reservation(
    raw: Redis, redis_server: RedisServer
) -> None:
    limits = LimitsConfig(
        tiers={"free": Limits(tokens=100, tokens_window_s=60)}, default_reservation_tokens=30
    )
    stores = [redis_store(redis_server.url) for _ in range(2)]  # two replicas, one Redis
    limiters = [Limiter(store, limits, lambda: NOW) for store in stores]
    for store in stores:
        await store.ping()  # connected before the race starts
    rng = random.Random(7)
    # Staggered starts and pauses, so admissions race with each other and with settles.
    plans = [(rng.random() / 20, rng.random() / 100, rng.randint(0, 30)) for _ in range(50)]

    async def one_request(index: int) -> int:
        limiter = limiters[index % 2]
        start_s, pause_s, actual = plans[index]
        await asyncio.sleep(start_s)
        verdict = await limiter.admit(
            "alice", "free", "granite", limiter.reservation_for("free", None)
        )
        if not verdict.allowed:
            return -1
        await asyncio.sleep(pause_s)
        usage = Usage(prompt_tokens=actual, completion_tokens=0, total_tokens=actual)
        charge = Charge(
            "alice",
            "free",
            "granite",
            usage,
            reserved_tokens=verdict.reserved_tokens,
            token_windows=verdict.token_windows,
        )
        await limiter.settle(charge)
        return actual

    outcomes = await asyncio.gather(*(one_request(i) for i in range(50)))
    charged = sum(o for o in outcomes if o >= 0)
    assert -1 in outcomes  # the limit did refuse some
    assert charged <= 100 + 30  # at most one reservation over the limit
    window = await raw.hgetall(keys.tokens_key("alice", "free"))
    assert int(window["v"]) == charged  # every reservation was swapped for its actual
    rows = await stores[0].ledger("alice", [TODAY])
    assert rows[0].total_tokens == charged
    assert rows[0].requests == sum(1 for o in outcomes if o >= 0)
    for store in stores:
        await store.close()


# ------------------------------------------------------------------------ outages and the spool


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_settles_during_an_outage_are_replayed_exactly(
    own_redis_server: RedisServer, policy: str
) -> None:
    metrics = Metrics(CollectorRegistry())
    store = resilient(
        redis_store(own_redis_server.url, timeout_s=0.5), metrics, failure_policy=policy
    )
    await store.start()
    limits = LimitsConfig(
        tiers={"free": Limits(tokens=1000, tokens_window_s=60)}, default_reservation_tokens=50
    )
    limiter = Limiter(store, limits, lambda: NOW)
    verdicts = [
        await limiter.admit("alice", "free", "granite", 50, request_id=f"r{i}") for i in range(10)
    ]
    assert all(v.allowed for v in verdicts)

    def charge(index: int) -> Charge:
        usage = Usage(prompt_tokens=index, completion_tokens=1, total_tokens=index + 1)
        v = verdicts[index]
        return Charge(
            "alice", "free", "granite", usage, v.reserved_tokens, v.token_windows,
            request_id=f"r{index}", admitted_ms=v.admitted_ms,
        )  # fmt: skip

    for index in range(4):  # settled before the outage
        await limiter.settle(charge(index))
    own_redis_server.cli_command("save")  # the restarted server loads this snapshot
    own_redis_server.stop()

    for index in range(4, 10):
        await limiter.settle(charge(index))  # never raises: spooled
    assert store.spooled == 6
    assert sample(metrics, "maas_spool_depth") == 6
    assert sample(metrics, "maas_store_errors_total", {"op": "settle"}) >= 1
    with pytest.raises(StoreUnavailable):
        await limiter.admit("alice", "free", "granite", 50)
    assert sample(metrics, "maas_store_errors_total", {"op": "admit"}) == 1

    own_redis_server.start()
    await wait_until(lambda: store.spooled == 0)
    assert sample(metrics, "maas_spool_depth") == 0
    assert sample(metrics, "maas_spool_dropped_total") == 0
    total = sum(index + 1 for index in range(10))
    raw = Redis.from_url(own_redis_server.url, decode_responses=True)
    assert int(await raw.hget(keys.tokens_key("alice", "free"), "v")) == total
    assert await store.ledger("alice", [TODAY]) == [
        LedgerRow(TODAY, "granite", total - 10, 10, total, 0, 10)
    ]
    assert await store.ledger_users([TODAY]) == ["alice"]
    await raw.aclose()
    await store.close()


async def test_a_full_spool_drops_the_oldest(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    own_redis_server.stop()
    metrics = Metrics(CollectorRegistry())
    store = resilient(redis_store(own_redis_server.url), metrics, spool_size=3)
    with caplog.at_level(logging.WARNING, logger="extproc.store"):
        for index in range(5):
            await store.settle([], entry(f"m{index}", total=index + 2), NOW)
    assert store.spooled == 3
    assert sample(metrics, "maas_spool_dropped_total") == 2
    assert (
        sum("spool full" in r.getMessage() for r in caplog.records) == 1
    )  # one line, not one each

    own_redis_server.start()
    await wait_until(lambda: store.spooled == 0)
    rows = await store.ledger("alice", [TODAY])
    assert [row.model for row in rows] == ["m2", "m3", "m4"]
    await store.close()


async def test_close_flushes_or_counts_what_is_lost(own_redis_server: RedisServer) -> None:
    metrics = Metrics(CollectorRegistry())
    own_redis_server.stop()
    store = ResilientStore(
        redis_store(own_redis_server.url, timeout_s=0.2),
        StoreConfig(),
        metrics,
        retry_initial_s=5.0,  # no replay before close: close must do the flush
        close_timeout_s=0.5,
    )
    await store.settle([], entry("lost"), NOW)
    await store.close()
    assert sample(metrics, "maas_spool_dropped_total") == 1

    own_redis_server.start()
    store = ResilientStore(
        redis_store(own_redis_server.url), StoreConfig(), metrics, retry_initial_s=5.0
    )
    own_redis_server.stop()
    await store.settle([], entry("kept"), NOW)
    own_redis_server.start()
    await store.close()
    check = redis_store(own_redis_server.url)
    assert [row.model for row in await check.ledger("alice", [TODAY])] == ["kept"]
    await check.close()


async def test_resilient_store_wraps_the_memory_store() -> None:
    metrics = Metrics(CollectorRegistry())
    store = resilient(MemoryStore(), metrics)
    await store.start()
    counter = WindowCounter(keys.tokens_key("alice", "free"), 100, 60_000, 30)
    result = await store.admit([counter], NOW)
    assert result.allowed
    adjustment = Adjustment(counter.key, 60_000, result.states[0].window_start_ms, 30, 5)
    await store.settle([adjustment], entry(total=5), NOW)
    assert (await store.ledger("alice", [TODAY]))[0].total_tokens == 5
    assert await store.ledger_users([TODAY]) == ["alice"]
    await store.ping()
    assert sample(metrics, "maas_store_seconds_count", {"op": "admit"}) == 1
    assert sample(metrics, "maas_store_seconds_count", {"op": "settle"}) == 1
    await store.close()


# ------------------------------------------------------------------------ URLs and secrets


async def test_password_url_works_and_never_shows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password = "s3cr3t-Pa55"
    server = RedisServer(tmp_path / "auth", 0, "--requirepass", password)
    server.start()
    try:
        good = f"redis://:{password}@127.0.0.1:{server.port}/0"
        wrong = f"redis://default:n0t-{password}@127.0.0.1:{server.port}/0"
        metrics = Metrics(CollectorRegistry())
        with caplog.at_level(logging.DEBUG):
            store = resilient(redis_store(good), metrics)
            await store.start()
            assert (await store.admit([], NOW)).allowed
            await store.settle([], entry(), NOW)
            assert (await store.ledger("alice", [TODAY]))[0].total_tokens == 10
            shown = [repr(store), str(store), repr(StoreConfig(url=Secret(good)))]

            bad = resilient(redis_store(wrong), metrics)
            with pytest.raises(StoreUnavailable) as refused:
                await bad.admit([WindowCounter("k", 1, 1000, 1)], NOW)
            shown += [str(refused.value), repr(refused.value), repr(bad)]
            await bad.settle([], entry(), NOW)  # spooled, with a log line
            await bad.close()

            server.stop()
            with pytest.raises(StoreUnavailable) as down:
                await store.ping()
            shown.append(str(down.value))
            await store.close()
        text = "\n".join(shown) + caplog.text
        assert password not in text
        assert "***@127.0.0.1" in text
    finally:
        server.stop()


async def test_tls_url(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    tls = ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert))
    tls += ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert))
    server = RedisServer(tmp_path / "tls", port, *tls, "--tls-auth-clients", "no")
    server.start()
    try:
        store = redis_store(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
        await store.settle([], entry(), NOW)
        assert (await store.ledger("alice", [TODAY]))[0].total_tokens == 10
        await store.close()
        plain = redis_store(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
        with pytest.raises(StoreUnavailable):
            await plain.ping()
        await plain.close()
    finally:
        server.stop()


async def test_sentinel_url(own_redis_server: RedisServer, tmp_path: Path) -> None:
    sentinel = RedisSentinel(tmp_path / "sentinel", own_redis_server.port)
    sentinel.start()
    try:
        store = redis_store(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster")
        counter = WindowCounter(keys.tokens_key("alice", "free"), 100, 60_000, 30)
        assert (await store.admit([counter], NOW)).states[0].value == 30
        await store.close()
        raw = Redis.from_url(own_redis_server.url, decode_responses=True)
        assert await raw.hget(counter.key, "v") == "30"
        await raw.aclose()
    finally:
        sentinel.stop()


async def test_cluster_url_with_a_host_list(redis_cluster: Any) -> None:
    store = redis_store(redis_cluster.url)
    users = [f"user{i}" for i in range(20)]  # spread over the three masters
    for user in users:
        await store.settle([], entry(user=user), NOW)
    assert await store.ledger_users([TODAY]) == sorted(users)
    assert "***" not in repr(store)
    await store.close()


async def test_a_hung_server_times_out_as_unavailable(own_redis_server: RedisServer) -> None:
    store = redis_store(own_redis_server.url, timeout_s=0.3)
    counter = WindowCounter(keys.tokens_key("alice", "free"), 100, 60_000, 30)
    await store.admit([counter], NOW)
    process = own_redis_server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await store.admit([counter], NOW)
    finally:
        process.send_signal(signal.SIGCONT)
    assert (await store.admit([counter], NOW)).states[0].value in (60, 90)
    await store.close()
