"""The gen_ai metrics reach a real OTLP receiver over both transports, with the semconv's names,
units, buckets and attributes, and the token kinds adding up to the charged totals."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from extproc.config import parse
from extproc.domain import Charge, Usage
from extproc.observability.model_labels import ModelLabels
from extproc.observability.telemetry import (
    DURATION_BUCKETS,
    REQUEST_DURATION,
    TOKEN_BUCKETS,
    TOKEN_USAGE,
    GenAiTelemetry,
    build_telemetry,
    metrics_url,
    operation_of,
)
from extproc.stack import free_port
from tests.otlp_receiver import OtlpReceiver

CHAT = "/llm/ns/model-a/v1/chat/completions"
MESSAGES = "/v1/messages"
KNOWN = ModelLabels(["model-a", "claude"])
CUMULATIVE = 2  # opentelemetry.proto.metrics.v1.AggregationTemporality
# OpenAI: 100 prompt tokens, 30 of them cached; 50 completion tokens, 20 of them reasoning.
OPENAI = Usage(
    prompt_tokens=100, completion_tokens=50, total_tokens=150, cached_tokens=30, reasoning_tokens=20
)
# Anthropic, added up: 10 new + 40 read + 25 written input tokens; 7 output tokens.
ANTHROPIC = Usage(prompt_tokens=75, completion_tokens=7, cached_tokens=40, cache_creation_tokens=25)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def telemetry_for(endpoint: str, protocol: str = "http/protobuf", **otlp: object) -> GenAiTelemetry:
    config = parse(
        {
            "telemetry": {
                "otlp": {"endpoint": endpoint, "protocol": protocol, **otlp},
                "resource_attributes": {"deployment.environment.name": "test"},
            }
        },
        serving=False,
    )
    telemetry = build_telemetry(config.telemetry, KNOWN)
    assert telemetry is not None
    return telemetry


def charge_some(telemetry: GenAiTelemetry) -> None:
    for _ in range(3):
        telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    telemetry.submit(Charge("bob", "premium", "claude", ANTHROPIC, path=MESSAGES))
    telemetry.submit(Charge("eve", "free", "made-up", Usage(total_tokens=9), path=CHAT))
    telemetry.submit(Charge("eve", "free", "model-a", Usage(), path=CHAT))  # no usage: left out


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_token_usage_by_type_and_model(receiver: OtlpReceiver, protocol: str) -> None:
    endpoint = receiver.http_url if protocol == "http/protobuf" else receiver.grpc_url
    telemetry = telemetry_for(endpoint, protocol, headers={"x-collector-token": "s3cret"})
    charge_some(telemetry)
    assert telemetry.export()
    totals = receiver.totals(TOKEN_USAGE, "gen_ai.token.type", "gen_ai.request.model")
    assert totals == {
        ("input", "model-a"): (300.0, 3),  # cached tokens are input tokens
        ("output", "model-a"): (150.0, 3),  # reasoning tokens are output tokens
        ("input", "claude"): (75.0, 1),
        ("output", "claude"): (7.0, 1),
        ("input", "other"): (9.0, 1),  # client-chosen names are bounded; total-only is input
    }
    usage = "gen_ai.client.inference.usage."
    by_model = {
        name: receiver.totals(usage + name, "gen_ai.request.model")
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read.input_tokens",
            "cache_write.input_tokens",
            "reasoning.output_tokens",
        )
    }
    assert by_model == {
        "input_tokens": {("model-a",): (300, 0), ("claude",): (75, 0), ("other",): (9, 0)},
        "output_tokens": {("model-a",): (150, 0), ("claude",): (7, 0)},
        "cache_read.input_tokens": {("model-a",): (90, 0), ("claude",): (40, 0)},
        "cache_write.input_tokens": {("claude",): (25, 0)},
        "reasoning.output_tokens": {("model-a",): (60, 0)},
    }
    point = next(
        p for p in receiver.points(TOKEN_USAGE) if p.attributes["gen_ai.token.type"] == "input"
    )
    assert point.unit == "{token}"
    assert point.bounds == TOKEN_BUCKETS
    assert point.temporality == CUMULATIVE
    assert point.resource["service.name"] == "maas-extproc"
    assert point.resource["deployment.environment.name"] == "test"
    assert point.resource["service.instance.id"]
    claude = next(p for p in receiver.points(usage + "cache_write.input_tokens"))
    assert claude.monotonic
    assert dict(claude.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude",
        "gen_ai.token.modality": "unknown",
        "maas.tier": "premium",
    }
    assert receiver.headers[-1]["x-collector-token"] == "s3cret"
    telemetry.shutdown()


def test_totals_are_cumulative_across_exports(receiver: OtlpReceiver) -> None:
    telemetry = telemetry_for(receiver.http_url)
    telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    assert telemetry.export()
    telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    assert telemetry.export()
    sums = [
        p.value
        for p in receiver.points(TOKEN_USAGE)
        if p.attributes["gen_ai.token.type"] == "output"
    ]
    assert sums == [50.0, 100.0]
    assert receiver.totals(TOKEN_USAGE, "gen_ai.token.type")[("output",)] == (100.0, 2)


def test_the_thread_exports_on_its_own_and_once_more_at_shutdown(receiver: OtlpReceiver) -> None:
    telemetry = telemetry_for(receiver.http_url, interval_s="200ms")
    telemetry.start()
    telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    deadline = time.monotonic() + 10
    while not receiver.points(TOKEN_USAGE) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.points(TOKEN_USAGE)
    telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    telemetry.shutdown()  # the last charge goes out with the final export
    assert receiver.totals(TOKEN_USAGE, "gen_ai.token.type")[("input",)] == (200.0, 2)


def test_an_unreachable_collector_fails_exports_not_charges() -> None:
    telemetry = telemetry_for(f"http://127.0.0.1:{free_port()}", timeout_s="1s")
    telemetry.submit(Charge("alice", "free", "model-a", OPENAI, path=CHAT))
    assert not telemetry.export()
    assert telemetry.exports_failed == 1
    assert telemetry.failures == 0
    telemetry.shutdown()


def test_attribute_sets_are_bounded(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("extproc.observability.telemetry.MAX_SERIES", 3)
    telemetry = telemetry_for(receiver.http_url)
    for plan in ("a", "b", "c", "d", "e"):
        telemetry.submit(Charge("u", plan, "model-a", OPENAI, path=CHAT))
    assert telemetry.export()
    totals = receiver.totals(TOKEN_USAGE, "maas.tier", "otel.metric.overflow", "gen_ai.token.type")
    assert totals[(None, True, "input")] == (200.0, 2)
    assert {tier for tier, _, _ in totals} == {"a", "b", "c", None}


def test_operations_and_urls() -> None:
    assert operation_of("/llm/x/v1/chat/completions?a=1") == ("chat", "openai")
    assert operation_of("/v1/completions/") == ("text_completion", "openai")
    assert operation_of("/v1/embeddings") == ("embeddings", "openai")
    assert operation_of("/v1/responses") == ("chat", "openai")
    assert operation_of("/v1/messages") == ("chat", "anthropic")
    assert operation_of("/v1/other") == ("other", "openai")
    assert metrics_url("http://c:4318") == "http://c:4318/v1/metrics"
    assert metrics_url("http://c:4318/") == "http://c:4318/v1/metrics"
    assert metrics_url("https://c/otlp/v1/metrics") == "https://c/otlp/v1/metrics"


def test_off_by_default() -> None:
    config = parse({}, serving=False)
    assert build_telemetry(config.telemetry, KNOWN) is None


def test_request_durations_with_the_error_type(receiver: OtlpReceiver) -> None:
    telemetry = telemetry_for(receiver.http_url)
    for ms in (20, 700, 3000):
        telemetry.submit(Charge("a", "free", "model-a", OPENAI, path=CHAT, duration_ms=ms))
    failed = Charge("a", "free", "model-a", Usage(), path=CHAT, status=503, duration_ms=50)
    telemetry.submit(failed)  # no usage, no tokens: still a request that took its time
    telemetry.submit(Charge("a", "free", "model-a", OPENAI, path=CHAT))  # not measured
    assert telemetry.export()
    totals = receiver.totals(REQUEST_DURATION, "error.type", "gen_ai.request.model")
    assert totals == {
        (None, "model-a"): (pytest.approx(3.72), 3),
        ("503", "model-a"): (pytest.approx(0.05), 1),
    }
    point = next(p for p in receiver.points(REQUEST_DURATION) if "error.type" not in p.attributes)
    assert (point.unit, point.bounds) == ("s", DURATION_BUCKETS)
    assert receiver.totals(TOKEN_USAGE, "gen_ai.token.type")[("input",)] == (400.0, 4)


def test_the_subscription_era_names_the_subscription(receiver: OtlpReceiver) -> None:
    config = parse({"telemetry": {"otlp": {"endpoint": receiver.http_url}}}, serving=False)
    telemetry = build_telemetry(config.telemetry, KNOWN, era="subscriptions")
    assert telemetry is not None
    charge = Charge("u", "", "ns/model-x", OPENAI, path=CHAT, subscription="team/gold")
    telemetry.submit(charge)  # a subscription's model is a label of its own, within the bound
    assert telemetry.export()
    totals = receiver.totals(TOKEN_USAGE, "maas.subscription", "gen_ai.request.model", "maas.tier")
    assert totals == {("team/gold", "ns/model-x", None): (150.0, 2)}  # input and output
