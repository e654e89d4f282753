"""The upstream objects (tests/fixtures/upstream) replayed through the sidecar's watchers.

The tier-era policies as models-as-a-service shipped them at 1282feb5 (v0.0.2: seed predicates,
a RateLimitPolicy) and at ae050cb6 (the last tier-era commit: conjunction predicates, no
RateLimitPolicy), the gateway AuthPolicy, the tier ConfigMap, and HTTPRoutes as KServe's
template renders them, served by the Kubernetes emulator to the real watchers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.authz.configmap_tiers import ConfigMapTiers
from extproc.authz.kube import Kube
from extproc.config import Config, KuadrantConfig, LimitsConfig
from extproc.domain import Charge, Identity, Limits, Usage
from extproc.kuadrant.descriptors import limit_identifier
from extproc.kuadrant.httproutes import WatchedRoutes
from extproc.kuadrant.limitador import LimitadorLimits
from extproc.kuadrant.policies import REQUEST_POLICIES, TOKEN_POLICIES, PolicyLimits, limit_names
from extproc.kuadrant.reporter import Reporter
from extproc.kuadrant.route_map import RouteDomains
from extproc.observability.metrics import Metrics
from tests.helpers import eventually
from tests.k8s_emulator import KubeEmulator
from tests.limitador_emulator import LimitadorEmulator

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
NS = "openshift-ingress"
# Configured limits unlike every upstream value, so what the policies set is visible.
CONFIGURED = LimitsConfig(
    tiers={t: Limits(1, 60, 1, 60) for t in ("free", "premium", "enterprise")}
)
OPT_ROUTE = "llm/facebook-opt-125m-simulated-kserve-route"
OPT_MODEL = "publishers/llm/models/facebook/opt-125m"
GRANITE_MODEL = "publishers/llm/models/ibm-granite/granite-3.1-8b-instruct"

Json = dict[str, Any]


def upstream(name: str) -> Json:
    loaded: Json = yaml.safe_load((UPSTREAM / name).read_text())
    return loaded


def put(emulator: KubeEmulator, obj: Json) -> None:
    group, version = obj["apiVersion"].split("/")
    plural = {
        "TokenRateLimitPolicy": "tokenratelimitpolicies",
        "RateLimitPolicy": "ratelimitpolicies",
        "HTTPRoute": "httproutes",
    }[obj["kind"]]
    emulator.put_custom(group, version, obj["metadata"]["namespace"], plural, obj)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        for kind, name in (
            (TOKEN_POLICIES, "TokenRateLimitPolicy"),
            (REQUEST_POLICIES, "RateLimitPolicy"),
        ):
            server.define_custom(kind.group, kind.version, kind.plural, name)
        server.define_custom("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
        yield server


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    started: list[Any] = []
    yield started
    for part in started:
        await part.close()


def ignored(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("maas_policy_predicates_ignored_total") or 0.0


async def test_the_tier_era_policies_set_every_tier_limit_as_shipped(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics, closing: list[Any]
) -> None:
    put(emulator, upstream("maas-1282feb5-token-rate-limit-policy.yaml"))
    put(emulator, upstream("maas-1282feb5-rate-limit-policy.yaml"))
    config = KuadrantConfig(policies="watch")
    watched = PolicyLimits(kube.retain(), config, CONFIGURED, metrics, backoff_s=0.02)
    closing.append(watched)
    await eventually(lambda: len(watched.limits) == 6, "v0.0.2's six limits")
    # Request limits come from the RateLimitPolicy's limits named free, premium, enterprise,
    # found by their predicates; token limits from the TokenRateLimitPolicy.
    assert watched.current().tiers == {
        "free": Limits(5, 120, 100, 60),
        "premium": Limits(20, 120, 50_000, 60),
        "enterprise": Limits(50, 120, 100_000, 60),
    }
    assert {(i.kind, i.name) for i in watched.limits if i.tier == "free"} == {
        ("requests", "free"),
        ("tokens", "free-user-tokens"),
    }

    # ae050cb6: each TRLP predicate a conjunction, and the RateLimitPolicy removed.
    put(emulator, upstream("maas-ae050cb6-token-rate-limit-policy.yaml"))
    emulator.delete_custom("kuadrant.io", "v1", NS, "ratelimitpolicies", "gateway-rate-limits")
    await eventually(lambda: len(watched.limits) == 3, "the last tier-era policies")
    assert watched.current().tiers == {
        "free": Limits(1, 60, 100, 60),
        "premium": Limits(1, 60, 50_000, 60),
        "enterprise": Limits(1, 60, 100_000, 60),
    }
    assert [watched.limit_name_for(t) for t in ("free", "premium", "enterprise")] == [
        "free-user-tokens",
        "premium-user-tokens",
        "enterprise-user-tokens",
    ]
    assert ignored(metrics) == 0


async def test_renamed_tier_era_limits_are_reported_into_by_their_predicate(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics, closing: list[Any]
) -> None:
    policy = upstream("maas-ae050cb6-token-rate-limit-policy.yaml")
    limits = policy["spec"]["limits"]
    policy["spec"]["limits"] = {"gold-budget": limits["premium-user-tokens"]}
    put(emulator, policy)
    config = KuadrantConfig(policies="watch", mode="all", batch_interval_s=0.02)
    watched = PolicyLimits(kube.retain(), config, CONFIGURED, metrics, backoff_s=0.02)
    closing.append(watched)
    await eventually(lambda: watched.limit_name_for("premium") != "", "the renamed limit")
    identifier = limit_identifier(NS, "gateway-token-rate-limits", "gold-budget")
    with LimitadorEmulator() as limitador:
        limitador.set_limits(
            [
                {
                    "namespace": OPT_ROUTE,
                    "max_value": 50_000,
                    "seconds": 60,
                    "name": "gold-budget",
                    "conditions": [f'descriptors[0]["{identifier}"] == "1"'],
                    "variables": ['descriptors[0]["auth.identity.userid"]'],
                }
            ]
        )
        settings = replace(
            config, limitador_grpc=limitador.grpc_target, limitador_http=limitador.http_url
        )
        reporter = Reporter(
            settings,
            metrics,
            LimitadorLimits(limitador.http_url, refresh_s=30, timeout_s=2),
            limit_names(settings, watched),
        )
        try:
            reporter.submit(
                Charge("bob", "premium", "opt", Usage(total_tokens=12), route=OPT_ROUTE)
            )
            await eventually(
                lambda: limitador.counter(OPT_ROUTE, "gold-budget", "bob") == 12, "the report"
            )
        finally:
            await reporter.close()


async def test_kserve_routes_give_each_body_model_its_own_route(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics, closing: list[Any]
) -> None:
    for name in (
        "kserve-httproute-facebook-opt-125m-simulated.yaml",
        "kserve-httproute-long-name.yaml",
    ):
        put(emulator, upstream(name))
    unrelated = upstream("kserve-httproute-facebook-opt-125m-simulated.yaml")
    unrelated["metadata"] = {"name": "not-a-model-route", "namespace": "llm", "labels": {}}
    put(emulator, unrelated)  # no router label: not watched, so no conflict
    watched = WatchedRoutes(kube.retain(), "X-Gateway-Model-Name", metrics, backoff_s=0.02)
    closing.append(watched)
    await eventually(lambda: len(watched.index().by_model) == 2, "both model routes")
    domains = RouteDomains(KuadrantConfig(default_route="maas/one-route"), (), watched.index)
    granite = upstream("kserve-httproute-long-name.yaml")["metadata"]["name"]
    assert domains.domain("", "", OPT_MODEL) == OPT_ROUTE
    assert domains.domain("", "", GRANITE_MODEL) == f"llm/{granite}"
    assert domains.domain("llm", "facebook-opt-125m-simulated", "") == OPT_ROUTE
    assert domains.domain("", "", "unknown") == "maas/one-route"

    emulator.delete_custom("gateway.networking.k8s.io", "v1", "llm", "httproutes", granite)
    await eventually(lambda: len(watched.index().by_model) == 1, "the deletion")
    assert domains.domain("", "", GRANITE_MODEL) == "maas/one-route"
    assert metrics.registry.get_sample_value("maas_httproute_conflicts_total") == 0


async def test_the_tier_mapping_configmap_resolves_as_maas_api_does(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics, closing: list[Any]
) -> None:
    mapping = upstream("maas-ae050cb6-tier-to-group-mapping.yaml")
    emulator.set_config_map("maas-api", "tier-to-group-mapping", mapping["data"])
    tiers = ConfigMapTiers(kube.retain(), Config().tiers, metrics, backoff_s=0.02)
    closing.append(tiers)

    async def tier(*groups: str) -> str | None:
        found = await tiers.tier_for(Identity("u", "u", groups))
        return found.name if found else None

    assert await tier("system:authenticated") == "free"
    assert await tier("system:authenticated", "premium-group") == "premium"
    assert await tier("system:authenticated", "admin-group", "premium-group") == "enterprise"
    assert await tier("system:serviceaccounts:maas-default-gateway-tier-premium") == "premium"
    assert await tier("nobody") is None


@pytest.mark.parametrize("commit", ["1282feb5", "ae050cb6"])
def test_the_sidecar_defaults_follow_the_gateway_auth_policy(commit: str) -> None:
    rules = upstream(f"maas-{commit}-gateway-auth-policy.yaml")["spec"]["rules"]
    config = Config()
    review = rules["authentication"]["service-accounts"]
    assert review["kubernetesTokenReview"]["audiences"] == list(config.identity.audiences)
    assert review["cache"]["ttl"] == config.identity.cache_ttl_s
    # userid: the fourth ":"-part of system:serviceaccount:<ns>:<name>, as the sidecar takes it.
    assert review["defaults"]["userid"]["expression"].strip() == (
        'auth.identity.user.username.split(":")[3]'
    )
    lookup = rules["metadata"]["matchedTier"]
    assert lookup["http"]["url"] == config.tiers.maas_api_url + "/v1/tiers/lookup"
    assert lookup["cache"]["ttl"] == config.tiers.cache_ttl_s
    access = rules["authorization"]["tier-access"]
    assert access["cache"]["ttl"] == config.access.cache_ttl_s
    attributes = access["kubernetesSubjectAccessReview"]["resourceAttributes"]
    assert (attributes["group"]["value"], attributes["resource"]["value"]) == (
        "serving.kserve.io",
        "llminferenceservices",
    )
    assert attributes["verb"]["value"] == "post"
    identity = rules["response"]["success"]["filters"]["identity"]["json"]["properties"]
    assert set(identity) == {"userid", "tier"}  # our metadata carries these (and groups)
