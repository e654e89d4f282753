"""The STREAMED layout (`full`: ext_authz over gRPC, ext_proc following every response chunk),
kept as the fallback now that `lean` is the default: the default's accounting and gateway cases
run here again against it, unchanged; its hostile numbers in test_streamed_hostile.py (a free
window of its own), and the fault tests in both layouts (tests/e2e/test_faults.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from extproc.stack import LocalStack
from tests.e2e.support import sample
from tests.e2e.test_accounting import (
    test_anthropic_messages_json_and_stream,
    test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate,
    test_hidden_injected_usage_never_reaches_the_client_but_is_charged,
    test_legacy_completions_stream_is_rewritten_too,
    test_missing_usage_on_success_is_a_flagged_estimate,
    test_non_stream_is_charged_exactly,
    test_stream_with_include_usage_is_charged_exactly,
    test_stream_without_include_usage_is_asked_for_it_and_charged_exactly,
    test_totals_match_the_simulator_record,
    test_upstream_error_without_usage_is_not_charged,
)
from tests.e2e.test_gateway import (
    test_cors_preflight_is_not_refused_for_lack_of_a_token,
    test_free_tier_over_its_token_limit_gets_429_with_retry_after,
    test_models_route_passes_uncharged,
    test_no_token_gets_401_with_a_bearer_challenge,
    test_non_streamed_charge_equals_the_simulator_record,
    test_spoofed_maas_headers_never_reach_the_upstream,
    test_streamed_with_include_usage_charges_the_simulator_record,
    test_user_without_a_tier_gets_403,
)
from tests.helpers import CHAT, KEYS

__all__ = [
    "test_anthropic_messages_json_and_stream",
    "test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate",
    "test_cors_preflight_is_not_refused_for_lack_of_a_token",
    "test_free_tier_over_its_token_limit_gets_429_with_retry_after",
    "test_hidden_injected_usage_never_reaches_the_client_but_is_charged",
    "test_legacy_completions_stream_is_rewritten_too",
    "test_missing_usage_on_success_is_a_flagged_estimate",
    "test_models_route_passes_uncharged",
    "test_no_token_gets_401_with_a_bearer_challenge",
    "test_non_stream_is_charged_exactly",
    "test_non_streamed_charge_equals_the_simulator_record",
    "test_spoofed_maas_headers_never_reach_the_upstream",
    "test_stream_with_include_usage_is_charged_exactly",
    "test_stream_without_include_usage_is_asked_for_it_and_charged_exactly",
    "test_streamed_with_include_usage_charges_the_simulator_record",
    "test_totals_match_the_simulator_record",
    "test_upstream_error_without_usage_is_not_charged",
    "test_user_without_a_tier_gets_403",
]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """Overrides the conftest stack: the STREAMED layout."""
    with LocalStack(topology="full") as running:
        yield running


@pytest.fixture(scope="module")
def hiding_stack() -> Iterator[LocalStack]:
    """Overrides test_accounting's: the STREAMED layout hides the injected usage chunk itself."""
    env = {"MAAS_EXTPROC_ACCOUNTING_HIDE_INJECTED_USAGE": "true"}
    with LocalStack(topology="full", env=env) as running:
        yield running


def test_the_sidecar_follows_each_response_here(stack: LocalStack) -> None:
    """This module does test STREAMED: each charged response is an ext_proc stream."""
    streams = sample(stack, "maas_stream_seconds_count")
    response = httpx.post(
        stack.url + CHAT,
        json={"model": "m-streamed", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEYS['premium']}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 3
    while sample(stack, "maas_stream_seconds_count") == streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sample(stack, "maas_stream_seconds_count") > streams
