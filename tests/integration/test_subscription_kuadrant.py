"""The subscription era's Kuadrant feed: the per-model TokenRateLimitPolicies MaaS's controller
writes, watched across namespaces (``gateway-default-deny`` ignored), and Reports into the limits
they become in Limitador (the emulator, written from Limitador's format), in the model route's
domain, with the subscription's labels."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.authz.kube import Kube
from extproc.config import KuadrantConfig, LimitsConfig
from extproc.domain import Charge, Rate, Usage
from extproc.kuadrant.limitador import LimitadorLimits
from extproc.kuadrant.policies import TOKEN_POLICIES, PolicyLimits, limit_names
from extproc.kuadrant.reporter import Reporter
from extproc.observability.metrics import Metrics
from tests.helpers import eventually
from tests.k8s_emulator import KubeEmulator
from tests.limitador_emulator import LimitadorEmulator

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
POLICIES = [
    d
    for d in yaml.safe_load_all(
        (UPSTREAM / "maas-c0639b1b-token-rate-limit-policies.yaml").read_text()
    )
    if d
]
SUB = "models-as-a-service/simulator-subscription"
TWO = "models-as-a-service/two-rates-subscription"
OPT = "llm/facebook-opt-125m-simulated"
DOMAIN = "llm/facebook-opt-125m-simulated-kserve-route"
LIMIT = "models-as-a-service-simulator-subscription-facebook-opt-125m-simulated-tokens"


def identifier(policy_ns: str, policy: str, limit: str) -> str:
    """Kuadrant's descriptor key for a TokenRateLimitPolicy limit, written out from its rule
    (CONTRACTS §9): non-alphanumerics as _, then __ and 8 hex of sha256("ns/policy/limit")."""
    digest = hashlib.sha256(f"{policy_ns}/{policy}/{limit}".encode()).hexdigest()[:8]
    return (
        "tokenlimit."
        + "".join(c if c.isalnum() or c == "_" else "_" for c in limit)
        + "__"
        + digest
    )


FLAG = identifier("llm", "maas-trlp-facebook-opt-125m-simulated", LIMIT)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        server.put_objects(POLICIES)
        yield server


@pytest.fixture
async def watched(kube: Kube, metrics: Metrics) -> AsyncIterator[PolicyLimits]:
    policies = PolicyLimits(
        kube.retain(),
        KuadrantConfig(policies="watch"),
        LimitsConfig(),
        metrics,
        kinds=(TOKEN_POLICIES,),
        namespace="",
        backoff_s=0.02,
    )
    yield policies
    await policies.close()


async def test_the_per_model_policy_is_understood_and_the_default_deny_ignored(
    watched: PolicyLimits, metrics: Metrics
) -> None:
    await eventually(lambda: watched.rates_for(f"{TWO}@{OPT}") is not None, "the policy")
    assert watched.rates_for(f"{SUB}@{OPT}") == (Rate(100, 60),)
    assert watched.rates_for(f"{TWO}@{OPT}") == (Rate(5000, 60), Rate(100_000, 86_400))
    assert watched.subscription_limit(f"{SUB}@{OPT}") == (
        "llm/maas-trlp-facebook-opt-125m-simulated",
        LIMIT,
    )
    # gateway-default-deny is not a limit the sidecar takes from policies: not even a warning.
    assert metrics.registry.get_sample_value("maas_policy_predicates_ignored_total") == 0
    assert watched.current().tiers == LimitsConfig().tiers  # the tier limits are untouched


@pytest.fixture
def limitador() -> Iterator[LimitadorEmulator]:
    with LimitadorEmulator() as server:
        # The limit Kuadrant makes of the policy's limit, in the route's namespace.
        server.set_limits(
            [
                {
                    "namespace": DOMAIN,
                    "max_value": 100,
                    "seconds": 60,
                    "name": LIMIT,
                    "conditions": [f'descriptors[0]["{FLAG}"] == "1"'],
                    "variables": ['descriptors[0]["auth.identity.userid"]'],
                }
            ]
        )
        yield server


def charge(tokens: int, **fields: Any) -> Charge:
    return Charge(
        "alice",
        "",
        OPT,
        Usage(total_tokens=tokens),
        route=DOMAIN,
        subscription=SUB,
        organization_id="org-1",
        cost_center="cc-2",
        **fields,
    )


@pytest.mark.parametrize("source", ["computed", "watched"])
async def test_reports_go_into_the_subscriptions_limit_with_its_labels(
    limitador: LimitadorEmulator, watched: PolicyLimits, metrics: Metrics, source: str
) -> None:
    config = KuadrantConfig(
        mode="all",
        batch_interval_s=0.02,
        limitador_grpc=limitador.grpc_target,
        limitador_http=limitador.http_url,
    )
    if source == "watched":
        await eventually(lambda: watched.subscription_limit(f"{SUB}@{OPT}") is not None, "policy")
    reporter = Reporter(
        config,
        metrics,
        LimitadorLimits(limitador.http_url, refresh_s=30, timeout_s=2),
        limit_names(config, None),
        declared=watched.subscription_limit if source == "watched" else lambda _key: None,
    )
    try:
        reporter.submit(charge(12))
        reporter.submit(charge(30, key_name="alice-laptop"))
        await eventually(lambda: limitador.counter(DOMAIN, LIMIT, "alice") == 42, "the reports")
    finally:
        await reporter.close()
    labels = [dict(hit.labels) for hit in limitador.reports]
    assert {tuple(sorted(label.items())) for label in labels} == {
        (
            ("cost_center", "cc-2"),
            ("model", OPT),
            ("organization_id", "org-1"),
            ("subscription", "simulator-subscription"),
            ("user", "alice"),
        )
    }


async def test_a_subscription_limitador_does_not_list_is_never_reported(
    limitador: LimitadorEmulator, metrics: Metrics
) -> None:
    config = KuadrantConfig(
        mode="all",
        batch_interval_s=0.02,
        limitador_http=limitador.http_url,
        limitador_grpc=limitador.grpc_target,
    )
    reporter = Reporter(
        config,
        metrics,
        LimitadorLimits(limitador.http_url, refresh_s=30, timeout_s=2),
        limit_names(config, None),
    )
    try:
        other = replace(charge(5), subscription="models-as-a-service/other")
        reporter.submit(other)  # a subscription whose limit Limitador does not list
        await eventually(
            lambda: (
                metrics.registry.get_sample_value(
                    "maas_kuadrant_skipped_total", {"reason": "no_limit"}
                )
                == 1
            ),
            "the skip",
        )
    finally:
        await reporter.close()
    assert limitador.total_hits(labelled=True) == 0
