"""Admission in the subscription era, over real parts: API keys and selection from the maas-api
stand-in, demo tokens from the api-keys file, the memory store; the ext_authz replies it makes.

What MaaS's gateway policy does with X-MaaS-* headers (maasauthpolicy_controller.go at c0639b1b):
a client X-MaaS-Username or X-MaaS-Group is refused with 403, X-MaaS-Subscription selects the
subscription; allowed requests get X-MaaS-Username, X-MaaS-Group (a JSON array as a string) and
X-MaaS-Subscription."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
from google.protobuf import json_format

from extproc.admission import Admission, AdmissionRequest
from extproc.authz.api_keys import ApiKeyIdentities
from extproc.authz.base import AllowAll
from extproc.config import LimitsConfig, RoutesConfig, SubscriptionsConfig
from extproc.domain import Decision, Outcome
from extproc.envoy import handover, replies
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics
from extproc.routes import RouteTable
from extproc.sim.maas_api import MaasApiStandIn
from extproc.store.memory import MemoryStore
from extproc.subscriptions.identity import MaasApiKeys
from extproc.subscriptions.maas_api import MaasApi
from extproc.subscriptions.plans import MaasApiSelector, SubscriptionPlans
from tests.helpers import LOCAL, Clock

LOCAL_SUBS = LOCAL / "subscriptions"
CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
MODELS = "/llm/facebook-opt-125m-simulated/v1/models"
ALICE_KEY = "sk-oai-demoAlice01_aliceSecretForTheLocalDemo"
BOB_KEY = "sk-oai-demoBob01_bobSecretForTheLocalDemo"
BODY = json.dumps({"model": "facebook/opt-125m", "max_tokens": 10}).encode()
NS = "models-as-a-service"


@pytest.fixture
async def stand_in() -> AsyncIterator[MaasApiStandIn]:
    server = MaasApiStandIn.from_files(
        LOCAL_SUBS / "maas-objects.yaml", LOCAL_SUBS / "maas-api-keys.yaml"
    )
    await server.start()
    yield server
    await server.stop()


def subscription_admission(
    stand_in: MaasApiStandIn,
    dependency_failure: Literal["fail_open", "fail_closed"] = "fail_closed",
) -> tuple[Admission, MaasApiKeys, SubscriptionPlans]:
    metrics = Metrics(era="subscriptions")
    settings = SubscriptionsConfig(maas_api_url=stand_in.url)
    tokens = ApiKeyIdentities.from_file(LOCAL / "api-keys.yaml")
    identities = MaasApiKeys(MaasApi(stand_in.url), tokens, settings, metrics)
    plans = SubscriptionPlans(MaasApiSelector(MaasApi(stand_in.url), metrics, ttl_s=60), metrics)
    made = Admission(
        RouteTable(RoutesConfig()),
        identities,
        None,
        AllowAll(),
        Limiter(MemoryStore(), LimitsConfig(), Clock()),
        plans=plans,
        era="subscriptions",
        dependency_failure=dependency_failure,
    )
    return made, identities, plans


@pytest.fixture
async def admission(stand_in: MaasApiStandIn) -> AsyncIterator[Admission]:
    made, identities, plans = subscription_admission(stand_in)
    yield made
    await identities.close()
    await plans.close()


async def decide(
    admission: Admission, token: str, path: str = CHAT, method: str = "POST", **headers: str
) -> Decision:
    given = {
        "authorization": f"Bearer {token}",
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    return await admission.decide(
        AdmissionRequest(method, path, given, BODY if method == "POST" else b"")
    )


def request_headers(decision: Decision, policy: replies.HeaderPolicy) -> dict[str, str]:
    reply = replies.check_response(decision, CHAT, policy)
    return {h.header.key: h.header.value for h in reply.ok_response.headers}


def metadata(decision: Decision) -> dict[str, Any]:
    reply = replies.check_response(decision, CHAT, replies.HeaderPolicy("subscriptions"))
    return json_format.MessageToDict(reply.dynamic_metadata)


SUBS = replies.HeaderPolicy("subscriptions")


@pytest.mark.parametrize("header", ["x-maas-username", "x-maas-group"])
async def test_a_client_identity_header_gets_403_as_maas_answers(
    admission: Admission, header: str
) -> None:
    decision = await decide(admission, ALICE_KEY, **{header.replace("-", "_"): "root"})
    assert (decision.outcome, decision.reason_code) == (Outcome.SPOOFED, "unauthorized")
    reply = replies.check_response(decision, CHAT, SUBS)
    assert reply.denied_response.status.code == 403
    sent = {h.header.key: h.header.value for h in reply.denied_response.headers}
    assert sent["x-ext-auth-reason"] == "unauthorized"


async def test_an_api_key_gets_its_owner_groups_and_bound_subscription(
    admission: Admission,
) -> None:
    decision = await decide(admission, ALICE_KEY, x_maas_tier="gold", x_maas_subscription="x")
    assert decision.outcome is Outcome.ALLOW
    assert decision.tier is not None
    assert decision.tier.name == f"{NS}/simulator-subscription"  # bound at mint, header ignored
    assert request_headers(decision, SUBS) == {
        "x-maas-username": "alice",
        "x-maas-group": '["system:authenticated"]',  # as stored with the key
        "x-maas-subscription": f"{NS}/simulator-subscription",
    }
    # The client's X-MaaS-Tier is removed; its X-MaaS-Subscription is overwritten, not removed.
    assert decision.strip_headers == ("x-maas-tier",)
    identity = metadata(decision)["identity"]
    assert identity == {
        "userid": "alice",
        "groups": ["system:authenticated"],
        "groups_str": "system:authenticated",
        "keyId": "6f1c2a5e-1b7d-4c1e-9a55-0a1e2b3c4d01",
        "keyName": "alice-laptop",
        "selected_subscription": "simulator-subscription",
        "selected_subscription_key": f"{NS}/simulator-subscription@llm/facebook-opt-125m-simulated",
    }
    reply = replies.check_response(decision, CHAT, SUBS)
    billing = handover.read({handover.METADATA_NAMESPACE: reply.dynamic_metadata})
    assert billing is not None
    assert (billing.subscription, billing.key, billing.tier) == (
        f"{NS}/simulator-subscription",
        "alice-laptop",
        "",
    )


async def test_a_token_caller_picks_with_x_maas_subscription(admission: Admission) -> None:
    refused = await decide(admission, "demo-premium-key")
    assert (refused.outcome, refused.reason_code) == (
        Outcome.NO_SUBSCRIPTION,
        "multiple_subscriptions",
    )
    chosen = await decide(admission, "demo-premium-key", x_maas_subscription="premium-subscription")
    assert chosen.outcome is Outcome.ALLOW
    assert chosen.tier is not None
    assert chosen.tier.name == f"{NS}/premium-subscription"
    assert chosen.tier.organization_id == "org-demo"
    sent = request_headers(chosen, SUBS)
    # A token's groups are led by system:authenticated, as MaaS writes them for tokens.
    assert json.loads(sent["x-maas-group"]) == [
        "system:authenticated",
        "premium-group",
        "system:authenticated",
    ]
    assert chosen.strip_headers == ()
    # Behind MaaS's own gateway policy the identity headers are left to it.
    assert request_headers(chosen, replies.HeaderPolicy("subscriptions", identity=False)) == {
        "x-maas-subscription": f"{NS}/premium-subscription"
    }
    nothing = await decide(admission, "demo-notier-key")
    assert (nothing.outcome, nothing.reason_code) == (Outcome.NO_SUBSCRIPTION, "not_found")


async def test_listings_need_a_subscription_only_when_they_name_a_model(
    admission: Admission,
) -> None:
    anyone = await decide(admission, "demo-notier-key", path="/v1/models", method="GET")
    assert anyone.outcome is Outcome.ALLOW  # no model named: nothing to select
    assert anyone.tier is None
    assert request_headers(anyone, SUBS) == {
        "x-maas-username": "mallory",
        "x-maas-group": '["system:authenticated","contractors"]',
    }
    assert (await decide(admission, "demo-notier-key", path=MODELS, method="GET")).outcome is (
        Outcome.NO_SUBSCRIPTION
    )
    listed = await decide(admission, "demo-free-key", path=MODELS, method="GET")
    assert (listed.outcome, listed.charged) == (Outcome.ALLOW, False)


async def test_a_body_routed_request_resolves_its_model_through_the_model_ref(
    admission: Admission,
) -> None:
    decision = await decide(admission, ALICE_KEY, path="/v1/chat/completions")
    assert decision.outcome is Outcome.ALLOW
    assert decision.model == "llm/facebook-opt-125m-simulated"  # the alias facebook/opt-125m
    no_model = await admission.decide(
        AdmissionRequest(
            "POST", "/v1/chat/completions", {"authorization": f"Bearer {ALICE_KEY}"}, b"{}"
        )
    )
    assert (no_model.outcome, no_model.limit) == (Outcome.TOKEN_LIMITED, 0)  # the default deny


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_selection_unavailable_follows_the_dependency_policy(
    stand_in: MaasApiStandIn, policy: Literal["fail_open", "fail_closed"]
) -> None:
    made, identities, plans = subscription_admission(stand_in, policy)
    stand_in.fail_status = 500
    try:
        decision = await decide(made, "demo-free-key")
    finally:
        await identities.close()
        await plans.close()
    if policy == "fail_closed":
        assert decision.outcome is Outcome.UNAVAILABLE
    else:  # admitted, unlimited, under the subscription "unknown"
        assert (decision.outcome, decision.limit) == (Outcome.ALLOW, 0)
        assert decision.tier is not None
        assert (decision.tier.name, decision.tier.rates) == ("unknown", ())
