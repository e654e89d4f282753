"""Traffic through the real Envoy reaches an OTLP receiver as gen_ai metrics, and Prometheus as
token kinds: the counts by token type and model equal what the simulator served.

The simulator serves cached, cache-written and reasoning tokens through ``x-sim-usage`` (the
response's usage object, verbatim), written in each provider's documented shape: OpenAI's
``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``,
Anthropic's ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` (which Anthropic's
``input_tokens`` does not include).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.stack import LocalStack
from tests.e2e.support import sample
from tests.helpers import KEYS, LOCAL
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.e2e

PREFIX = "/llm/facebook-opt-125m-simulated/v1"
MODELS = ("model-a", "model-b", "claude-c")  # named in limits.models: labels of their own
HEADERS = {"Authorization": f"Bearer {KEYS['enterprise']}"}
OPENAI_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 40,
    "total_tokens": 160,
    "prompt_tokens_details": {"cached_tokens": 64},
    "completion_tokens_details": {"reasoning_tokens": 16},
}
ANTHROPIC_USAGE = {
    "input_tokens": 10,
    "cache_read_input_tokens": 50,
    "cache_creation_input_tokens": 20,
    "output_tokens": 9,
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def config_file(folder: Path, receiver: OtlpReceiver) -> Path:
    config = yaml.safe_load((LOCAL / "config.yaml").read_text())
    config["identity"]["api_keys_file"] = str(LOCAL / "api-keys.yaml")
    config["tiers"]["file"] = str(LOCAL / "tiers.yaml")
    config["limits"]["tiers"]["enterprise"] = {"requests": 0, "tokens": 0}  # unlimited
    config["limits"]["models"] = {"enterprise": {m: {"tokens": 0} for m in MODELS}}
    config["telemetry"] = {"otlp": {"endpoint": receiver.http_url, "interval_s": "300ms"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalStack]:
    config = config_file(tmp_path_factory.mktemp("telemetry"), receiver)
    with LocalStack(config_path=config, workers=2) as running:
        yield running


def served(client: httpx.Client) -> list[tuple[str, dict[str, Any]]]:
    """Send the traffic; (model, usage the client received) for every response."""
    out = []
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 7}
    for model in ("model-a", "model-b"):
        for scripted in (True, False):
            headers = {**HEADERS, "x-sim-usage": json.dumps(OPENAI_USAGE)} if scripted else HEADERS
            reply = client.post(
                f"{PREFIX}/chat/completions", json={**chat, "model": model}, headers=headers
            )
            assert reply.status_code == 200, reply.text
            out.append((model, reply.json()["usage"]))
    stream = {**chat, "model": "model-a", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", f"{PREFIX}/chat/completions", json=stream, headers=HEADERS) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: {")]
    out.append(("model-a", json.loads(events[-1])["usage"]))
    headers = {**HEADERS, "x-sim-usage": json.dumps(ANTHROPIC_USAGE)}
    body = {**chat, "model": "claude-c"}
    reply = client.post(f"{PREFIX}/messages", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    out.append(("claude-c", reply.json()["usage"]))
    reply = client.post(
        f"{PREFIX}/embeddings", json={"model": "model-b", "input": "a b c"}, headers=HEADERS
    )
    assert reply.status_code == 200, reply.text
    out.append(("model-b", reply.json()["usage"]))
    return out


def kinds_of(usage: dict[str, Any]) -> dict[str, int]:
    """The billed kinds of one usage object, read from the providers' documented fields."""
    if "input_tokens" in usage:  # Anthropic: input_tokens excludes the cache reads and writes
        read, written = (
            usage.get("cache_read_input_tokens", 0),
            usage.get("cache_creation_input_tokens", 0),
        )
        return {"input": usage["input_tokens"], "cached_input": read, "cache_creation": written,
                "output": usage["output_tokens"], "reasoning": 0}  # fmt: skip
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    return {"input": usage["prompt_tokens"] - cached, "cached_input": cached,
            "cache_creation": 0, "output": completion - reasoning, "reasoning": reasoning}  # fmt: skip


def test_gen_ai_metrics_and_token_kinds_match_what_was_served(
    stack: LocalStack, receiver: OtlpReceiver
) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        responses = served(client)
    expected: dict[str, dict[str, int]] = {}
    requests: dict[str, int] = {}
    for model, usage in responses:
        per_model = expected.setdefault(model, dict.fromkeys(kinds_of(usage), 0))
        for kind, amount in kinds_of(usage).items():
            per_model[kind] += amount
        requests[model] = requests.get(model, 0) + 1
    assert expected["model-a"]["reasoning"]
    assert expected["claude-c"]["cache_creation"]
    want = {}
    for model, kinds in expected.items():
        want[("input", model)] = kinds["input"] + kinds["cached_input"] + kinds["cache_creation"]
        want[("output", model)] = kinds["output"] + kinds["reasoning"]

    def token_usage() -> dict[tuple[Any, ...], float]:
        totals = receiver.totals(
            "gen_ai.client.token.usage", "gen_ai.token.type", "gen_ai.request.model"
        )
        return {key: value for key, (value, _) in totals.items()}

    deadline = time.monotonic() + 30  # exports every 300 ms; the deadline only guards a hang
    while token_usage() != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert token_usage() == want
    counts = receiver.totals(
        "gen_ai.client.token.usage", "gen_ai.token.type", "gen_ai.request.model"
    )
    assert {model: counts[("input", model)][1] for model in requests} == requests
    subsets = {
        "cache_read.input_tokens": "cached_input",
        "cache_write.input_tokens": "cache_creation",
        "reasoning.output_tokens": "reasoning",
    }
    for name, kind in subsets.items():
        totals = receiver.totals(f"gen_ai.client.inference.usage.{name}", "gen_ai.request.model")
        got = {model: value for (model,), (value, _) in totals.items()}
        assert got == {m: k[kind] for m, k in expected.items() if k[kind]}, name
    operations = {
        (p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.provider.name"])
        for p in receiver.points("gen_ai.client.token.usage")
    }
    assert operations == {("chat", "openai"), ("chat", "anthropic"), ("embeddings", "openai")}
    # Two workers, two instances: their cumulative series are kept apart by the resource.
    instances = {
        p.resource["service.instance.id"] for p in receiver.points("gen_ai.client.token.usage")
    }
    assert 1 <= len(instances) <= 2
    # Each request's duration, from its headers to its last byte, as the ext_proc stream saw it.
    durations = receiver.totals("gen_ai.server.request.duration", "gen_ai.request.model")
    assert {model: count for (model,), (_, count) in durations.items()} == requests
    assert all(seconds > 0 for seconds, _ in durations.values())
    # Prometheus: the same kinds, disjoint, in maas_token_kind_total.
    for model, kinds in expected.items():
        for kind, amount in kinds.items():
            got = sample(stack, "maas_token_kind_total", tier="enterprise", model=model, kind=kind)
            assert got == amount, (model, kind)


def test_the_accesslog_layout_times_requests_by_envoys_entry(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Without an ext_proc stream, the duration is Envoy's, from the access log entry."""
    with OtlpReceiver() as receiver:
        config = config_file(tmp_path_factory.mktemp("telemetry-accesslog"), receiver)
        with (
            LocalStack(config_path=config, topology="accesslog") as stack,
            httpx.Client(base_url=stack.url, timeout=10) as client,
        ):
            body = {
                "model": "model-b",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            served = []
            for delay in (0, 50):  # chunks 50 ms apart: the second answer takes >= 150 ms
                headers = {**HEADERS, "x-sim-delay-ms": str(delay)}
                url = f"{PREFIX}/chat/completions"
                with client.stream("POST", url, json=body, headers=headers) as reply:
                    events = [line[6:] for line in reply.iter_lines() if line.startswith("data: {")]
                served.append(json.loads(events[-1])["usage"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                durations = receiver.totals(
                    "gen_ai.server.request.duration", "gen_ai.request.model"
                )
                if durations.get(("model-b",), (0, 0))[1] == 2:
                    break
                time.sleep(0.2)
            seconds, count = durations[("model-b",)]
            assert count == 2
            assert 0.15 <= seconds < 10
            tokens = receiver.totals("gen_ai.client.token.usage", "gen_ai.token.type")
            assert tokens[("input",)][0] == sum(u["prompt_tokens"] for u in served)
            assert tokens[("output",)][0] == sum(u["completion_tokens"] for u in served)
