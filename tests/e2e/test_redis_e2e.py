"""The gateway with a Redis store: ledger sums equal what was served, through a Redis outage too."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from extproc.config import Secret, StoreConfig
from extproc.stack import LocalStack
from extproc.store.redis import RedisStore
from tests.e2e.support import sample, sim_records
from tests.helpers import CHAT, KEYS
from tests.redis_fixtures import RedisServer


@pytest.fixture
def redis_stack(own_redis_server: RedisServer) -> Iterator[LocalStack]:
    env = {"MAAS_EXTPROC_STORE_URL": own_redis_server.url, "MAAS_EXTPROC_STORE_TIMEOUT_S": "0.3"}
    with LocalStack(env=env) as stack:
        yield stack


def ledger_total(url: str, user: str) -> int:
    async def read() -> int:
        store = RedisStore.from_config(StoreConfig(url=Secret(url)))
        try:
            day = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
            return sum(row.total_tokens for row in await store.ledger(user, [day]))
        finally:
            await store.close()

    return asyncio.run(read())


def traffic(stack: LocalStack, model: str, count: int) -> list[int]:
    statuses = []
    for i in range(count):
        body: dict[str, object] = {
            "model": model,
            "max_tokens": 3 + i % 4,
            "messages": [{"role": "user", "content": "a few words here"}],
        }
        if i % 2:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        response = httpx.post(
            stack.url + CHAT,
            json=body,
            headers={"Authorization": f"Bearer {KEYS['premium']}"},
            timeout=10,
        )
        statuses.append(response.status_code)
    return statuses


def served_total(stack: LocalStack, model: str) -> int:
    return sum(int(r["total_tokens"]) for r in sim_records(stack) if r["model"] == model)


def test_ledger_sums_match_the_simulator_record(
    redis_stack: LocalStack, own_redis_server: RedisServer
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    assert traffic(redis_stack, model, 8) == [200] * 8
    assert ledger_total(own_redis_server.url, "bob") == served_total(redis_stack, model) > 0


def test_a_redis_outage_mid_traffic_loses_no_charge(
    redis_stack: LocalStack, own_redis_server: RedisServer
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    assert traffic(redis_stack, model, 4) == [200] * 4
    own_redis_server.cli_command("SAVE")  # keep what was charged so far across the restart
    own_redis_server.stop()
    assert traffic(redis_stack, model, 6) == [200] * 6  # fail_open: admitted, charges spooled
    assert sample(redis_stack, "maas_spool_depth") > 0
    own_redis_server.start()
    deadline = time.monotonic() + 30
    while sample(redis_stack, "maas_spool_depth") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sample(redis_stack, "maas_spool_depth") == 0
    assert sample(redis_stack, "maas_spool_dropped_total") == 0
    assert ledger_total(own_redis_server.url, "bob") == served_total(redis_stack, model)


def test_fail_closed_answers_503_while_redis_is_down(own_redis_server: RedisServer) -> None:
    env = {
        "MAAS_EXTPROC_STORE_URL": own_redis_server.url,
        "MAAS_EXTPROC_STORE_FAILURE_POLICY": "fail_closed",
        "MAAS_EXTPROC_STORE_TIMEOUT_S": "0.3",
    }
    with LocalStack(env=env) as stack:
        model = f"m-{uuid.uuid4().hex[:8]}"
        assert traffic(stack, model, 1) == [200]
        own_redis_server.stop()
        refused = httpx.post(
            stack.url + CHAT,
            json={"model": model, "messages": []},
            headers={"Authorization": f"Bearer {KEYS['premium']}"},
            timeout=10,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "unavailable"
        models = httpx.get(
            stack.url + "/llm/x/v1/models",
            headers={"Authorization": f"Bearer {KEYS['premium']}"},
            timeout=10,
        )
        assert models.status_code == 200  # never limited, so the store is not needed
        own_redis_server.start()
        assert traffic(stack, model, 1) == [200]


def command_calls(server: RedisServer) -> dict[str, int]:
    """Calls per command from ``INFO commandstats`` (script-inner commands count under their own
    names, so ``evalsha`` counts exactly the scripts clients ran)."""
    calls: dict[str, int] = {}
    for line in server.cli_command("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_") :].partition(":")
            calls[name] = int(stats.split("calls=", 1)[1].split(",", 1)[0])
    return calls


def test_one_round_trip_at_admission_and_one_at_completion(
    redis_stack: LocalStack, own_redis_server: RedisServer
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    assert traffic(redis_stack, model, 1) == [200]  # the day's first charge also adds the user
    before = command_calls(own_redis_server)
    assert traffic(redis_stack, model, 10) == [200] * 10
    after = command_calls(own_redis_server)
    sent = {name: after[name] - before.get(name, 0) for name in after}
    assert sent["evalsha"] == 20  # one script per admission, one per settle
    assert sent.get("sadd", 0) == 0
    # Commands scripts run are counted too, so commandstats cannot tell a client's stray call
    # from a script's; tests/integration/test_store_redis.py checks the exact client commands
    # with MONITOR.
