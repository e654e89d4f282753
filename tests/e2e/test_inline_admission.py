"""The gateway cases again with admission inside the ext_proc stream (no ext_authz filter)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.stack import LocalStack
from tests.e2e.test_accounting import (
    test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate,
    test_stream_without_include_usage_is_asked_for_it_and_charged_exactly,
    test_upstream_error_without_usage_is_not_charged,
)
from tests.e2e.test_gateway import (
    test_free_tier_over_its_token_limit_gets_429_with_retry_after,
    test_models_route_passes_uncharged,
    test_no_token_gets_401_with_a_bearer_challenge,
    test_non_streamed_charge_equals_the_simulator_record,
    test_spoofed_maas_headers_never_reach_the_upstream,
    test_streamed_with_include_usage_charges_the_simulator_record,
    test_user_without_a_tier_gets_403,
)

__all__ = [
    "test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate",
    "test_free_tier_over_its_token_limit_gets_429_with_retry_after",
    "test_models_route_passes_uncharged",
    "test_no_token_gets_401_with_a_bearer_challenge",
    "test_non_streamed_charge_equals_the_simulator_record",
    "test_spoofed_maas_headers_never_reach_the_upstream",
    "test_stream_without_include_usage_is_asked_for_it_and_charged_exactly",
    "test_streamed_with_include_usage_charges_the_simulator_record",
    "test_upstream_error_without_usage_is_not_charged",
    "test_user_without_a_tier_gets_403",
]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """Overrides the conftest stack: Envoy with only the ext_proc filter."""
    with LocalStack(topology="extproc") as running:
        assert "v3.ExtAuthz" not in (running.log_dir / "envoy.yaml").read_text()  # type: ignore[operator]
        yield running
