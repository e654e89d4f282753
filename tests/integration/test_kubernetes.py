"""Kubernetes identity, ConfigMap tiers, maas-api tiers and access reviews against local servers."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web

from extproc.admission import Admission, AdmissionRequest
from extproc.app import Sidecar, now_ms
from extproc.authz.access_review import SubjectAccessReviewAccess
from extproc.authz.base import AccessChecker, AllowAll, IdentitySource, TierSource
from extproc.authz.configmap_tiers import ConfigMapTiers
from extproc.authz.kube import Kube
from extproc.authz.kubernetes_identity import KubernetesIdentities
from extproc.authz.maas_api_tiers import MaasApiTiers
from extproc.config import AccessConfig, IdentityConfig, LimitsConfig, RoutesConfig, TiersConfig
from extproc.config import parse as parse_config
from extproc.domain import Decision, Identity, Outcome
from extproc.errors import ConfigError, TierUnavailable
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.routes import RouteTable
from extproc.store.memory import MemoryStore
from tests.helpers import eventually
from tests.k8s_emulator import KubeEmulator, self_signed_cert

TIERS_NS, TIERS_NAME = "maas-api", "tier-to-group-mapping"
DEFAULT_TIERS = """\
- name: free
  displayName: Free Tier
  level: 0
  groups: [tier-free-users, system:authenticated]
- name: premium
  displayName: Premium Tier
  level: 1
  groups: [tier-premium-users, premium-group]
- name: enterprise
  displayName: Enterprise Tier
  level: 2
  groups: [tier-enterprise-users, enterprise-group, admin-group]
"""
MODEL_PATH = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
MODELS_PATH = "/llm/facebook-opt-125m-simulated/v1/models"
PREMIUM_NS = "maas-default-gateway-tier-premium"


class Clock:
    """A wall clock the test moves by hand; shared by the sidecar and the emulator."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(tmp_path: Path, clock: Clock) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path, clock=clock) as server:
        server.set_config_map(TIERS_NS, TIERS_NAME, {"tiers": DEFAULT_TIERS})
        yield server


@pytest.fixture
async def identities(
    kube: Kube, metrics: Metrics, clock: Clock
) -> AsyncIterator[KubernetesIdentities]:
    source = KubernetesIdentities(
        kube.retain(), IdentityConfig(source="kubernetes"), metrics, clock=clock
    )
    yield source
    await source.close()


@pytest.fixture
async def tiers(kube: Kube, metrics: Metrics) -> AsyncIterator[ConfigMapTiers]:
    source = ConfigMapTiers(kube.retain(), TiersConfig(source="configmap"), metrics, backoff_s=0.05)
    # Tests that break the API server later need the mapping read first (the watch is a thread).
    await eventually(lambda: source.mapping is not None, "the first tier mapping is read")
    yield source
    await source.close()


def build_admission(
    identities: IdentitySource,
    tiers: TierSource,
    access: AccessChecker | None = None,
    dependency_failure: Literal["fail_open", "fail_closed"] = "fail_closed",
) -> Admission:
    """Wired as ``Sidecar.build`` does, over an in-memory store."""
    limiter = Limiter(MemoryStore(), LimitsConfig(), now_ms)
    return Admission(
        RouteTable(RoutesConfig()),
        identities,
        tiers,
        access or AllowAll(),
        limiter,
        dependency_failure=dependency_failure,
    )


def post(
    token: str | None, path: str = MODEL_PATH, body: dict[str, Any] | None = None
) -> AdmissionRequest:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    payload = json.dumps(body or {"model": "facebook-opt-125m-simulated", "max_tokens": 4})
    return AdmissionRequest("POST", path, headers, payload.encode())


def get_models(token: str) -> AdmissionRequest:
    return AdmissionRequest("GET", MODELS_PATH, {"authorization": f"Bearer {token}"})


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------------------- tiers


async def test_highest_level_tier_wins_for_a_user_in_free_and_premium_groups(
    emulator: KubeEmulator, identities: KubernetesIdentities, tiers: ConfigMapTiers
) -> None:
    token = emulator.add_sa_token(
        "maas-default-gateway-tier-free", "alice", ["tier-free-users", "premium-group"]
    )
    decision = await build_admission(identities, tiers).decide(post(token))
    assert decision.outcome is Outcome.ALLOW
    assert decision.tier is not None
    assert decision.tier.name == "premium"
    assert decision.identity is not None
    assert decision.identity.userid == "alice"


async def test_projected_service_account_group_alone_gives_its_tier(
    emulator: KubeEmulator, identities: KubernetesIdentities, tiers: ConfigMapTiers
) -> None:
    token = emulator.add_token(
        f"system:serviceaccount:{PREMIUM_NS}:bob-example-com-1a2b3c4d",
        [f"system:serviceaccounts:{PREMIUM_NS}"],
    )
    decision = await build_admission(identities, tiers).decide(post(token))
    assert decision.outcome is Outcome.ALLOW
    assert decision.tier is not None
    assert decision.tier.name == "premium"
    assert decision.identity is not None
    assert decision.identity.userid == "bob-example-com-1a2b3c4d"
    assert (
        decision.identity.username == f"system:serviceaccount:{PREMIUM_NS}:bob-example-com-1a2b3c4d"
    )
    assert decision.identity.groups == (f"system:serviceaccounts:{PREMIUM_NS}",)


async def test_configmap_edits_apply_live_and_an_invalid_edit_keeps_the_last_good_mapping(
    emulator: KubeEmulator, tiers: ConfigMapTiers, metrics: Metrics
) -> None:
    carol = Identity("carol", "carol", ("contractors",))
    await eventually(lambda: tiers.mapping is not None, "first mapping loaded")
    assert await tiers.tier_for(carol) is None

    edited = DEFAULT_TIERS.replace("admin-group]", "admin-group, contractors]")
    version = emulator.set_config_map(TIERS_NS, TIERS_NAME, {"tiers": edited})
    await eventually(lambda: tiers.version == version, "the edit applied")
    tier = await tiers.tier_for(carol)
    assert tier is not None
    assert tier.name == "enterprise"

    for broken in ({"tiers": "- name: [unclosed"}, {"tiers": "- {level: 3}"}, {"other": "x"}):
        emulator.set_config_map(TIERS_NS, TIERS_NAME, broken)
    await eventually(
        lambda: sample(metrics, "maas_tier_mapping_rejected_total") == 3, "three rejections"
    )
    assert tiers.version == version
    tier = await tiers.tier_for(carol)
    assert tier is not None
    assert tier.name == "enterprise"

    # The watch history is compacted and the watch dropped: resuming gets 410 Gone, so the
    # watcher lists again and goes on watching from there.
    lists_before = emulator.counts["configmap_list"]
    emulator.compact()
    emulator.drop_watches()
    version = emulator.set_config_map(TIERS_NS, TIERS_NAME, {"tiers": DEFAULT_TIERS})
    await eventually(lambda: tiers.version == version, "the edit after a 410 applied")
    assert emulator.counts["configmap_list"] > lists_before
    assert await tiers.tier_for(carol) is None


async def test_configmap_watch_survives_an_api_server_outage(
    emulator: KubeEmulator, tiers: ConfigMapTiers
) -> None:
    dave = Identity("dave", "dave", ("premium-group",))
    await eventually(lambda: tiers.mapping is not None, "first mapping loaded")
    emulator.down()
    tier = await tiers.tier_for(dave)  # the last good mapping keeps answering
    assert tier is not None
    assert tier.name == "premium"
    emulator.up()
    version = emulator.set_config_map(
        TIERS_NS, TIERS_NAME, {"tiers": DEFAULT_TIERS.replace("premium-group", "gold-group")}
    )
    await eventually(lambda: tiers.version == version, "the edit after the outage applied")
    assert await tiers.tier_for(dave) is None


async def test_a_missing_configmap_is_a_tier_outage(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics
) -> None:
    settings = TiersConfig(source="configmap", configmap_name="absent")
    source = ConfigMapTiers(kube.retain(), settings, metrics, backoff_s=0.05)
    try:
        with pytest.raises(TierUnavailable):
            await source.tier_for(Identity("erin", "erin", ("premium-group",)))
        assert sample(metrics, "maas_dependency_unavailable_total", dependency="tiers") == 1
    finally:
        await source.close()


# ----------------------------------------------------------------------------- 401 and 403


async def test_refusals_are_401_for_bad_tokens_and_403_for_no_tier_or_no_access(
    emulator: KubeEmulator,
    kube: Kube,
    identities: KubernetesIdentities,
    tiers: ConfigMapTiers,
    metrics: Metrics,
) -> None:
    access = SubjectAccessReviewAccess(
        kube.retain(), AccessConfig(check="subject_access_review"), metrics
    )
    admission = build_admission(identities, tiers, access)
    try:
        wrong_audience = emulator.add_sa_token(
            PREMIUM_NS, "frank", audiences=["https://kubernetes.default.svc"]
        )
        loner = emulator.add_token("system:serviceaccount:elsewhere:grace", ["lonely-group"])
        denied = emulator.add_sa_token(PREMIUM_NS, "heidi")
        allowed = emulator.add_sa_token(PREMIUM_NS, "ivan")
        emulator.allow("system:serviceaccount:maas-default-gateway-tier-premium:ivan", "llm")

        async def outcome(request: AdmissionRequest) -> Outcome:
            return (await admission.decide(request)).outcome

        assert await outcome(post(None)) is Outcome.UNAUTHENTICATED
        assert await outcome(post("not-a-token-the-server-knows")) is Outcome.UNAUTHENTICATED
        assert await outcome(post(wrong_audience)) is Outcome.UNAUTHENTICATED
        assert await outcome(post(loner)) is Outcome.NO_TIER
        assert await outcome(post(denied)) is Outcome.FORBIDDEN
        assert await outcome(post(allowed)) is Outcome.ALLOW

        review = emulator.access_reviews[-1]
        assert review["user"] == "system:serviceaccount:maas-default-gateway-tier-premium:ivan"
        assert f"system:serviceaccounts:{PREMIUM_NS}" in review["groups"]
        assert review["resourceAttributes"] == {
            "group": "serving.kserve.io",
            "resource": "llminferenceservices",
            "verb": "post",
            "namespace": "llm",
            "name": "facebook-opt-125m-simulated",
        }
    finally:
        await access.close()


async def test_non_service_account_users_keep_their_username_or_are_refused(
    emulator: KubeEmulator, kube: Kube, tiers: ConfigMapTiers, metrics: Metrics
) -> None:
    token = emulator.add_token("oidc:judy@example.com", ["premium-group", "system:authenticated"])
    kept = KubernetesIdentities(kube.retain(), IdentityConfig(source="kubernetes"), metrics)
    refused = KubernetesIdentities(
        kube.retain(), IdentityConfig(source="kubernetes", non_service_account="reject"), metrics
    )
    try:
        decision = await build_admission(kept, tiers).decide(post(token))
        assert decision.identity is not None
        assert decision.identity.userid == "oidc:judy@example.com"
        assert (
            await build_admission(refused, tiers).decide(post(token))
        ).outcome is Outcome.UNAUTHENTICATED
    finally:
        await kept.close()
        await refused.close()


async def test_body_model_routes_check_the_mapped_model_and_skip_unmapped_ones(
    emulator: KubeEmulator,
    kube: Kube,
    identities: KubernetesIdentities,
    tiers: ConfigMapTiers,
    metrics: Metrics,
) -> None:
    settings = AccessConfig(
        check="subject_access_review", body_models=(("granite", "models/granite-8b"),)
    )
    access = SubjectAccessReviewAccess(kube.retain(), settings, metrics)
    admission = build_admission(identities, tiers, access)
    try:
        token = emulator.add_sa_token(PREMIUM_NS, "mallory")
        denied = await admission.decide(post(token, "/v1/chat/completions", {"model": "granite"}))
        assert denied.outcome is Outcome.FORBIDDEN
        assert emulator.access_reviews[-1]["resourceAttributes"]["namespace"] == "models"
        assert emulator.access_reviews[-1]["resourceAttributes"]["name"] == "granite-8b"
        reviews = emulator.counts["subjectaccessreviews"]
        unmapped = await admission.decide(post(token, "/v1/chat/completions", {"model": "other"}))
        assert unmapped.outcome is Outcome.ALLOW
        assert emulator.counts["subjectaccessreviews"] == reviews
    finally:
        await access.close()


# ------------------------------------------------------------------------------------- caching


async def test_a_cached_identity_never_outlives_the_token_expiry(
    emulator: KubeEmulator, identities: KubernetesIdentities, clock: Clock
) -> None:
    token = emulator.add_sa_token(PREMIUM_NS, "niaj", exp=clock.now + 2)
    assert await identities.authenticate(token) is not None
    assert await identities.authenticate(token) is not None
    assert emulator.counts["tokenreviews"] == 1
    clock.advance(3)  # the 600 s cache TTL would still hold; the token's exp does not
    assert await identities.authenticate(token) is None
    assert emulator.counts["tokenreviews"] == 2


async def test_tokens_without_exp_use_the_ttl_and_invalid_ones_the_negative_ttl(
    emulator: KubeEmulator, identities: KubernetesIdentities, clock: Clock
) -> None:
    token = emulator.add_token("system:serviceaccount:ns:olivia", ["premium-group"], token="opaque")
    assert await identities.authenticate(token) is not None
    clock.advance(599)
    assert await identities.authenticate(token) is not None
    assert emulator.counts["tokenreviews"] == 1
    clock.advance(2)
    assert await identities.authenticate(token) is not None
    assert emulator.counts["tokenreviews"] == 2

    assert await identities.authenticate("bogus") is None
    assert await identities.authenticate("bogus") is None
    assert emulator.counts["tokenreviews"] == 3
    clock.advance(11)
    assert await identities.authenticate("bogus") is None
    assert emulator.counts["tokenreviews"] == 4


async def test_concurrent_first_requests_share_one_token_review(
    emulator: KubeEmulator,
    identities: KubernetesIdentities,
    tiers: ConfigMapTiers,
    metrics: Metrics,
) -> None:
    token = emulator.add_sa_token(PREMIUM_NS, "peggy")
    admission = build_admission(identities, tiers)
    decisions = await asyncio.gather(*(admission.decide(get_models(token)) for _ in range(100)))
    assert {d.outcome for d in decisions} == {Outcome.ALLOW}
    assert emulator.counts["tokenreviews"] == 1
    assert sample(metrics, "maas_cache_lookups_total", cache="token_review", result="miss") == 1
    assert sample(metrics, "maas_cache_lookups_total", cache="token_review", result="shared") == 99


# ------------------------------------------------------------------------------------- outages


@pytest.mark.parametrize("failure", ["down", "503"])
async def test_an_api_server_outage_keeps_cached_answers_and_fails_closed_for_new_tokens(
    emulator: KubeEmulator,
    kube: Kube,
    identities: KubernetesIdentities,
    tiers: ConfigMapTiers,
    metrics: Metrics,
    failure: str,
) -> None:
    access = SubjectAccessReviewAccess(
        kube.retain(), AccessConfig(check="subject_access_review"), metrics
    )
    emulator.allow(f"group:system:serviceaccounts:{PREMIUM_NS}", "llm")
    admission = build_admission(identities, tiers, access, dependency_failure="fail_open")
    try:
        warm = emulator.add_sa_token(PREMIUM_NS, "rupert")
        cold = emulator.add_sa_token(PREMIUM_NS, "sybil")
        assert (await admission.decide(post(warm))).outcome is Outcome.ALLOW
        if failure == "down":
            emulator.down()
        else:
            emulator.fail_with(503)

        assert (await admission.decide(post(warm))).outcome is Outcome.ALLOW
        # Even with fail_open configured, an identity outage never lets a request through.
        refused = await admission.decide(post(cold))
        assert refused.outcome is Outcome.UNAVAILABLE
        assert sample(metrics, "maas_dependency_unavailable_total", dependency="identity") == 1

        emulator.up()
        emulator.fail_with(None)
        assert (await admission.decide(post(cold))).outcome is Outcome.ALLOW
    finally:
        await access.close()


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_an_access_check_outage_follows_the_failure_policy(
    emulator: KubeEmulator,
    kube: Kube,
    identities: KubernetesIdentities,
    tiers: ConfigMapTiers,
    metrics: Metrics,
    policy: Literal["fail_open", "fail_closed"],
) -> None:
    access = SubjectAccessReviewAccess(
        kube.retain(), AccessConfig(check="subject_access_review"), metrics
    )
    admission = build_admission(identities, tiers, access, dependency_failure=policy)
    try:
        token = emulator.add_sa_token(PREMIUM_NS, "trent")
        assert await identities.authenticate(token) is not None  # identity cached, access not
        emulator.fail_with(503)
        decision = await admission.decide(post(token))
        expected = Outcome.ALLOW if policy == "fail_open" else Outcome.UNAVAILABLE
        assert decision.outcome is expected
        assert sample(metrics, "maas_dependency_unavailable_total", dependency="access") == 1
    finally:
        await access.close()


# ------------------------------------------------------------------------------------ maas-api


class MaasApiStub:
    """``POST /v1/tiers/lookup`` as maas-api answers it, scripted by the groups sent."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, tls: tuple[Path, Path] | None = None) -> MaasApiStub:
        """Serve on loopback; with ``tls`` (certificate, key), HTTPS as maas-api on ODH."""
        app = web.Application()
        app.router.add_post("/v1/tiers/lookup", self._lookup)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _lookup(self, request: web.Request) -> web.Response:
        groups: list[str] = (await request.json())["groups"]
        self.calls[",".join(groups)] += 1
        if "premium-group" in groups:
            return web.json_response({"tier": "premium", "displayName": "Premium Tier"})
        if "nobody" in groups:
            return _error(404, "not_found", "no tier found for groups")
        if "malformed" in groups:
            return _error(400, "bad_request", "groups must not be empty")
        return _error(500, "internal_error", "failed to load the tier mapping")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@pytest.fixture
async def maas_api() -> AsyncIterator[MaasApiStub]:
    stub = await MaasApiStub().start()
    yield stub
    await stub.stop()


async def test_maas_api_tiers_map_statuses_and_cache_per_username(
    maas_api: MaasApiStub, metrics: Metrics
) -> None:
    source = MaasApiTiers(TiersConfig(source="maas_api", maas_api_url=maas_api.url), metrics)
    try:
        premium = Identity("uma", "uma", ("premium-group",))
        tier = await source.tier_for(premium)
        assert tier is not None
        assert (tier.name, tier.level, tier.display_name) == (
            "premium",
            0,
            "Premium Tier",
        )
        assert await source.tier_for(premium) == tier
        assert maas_api.calls["premium-group"] == 1

        nobody = Identity("victor", "victor", ("nobody",))
        assert await source.tier_for(nobody) is None
        assert await source.tier_for(nobody) is None
        assert maas_api.calls["nobody"] == 1

        for groups in (("malformed",), ("boom",)):
            with pytest.raises(TierUnavailable):
                await source.tier_for(Identity("walter", f"walter-{groups[0]}", groups))
        assert maas_api.calls["boom"] == 1
        await maas_api.stop()
        with pytest.raises(TierUnavailable):
            await source.tier_for(Identity("xena", "xena", ("premium-group",)))
        assert sample(metrics, "maas_dependency_unavailable_total", dependency="tiers") == 3
    finally:
        await source.close()


async def test_maas_api_over_https_is_trusted_only_through_the_configured_ca(
    tmp_path: Path, metrics: Metrics
) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "other").mkdir()
    cert, key = self_signed_cert(tmp_path / "server")  # stands in for the service CA's certificate
    other_ca, _ = self_signed_cert(tmp_path / "other")
    stub = await MaasApiStub().start(tls=(cert, key))
    premium = Identity("uma", "uma", ("premium-group",))
    settings = TiersConfig(source="maas_api", maas_api_url=stub.url)
    sources = {
        "service-ca": MaasApiTiers(
            replace(settings, maas_api_ca_file=str(cert)), metrics, ca_file=cert
        ),
        "system": MaasApiTiers(settings, metrics),
        "other": MaasApiTiers(settings, metrics, ca_file=other_ca),
    }
    try:
        tier = await sources["service-ca"].tier_for(premium)
        assert tier is not None
        assert tier.name == "premium"
        for untrusted in ("system", "other"):
            with pytest.raises(TierUnavailable):
                await sources[untrusted].tier_for(premium)
        assert stub.calls["premium-group"] == 1  # the untrusted ones never sent the groups
        with pytest.raises(ConfigError, match=r"tiers\.maas_api_ca_file"):
            MaasApiTiers(settings, metrics, ca_file=tmp_path / "missing.crt")
    finally:
        for source in sources.values():
            await source.close()
        await stub.stop()


def test_a_ca_file_needs_an_https_maas_api_url() -> None:
    tiers = {"source": "maas_api", "maas_api_ca_file": "/etc/ca.crt"}
    with pytest.raises(ConfigError, match=r"tiers\.maas_api_ca_file"):
        parse_config({"identity": {"api_keys_file": "k"}, "tiers": tiers})
    https = {**tiers, "maas_api_url": "https://maas-api.opendatahub.svc:8443"}
    config = parse_config({"identity": {"api_keys_file": "k"}, "tiers": https})
    assert config.tiers.maas_api_ca_file == "/etc/ca.crt"


async def test_a_maas_api_outage_admits_as_the_unknown_tier_when_failing_open(
    emulator: KubeEmulator,
    identities: KubernetesIdentities,
    maas_api: MaasApiStub,
    metrics: Metrics,
) -> None:
    source = MaasApiTiers(TiersConfig(source="maas_api", maas_api_url=maas_api.url), metrics)
    try:
        token = emulator.add_token("system:serviceaccount:ns:yvonne", ["boom"])
        closed = await build_admission(identities, source).decide(post(token))
        assert closed.outcome is Outcome.UNAVAILABLE
        opened = await build_admission(identities, source, dependency_failure="fail_open").decide(
            post(token)
        )
        assert opened.outcome is Outcome.ALLOW
        assert opened.tier is not None
        assert opened.tier.name == "unknown"
    finally:
        await source.close()


# ------------------------------------------------------------------------------- composition


async def test_the_sidecar_builds_the_kubernetes_sources_and_close_stops_the_watch(
    emulator: KubeEmulator, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "identity": {"source": "kubernetes", "kubeconfig": str(emulator.write_kubeconfig())},
            "tiers": {"source": "configmap"},
            "access": {"check": "subject_access_review"},
        },
        str(tmp_path),
    )
    emulator.allow(f"group:system:serviceaccounts:{PREMIUM_NS}", "llm")
    sidecar = Sidecar.build(config)
    try:
        token = emulator.add_sa_token(PREMIUM_NS, "zoe")
        decision: Decision = await sidecar.admission.decide(post(token))
        assert decision.outcome is Outcome.ALLOW
        assert decision.tier is not None
        assert decision.tier.name == "premium"
    finally:
        await sidecar.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("watch-configmap", "kube_"))]


def test_an_unreadable_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"identity\.kubeconfig"):
        Kube.connect(str(tmp_path / "missing-kubeconfig"))
