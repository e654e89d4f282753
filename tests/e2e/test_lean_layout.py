"""The lean layout end to end: the accesslog layout's accounting with admission asked over HTTP
(Envoy's ext_authz http_service): the same refusals, headers and charges as over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.stack import LocalStack
from tests.e2e.support import sim_records
from tests.e2e.test_accesslog_layout import (
    test_a_client_that_leaves_is_charged_a_flagged_estimate_within_its_reservation,
    test_an_upstream_that_resets_mid_stream_is_charged_a_flagged_estimate,
    test_anthropic_messages_json_and_stream,
    test_free_tier_over_its_token_limit_gets_429_with_retry_after,
    test_legacy_completions_stream_is_rewritten_too,
    test_missing_usage_on_success_is_a_flagged_estimate,
    test_models_route_passes_uncharged,
    test_non_stream_is_charged_exactly,
    test_spoofed_maas_headers_never_reach_the_upstream,
    test_stream_with_include_usage_is_charged_exactly,
    test_stream_without_include_usage_is_asked_for_it_and_charged_exactly,
    test_the_sidecar_never_follows_a_response_body,
    test_totals_match_the_simulator_record,
    test_upstream_error_without_usage_is_not_charged,
)
from tests.e2e.test_accounting import (
    test_client_that_leaves_mid_stream_is_charged_a_flagged_estimate,
    test_hidden_injected_usage_never_reaches_the_client_but_is_charged,
)
from tests.e2e.test_gateway import (
    test_cors_preflight_is_not_refused_for_lack_of_a_token,
    test_no_token_gets_401_with_a_bearer_challenge,
    test_user_without_a_tier_gets_403,
)
from tests.e2e.test_tls_e2e import ENVOY_ID, charged_tokens, chat, sidecar_tls
from tests.tls_fixtures import Pki

__all__ = [
    "test_a_client_that_leaves_is_charged_a_flagged_estimate_within_its_reservation",
    "test_an_upstream_that_resets_mid_stream_is_charged_a_flagged_estimate",
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
    "test_spoofed_maas_headers_never_reach_the_upstream",
    "test_stream_with_include_usage_is_charged_exactly",
    "test_stream_without_include_usage_is_asked_for_it_and_charged_exactly",
    "test_the_sidecar_never_follows_a_response_body",
    "test_totals_match_the_simulator_record",
    "test_upstream_error_without_usage_is_not_charged",
    "test_user_without_a_tier_gets_403",
]
# The stacks below are started per test: a module of its own would start the shared one too.


@pytest.fixture(scope="module")
def hiding_stack() -> Iterator[LocalStack]:
    """Overrides test_accounting's: the settle filter drops the injected usage chunk."""
    env = {"MAAS_EXTPROC_ACCOUNTING_HIDE_INJECTED_USAGE": "true"}
    with LocalStack(topology="lean", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """Overrides the conftest stack: HTTP ext_authz, the injector, usage read by Envoy."""
    with LocalStack(topology="lean") as running:
        yield running


def lean_over_mtls(pki: Pki, envoy_ca_name: str, log_dir: Path) -> LocalStack:
    """The lean layout with the sidecar's TLS: its HTTP authorization port speaks it too."""
    env = {"MAAS_EXTPROC_SERVER_TLS_CLIENT_NAMES": ENVOY_ID}
    tls = sidecar_tls(pki, envoy_ca_name)
    return LocalStack(topology="lean", sidecar_tls=tls, env=env, log_dir=log_dir).start()


def test_lean_over_mtls_admits_settles_and_charges(pki: Pki, tmp_path: Path) -> None:
    running = lean_over_mtls(pki, "mesh-ca", tmp_path)
    try:
        response = chat(running)
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit"]  # the HTTP check answered over mTLS
        assert charged_tokens(running) == response.json()["usage"]["total_tokens"] > 0
    finally:
        running.stop()


def test_lean_with_a_certificate_from_another_ca_gets_nothing_through(
    pki: Pki, tmp_path: Path
) -> None:
    stranger = lean_over_mtls(pki, "other-ca", tmp_path)
    try:
        response = chat(stranger)
        assert response.status_code == 503, response.text  # ext_authz fails closed
        assert response.json()["error"]["code"] == "unavailable"
        assert sim_records(stranger) == []  # nothing reached the model
        assert charged_tokens(stranger) == 0
    finally:
        stranger.stop()
