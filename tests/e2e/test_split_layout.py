"""The accounting cases again in the split layout: observability-mode accounting, with the
include_usage rewrite done by a second ext_proc filter that Envoy skips unless it is needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.stack import LocalStack
from tests.e2e.test_accounting import (
    test_anthropic_messages_json_and_stream,
    test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate,
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
    "test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate",
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
    """Overrides the conftest stack: ext_authz, the on-demand injector, observability accounting."""
    with LocalStack(topology="split") as running:
        yield running
