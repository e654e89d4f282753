"""Token kinds and cost end to end (issue #16): real Envoy, the sidecar, the simulator and a real Redis.

The simulator reports cached, cache-written and reasoning tokens as each provider documents them
(chat completions, the Responses API, Anthropic Messages; extproc/sim/server.py). Each response
must land in the right ledger kinds, with its cost in exact integer micro-units, in the default
`lean` layout (Envoy's usage rules read it, the settle filter posts it before the last byte), the
STREAMED layout (the sidecar reads the body) and the accesslog layout (Envoy's rules, its log).
The expected cost is worked out here from the simulator's record and the prices below, rounded
up per request, as the README says.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from extproc.stack import LocalStack
from extproc.store import keys
from tests.e2e.support import sim_records
from tests.helpers import KEYS, LOCAL
from tests.redis_fixtures import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

PREFIX = "/llm/facebook-opt-125m-simulated/v1"
REDIS_DB = 9
# Prices per million tokens, and the same in micro-units per million, written out by hand.
PRICES = {
    "input": "1.5",
    "cached_input": "0.25",
    "cache_creation": "1.875",
    "output": "6",
    "reasoning": "4.5",
}
MICROS = {
    "input": 1_500_000,
    "cached_input": 250_000,
    "cache_creation": 1_875_000,
    "output": 6_000_000,
    "reasoning": 4_500_000,
}
KINDS = ("cached_tokens", "cache_creation_tokens", "reasoning_tokens")


@pytest.fixture(scope="module", params=["lean", "full", "accesslog"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
) -> Iterator[LocalStack]:
    folder: Path = tmp_path_factory.mktemp("token-kinds")
    config = yaml.safe_load((LOCAL / "config.yaml").read_text())
    for section, key in (("identity", "api_keys_file"), ("tiers", "file")):
        config[section][key] = str(LOCAL / Path(config[section][key]).name)
    config["limits"]["tiers"]["premium"] = {"requests": 0, "tokens": 0}  # unlimited
    config["pricing"] = {"default": PRICES}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    redis_server.cli_command("-n", str(REDIS_DB), "flushdb")
    env = {"MAAS_EXTPROC_STORE_URL": f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"}
    topology = request.param
    with LocalStack(config_path=folder / "config.yaml", topology=topology, env=env) as running:
        yield running


def post(stack: LocalStack, path: str, body: dict[str, Any], **kinds: int) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS['premium']}"}
    headers |= {f"x-sim-{name.replace('_', '-')}": str(n) for name, n in kinds.items()}
    reply = httpx.post(stack.url + PREFIX + path, json=body, headers=headers, timeout=20)
    assert reply.status_code == 200, reply.text
    return reply


def served(stack: LocalStack, model: str) -> dict[str, Any]:
    found = [r for r in sim_records(stack) if r["model"] == model]
    assert len(found) == 1, found
    return found[0]


def expected_cost(record: dict[str, Any]) -> int:
    """What the simulator reported, priced: each kind apart, the sum rounded up to a micro-unit."""
    cached = record["cached_tokens"] or 0
    written = record["cache_write_tokens"] or 0
    reasoning = record["reasoning_tokens"] or 0
    parts = {
        "input": record["prompt_tokens"] - cached - written,
        "cached_input": cached,
        "cache_creation": written,
        "output": record["completion_tokens"] - reasoning,
        "reasoning": reasoning,
    }
    exact = sum(Fraction(n * MICROS[kind], 1_000_000) for kind, n in parts.items())
    return math.ceil(exact)


def ledger_row(stack: LocalStack, model: str) -> dict[str, Any]:
    """The model's row of the usage API, waiting for the charge (it lands after the reply)."""
    today = dt.datetime.now(tz=dt.UTC).date()
    params = {"group_by": "model", "from": (today - dt.timedelta(days=1)).isoformat()}
    auth = {"Authorization": f"Bearer {KEYS['premium']}"}
    for _ in range(100):
        reply = httpx.get(
            f"http://127.0.0.1:{stack.usage_port}/v1/usage", params=params, headers=auth, timeout=5
        )
        rows = {row["model"]: row for row in reply.json()["rows"]}
        if model in rows and rows[model]["requests"] == 1:
            return dict(rows[model], user=reply.json()["user"])
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {model}")


def stored_cost(redis_server: RedisServer, user: str, model: str) -> str:
    """The ledger's cost field as Redis holds it (a plain integer string, not a float)."""
    client = redis.Redis(port=redis_server.port, db=REDIS_DB, decode_responses=True)
    try:
        day = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
        value = client.hget(keys.ledger_key(user, day), keys.ledger_field(model, "cost"))
    finally:
        client.close()
    assert isinstance(value, str)
    return value


def check(stack: LocalStack, redis_server: RedisServer, model: str, want: dict[str, Any]) -> None:
    record = served(stack, model)
    row = ledger_row(stack, model)
    assert {k: row[k] for k in want} == want
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        record["prompt_tokens"],
        record["completion_tokens"],
    )
    cost = expected_cost(record)
    assert (row["cost_micros"], row["priced_requests"]) == (cost, 1)
    assert stored_cost(redis_server, str(row["user"]), model) == str(cost)


def test_chat_stream_with_cached_and_reasoning_tokens(
    stack: LocalStack, redis_server: RedisServer
) -> None:
    model = f"kinds-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 7}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    post(stack, "/chat/completions", body, cached_tokens=96, reasoning_tokens=21)
    want = {"cached_tokens": 96, "cache_creation_tokens": None, "reasoning_tokens": 21}
    check(stack, redis_server, model, want)


def test_responses_with_cached_cache_written_and_reasoning_tokens(
    stack: LocalStack, redis_server: RedisServer
) -> None:
    model = f"kinds-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "input": "one two three", "max_output_tokens": 5}
    post(stack, "/responses", body, cached_tokens=64, cache_write_tokens=33, reasoning_tokens=40)
    want = {"cached_tokens": 64, "cache_creation_tokens": 33, "reasoning_tokens": 40}
    check(stack, redis_server, model, want)


def test_anthropic_stream_with_cache_reads_writes_and_thinking(
    stack: LocalStack, redis_server: RedisServer
) -> None:
    model = f"kinds-{uuid.uuid4().hex[:8]}"
    body = {
        "model": model,
        "max_tokens": 6,
        "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    }
    post(stack, "/messages", body, cached_tokens=1000, cache_write_tokens=250, reasoning_tokens=9)
    want = {"cached_tokens": 1000, "cache_creation_tokens": 250, "reasoning_tokens": 9}
    check(stack, redis_server, model, want)


def test_a_response_without_kinds_shows_null_not_zero(
    stack: LocalStack, redis_server: RedisServer
) -> None:
    model = f"kinds-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4}
    post(stack, "/chat/completions", body)
    check(stack, redis_server, model, dict.fromkeys(KINDS))
