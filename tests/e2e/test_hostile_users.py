"""Hostile user ids and model names through the real Envoy: own counters, a bounded `model` label."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import LocalStack
from tests.helpers import CHAT, KEYS, LOCAL

# Two API-key users whose ids the old key builder mapped to one hash tag: "{" was written "(".
BRACE_KEY, PAREN_KEY = "brace-user-key", "paren-user-key"
KNOWN_MODEL = "granite-known"  # named in limits.models, so it may be a label


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    folder: Path = tmp_path_factory.mktemp("hostile-users")
    api_keys = yaml.safe_load((LOCAL / "api-keys.yaml").read_text())
    for key, user in ((BRACE_KEY, "a{b"), (PAREN_KEY, "a(b")):
        digest = hashlib.sha256(key.encode()).hexdigest()
        api_keys["keys"].append({"sha256": digest, "user": user, "groups": ["tier-free-users"]})
    (folder / "api-keys.yaml").write_text(yaml.safe_dump(api_keys))
    config = yaml.safe_load((LOCAL / "config.yaml").read_text())
    config["identity"]["api_keys_file"] = str(folder / "api-keys.yaml")
    config["tiers"]["file"] = str(LOCAL / "tiers.yaml")
    config["limits"]["tiers"]["enterprise"] = {"requests": 0, "tokens": 0}  # unlimited
    config["limits"]["models"] = {"enterprise": {KNOWN_MODEL: {"tokens": 0}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with LocalStack(config_path=folder / "config.yaml") as running:
        yield running


def chat(stack: LocalStack, key: str, model: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(stack.url + CHAT, json=body, headers=headers, timeout=10).status_code


def test_users_a_brace_b_and_a_paren_b_have_counters_of_their_own(stack: LocalStack) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    # The free tier's 100 tokens a minute: two 61-token answers use up a{b's window ...
    assert [chat(stack, BRACE_KEY, model, 60) for _ in range(3)] == [200, 200, 429]
    # ... and none of a(b's.
    assert chat(stack, PAREN_KEY, model, 60) == 200


def model_labels(stack: LocalStack) -> set[str]:
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(stack.metrics_text())
        for sample in family.samples
        if sample.name == "maas_tokens_total"
    }


async def charge_random_models(stack: LocalStack, count: int) -> list[int]:
    limit = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {KEYS['enterprise']}"}

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": f"rnd-{i}-{uuid.uuid4().hex}", "max_tokens": 1, "messages": []}
        async with limit:
            response = await client.post(stack.url + CHAT, json=body, headers=headers)
        return response.status_code

    async with httpx.AsyncClient(timeout=20) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


def test_a_thousand_random_model_names_do_not_make_a_thousand_series(stack: LocalStack) -> None:
    assert chat(stack, KEYS["enterprise"], KNOWN_MODEL, 1) == 200
    statuses = asyncio.run(charge_random_models(stack, 1000))
    assert statuses == [200] * 1000
    assert model_labels(stack) == {KNOWN_MODEL, "other"}
