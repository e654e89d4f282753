"""The accounting cases in the accesslog layout: Envoy reads the usage (sse_to_metadata,
json_to_metadata) and reports each finished request once over its gRPC access log; the
include_usage rewrite is the split layout's on-demand injector. No ext_proc follows a response."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from extproc.stack import LocalStack
from tests.e2e.support import quiet_sample, sample
from tests.e2e.test_accounting import (
    PROMPT,
    _await_record,
    charged,
    charges,
    client,
    new_model,
    test_anthropic_messages_json_and_stream,
    test_legacy_completions_stream_is_rewritten_too,
    test_missing_usage_on_success_is_a_flagged_estimate,
    test_non_stream_is_charged_exactly,
    test_stream_with_include_usage_is_charged_exactly,
    test_stream_without_include_usage_is_asked_for_it_and_charged_exactly,
    test_totals_match_the_simulator_record,
    test_upstream_error_without_usage_is_not_charged,
)
from tests.e2e.test_gateway import (
    test_free_tier_over_its_token_limit_gets_429_with_retry_after,
    test_models_route_passes_uncharged,
    test_spoofed_maas_headers_never_reach_the_upstream,
)

__all__ = [
    "test_anthropic_messages_json_and_stream",
    "test_free_tier_over_its_token_limit_gets_429_with_retry_after",
    "test_legacy_completions_stream_is_rewritten_too",
    "test_missing_usage_on_success_is_a_flagged_estimate",
    "test_models_route_passes_uncharged",
    "test_non_stream_is_charged_exactly",
    "test_spoofed_maas_headers_never_reach_the_upstream",
    "test_stream_with_include_usage_is_charged_exactly",
    "test_stream_without_include_usage_is_asked_for_it_and_charged_exactly",
    "test_totals_match_the_simulator_record",
    "test_upstream_error_without_usage_is_not_charged",
]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """Overrides the conftest stack: ext_authz, the on-demand injector, usage read by Envoy."""
    with LocalStack(topology="accesslog") as running:
        yield running


def test_a_client_that_leaves_is_charged_a_flagged_estimate_within_its_reservation(
    stack: LocalStack,
) -> None:
    """The sidecar sees no text here: the bytes sent stand for it, cut to the reservation."""
    model = new_model()
    estimated_before = charges(stack, "estimated")
    disconnects_before = quiet_sample(stack, "maas_disconnects_total", tier="premium")
    stream = client(stack, **{"x-sim-delay-ms": "40"}).chat.completions.create(
        model=model, messages=PROMPT, max_tokens=60, stream=True
    )
    for seen, _ in enumerate(stream, 1):
        if seen == 5:
            break
    stream.close()
    record = _await_record(stack, model)
    assert record["completed"] is False
    assert charges(stack, "estimated", at_least=estimated_before + 1) == estimated_before + 1
    assert sample(stack, "maas_disconnects_total", tier="premium") == disconnects_before + 1
    prompt_estimate = round(len(PROMPT[0]["content"]) / 4)
    assert charged(stack, model, "prompt") == pytest.approx(prompt_estimate, abs=1)
    assert 0 < charged(stack, model, "completion") <= 60  # never past the completion bound


def test_an_upstream_that_resets_mid_stream_is_charged_a_flagged_estimate(
    stack: LocalStack,
) -> None:
    model = new_model()
    before = charges(stack, "estimated")
    stream = client(stack, **{"x-sim-abort-after": "3"}).chat.completions.create(
        model=model, messages=PROMPT, max_tokens=30, stream=True
    )
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the client makes of the reset
        list(stream)
    assert charges(stack, "estimated", at_least=before + 1) == before + 1
    assert 0 < charged(stack, model) <= 30 + len(PROMPT[0]["content"]) // 4 + 1


def test_the_sidecar_never_follows_a_response_body(stack: LocalStack) -> None:
    """Only the injector's request-side streams reach ext_proc: no stream per response."""
    streams = sample(stack, "maas_stream_seconds_count")
    list(
        client(stack).chat.completions.create(
            model=new_model(),
            messages=PROMPT,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    time.sleep(0.2)
    assert sample(stack, "maas_stream_seconds_count") == streams
