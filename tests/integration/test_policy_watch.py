"""Watched Kuadrant policies (``PolicyLimits``) through the real ``kubernetes`` client, served by
the Kubernetes emulator: list, watch (ADDED / MODIFIED / DELETED), 410 Gone, a missing CRD."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.authz.kube import Kube
from extproc.config import KuadrantConfig, LimitsConfig
from extproc.domain import Limits
from extproc.kuadrant.policies import REQUEST_POLICIES, TOKEN_POLICIES, PolicyKind, PolicyLimits
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.store.memory import MemoryStore
from tests.helpers import eventually
from tests.k8s_emulator import KubeEmulator

NS = "openshift-ingress"
TOKEN_POLICY = "gateway-token-rate-limits"
REQUEST_POLICY = "gateway-rate-limits"
CONFIGURED = LimitsConfig()  # the MaaS defaults: free 5 requests / 2 min and 100 tokens / min, ...
KINDS = {TOKEN_POLICIES: "TokenRateLimitPolicy", REQUEST_POLICIES: "RateLimitPolicy"}

Json = dict[str, Any]
Start = Callable[..., PolicyLimits]


def tier_limit(tier: str, limit: int, window: str = "1m", *predicates: str) -> Json:
    """One ``spec.limits.<name>`` in the MaaS seed shape, or with the given predicates instead."""
    return {
        "rates": [{"limit": limit, "window": window}],
        "when": [{"predicate": p} for p in predicates or (f'auth.identity.tier == "{tier}"',)],
        "counters": [{"expression": "auth.identity.userid"}],
    }


def policy(name: str, limits: dict[str, Json]) -> Json:
    target = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "maas-default-gateway",
    }
    return {"metadata": {"name": name}, "spec": {"targetRef": target, "limits": limits}}


class Cluster:
    """The emulator, scripted in terms of Kuadrant policies in ``openshift-ingress``."""

    def __init__(
        self, emulator: KubeEmulator, kinds: tuple[PolicyKind, ...] = tuple(KINDS)
    ) -> None:
        self.emulator = emulator
        for kind in kinds:  # the CRDs are installed; no policy exists yet
            self.install(kind)

    def install(self, kind: PolicyKind) -> None:
        self.emulator.define_custom(kind.group, kind.version, kind.plural, KINDS[kind])

    def put(self, kind: PolicyKind, obj: Json) -> str:
        return self.emulator.put_custom(kind.group, kind.version, NS, kind.plural, obj)

    def delete(self, kind: PolicyKind, name: str) -> str:
        return self.emulator.delete_custom(kind.group, kind.version, NS, kind.plural, name)

    def count(self, kind: PolicyKind, what: str) -> int:
        """Requests the emulator served for this kind: ``list``, ``watch`` or ``unknown``."""
        return self.emulator.counts[f"{kind.plural}_{what}"]


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        yield server


@pytest.fixture
def cluster(emulator: KubeEmulator) -> Cluster:
    return Cluster(emulator)


@pytest.fixture
async def start(kube: Kube, metrics: Metrics) -> AsyncIterator[Start]:
    """Starts watching (once the test has seeded the cluster); closes whatever it started."""
    started: list[PolicyLimits] = []

    def build(**options: Any) -> PolicyLimits:
        config = KuadrantConfig(policies="watch")
        watched = PolicyLimits(
            kube.retain(), config, CONFIGURED, metrics, backoff_s=0.02, **options
        )
        started.append(watched)
        return watched

    yield build
    for watched in started:
        await watched.close()


async def watching(cluster: Cluster, *kinds: PolicyKind) -> None:
    """Until a watch of each kind is open (its list is done and it follows from there)."""

    def opened(kind: PolicyKind) -> Callable[[], bool]:
        return lambda: cluster.count(kind, "watch") >= 1

    for kind in kinds:
        await eventually(opened(kind), f"{kind.plural} watched")


def ignored(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("maas_policy_predicates_ignored_total") or 0.0


# ------------------------------------------------------------------------------------ tests


async def test_the_token_policy_sets_tier_token_limits_follows_edits_and_deletion(
    cluster: Cluster, start: Start, metrics: Metrics
) -> None:
    cluster.put(
        TOKEN_POLICIES,
        policy(
            TOKEN_POLICY,
            {
                "free-user-tokens": tier_limit("free", 500),
                "premium-user-tokens": tier_limit("premium", 70_000, "2m"),
            },
        ),
    )
    watched = start()
    await eventually(lambda: watched.current().tiers["free"].tokens == 500, "the policy is read")
    tiers = watched.current().tiers
    assert tiers["free"] == Limits(
        requests=5, requests_window_s=120, tokens=500, tokens_window_s=60
    )
    assert (tiers["premium"].tokens, tiers["premium"].tokens_window_s) == (70_000, 120)
    assert tiers["premium"].requests == CONFIGURED.tiers["premium"].requests
    assert tiers["enterprise"] == CONFIGURED.tiers["enterprise"]  # not declared: configured
    assert watched.limit_name_for("free") == "free-user-tokens"
    assert watched.limit_name_for("enterprise") == ""

    # A live edit arrives through the open watch (MODIFIED), without listing again.
    await watching(cluster, TOKEN_POLICIES)
    cluster.put(
        TOKEN_POLICIES, policy(TOKEN_POLICY, {"free-tokens": tier_limit("free", 300, "30s")})
    )
    await eventually(lambda: watched.current().tiers["free"].tokens == 300, "the edit is seen")
    tiers = watched.current().tiers
    assert tiers["free"].tokens_window_s == 30
    assert tiers["premium"] == CONFIGURED.tiers["premium"]  # its limit was removed
    assert watched.limit_name_for("free") == "free-tokens"
    assert cluster.count(TOKEN_POLICIES, "list") == 1

    # Deleted (DELETED): the configured limits are back.
    cluster.delete(TOKEN_POLICIES, TOKEN_POLICY)
    await eventually(lambda: watched.limits == (), "the deletion is seen")
    assert watched.current().tiers == CONFIGURED.tiers
    assert cluster.count(TOKEN_POLICIES, "list") == 1
    assert ignored(metrics) == 0


async def test_limits_not_understood_are_ignored_and_counted_once_each(
    emulator: KubeEmulator, cluster: Cluster, start: Start, metrics: Metrics
) -> None:
    limits = {
        "free-user-tokens": tier_limit("free", 500),
        "path-tokens": tier_limit("free", 1, "1m", 'request.path.startsWith("/x")'),
        "two-predicates": tier_limit(
            "free", 1, "1m", 'auth.identity.tier == "free"', 'request.method == "POST"'
        ),
    }
    cluster.put(TOKEN_POLICIES, policy(TOKEN_POLICY, limits))
    watched = start()
    await eventually(lambda: watched.current().tiers["free"].tokens == 500, "the policy is read")
    assert [(i.name, i.tier, i.limit) for i in watched.limits] == [
        ("free-user-tokens", "free", 500)
    ]
    assert ignored(metrics) == 2

    # Events about other policies, and a list again after 410 Gone, do not count them again.
    await watching(cluster, TOKEN_POLICIES, REQUEST_POLICIES)
    cluster.put(REQUEST_POLICIES, policy(REQUEST_POLICY, {"free": tier_limit("free", 2)}))
    await eventually(lambda: watched.current().tiers["free"].requests == 2, "the request policy")
    emulator.compact()
    emulator.drop_watches()
    cluster.put(REQUEST_POLICIES, policy(REQUEST_POLICY, {"free": tier_limit("free", 3)}))
    await eventually(lambda: watched.current().tiers["free"].requests == 3, "relisted")
    assert cluster.count(REQUEST_POLICIES, "list") >= 2
    assert ignored(metrics) == 2

    # A new limit not understood, added by a live edit, counts once more.
    limits["not-free"] = tier_limit("x", 7, "1m", 'auth.identity.tier != "free"')
    limits["free-user-tokens"] = tier_limit("free", 400)
    cluster.put(TOKEN_POLICIES, policy(TOKEN_POLICY, limits))
    await eventually(lambda: watched.current().tiers["free"].tokens == 400, "the edit is seen")
    assert ignored(metrics) == 3
    assert {i.name for i in watched.limits} == {"free-user-tokens", "free"}


async def test_a_request_policy_limits_requests_and_the_limiter_enforces_it(
    cluster: Cluster, start: Start
) -> None:
    watched = start()
    limiter = Limiter(MemoryStore(), watched, lambda: 1_700_000_000_000)
    await watching(cluster, TOKEN_POLICIES, REQUEST_POLICIES)
    assert watched.current().tiers == CONFIGURED.tiers

    cluster.put(REQUEST_POLICIES, policy(REQUEST_POLICY, {"free-requests": tier_limit("free", 2)}))
    await eventually(lambda: watched.current().tiers["free"].requests == 2, "the policy is seen")
    free = watched.current().tiers["free"]
    assert (free.requests_window_s, free.tokens, free.tokens_window_s) == (60, 100, 60)

    verdicts = [await limiter.admit("alice", "free", "granite", 1) for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert (verdicts[2].kind, verdicts[2].limit) == ("requests", 2)
    assert verdicts[2].retry_after_s > 0
    assert (await limiter.admit("bob", "free", "granite", 1)).allowed  # per user
    assert (await limiter.admit("carol", "premium", "granite", 1)).limit != 2


async def test_a_missing_crd_does_not_stop_the_other_kind(
    emulator: KubeEmulator, start: Start
) -> None:
    cluster = Cluster(emulator, kinds=(TOKEN_POLICIES,))  # RateLimitPolicy is not installed
    cluster.put(TOKEN_POLICIES, policy(TOKEN_POLICY, {"free": tier_limit("free", 500)}))
    watched = start(max_backoff_s=0.1)
    await eventually(lambda: watched.current().tiers["free"].tokens == 500, "the token policy")
    await eventually(lambda: cluster.count(REQUEST_POLICIES, "unknown") >= 2, "retried")

    cluster.install(REQUEST_POLICIES)
    cluster.put(REQUEST_POLICIES, policy(REQUEST_POLICY, {"free": tier_limit("free", 2)}))
    await eventually(lambda: watched.current().tiers["free"].requests == 2, "once installed")
    assert watched.current().tiers["free"].tokens == 500


async def test_close_stops_every_watch_thread(cluster: Cluster, start: Start) -> None:
    before = set(threading.enumerate())
    cluster.put(TOKEN_POLICIES, policy(TOKEN_POLICY, {"free": tier_limit("free", 500)}))
    watched = start()
    await watching(cluster, TOKEN_POLICIES, REQUEST_POLICIES)  # both blocked on an open watch
    started = [t for t in threading.enumerate() if t not in before]
    assert {t.name for t in started} >= {"watch-tokenratelimitpolicies", "watch-ratelimitpolicies"}

    await watched.close()
    await watched.close()  # idempotent
    alive = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    # Only the event loop's default executor may remain (it ran the blocking stop).
    assert [name for name in alive if not name.startswith("asyncio_")] == []
    assert watched.current().tiers["free"].tokens == 500  # the last view stays in force
