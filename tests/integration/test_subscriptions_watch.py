"""The three MaaS kinds watched through the Kubernetes emulator (list, then watch; the last good view
through API errors), and the plans they select for requests, from the upstream fixtures."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.authz.base import PlanQuery, PlanRefusal
from extproc.authz.kube import Kube
from extproc.domain import Identity, Outcome, Plan, Rate
from extproc.errors import PlanUnavailable
from extproc.observability.metrics import Metrics
from extproc.subscriptions.plans import DEFAULT_DENY, SubscriptionPlans, WatchSelector
from extproc.subscriptions.watch import WatchedSubscriptions
from tests.helpers import eventually
from tests.k8s_emulator import KubeEmulator

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
FIXTURES = [
    d for d in yaml.safe_load_all((UPSTREAM / "maas-c0639b1b-subscriptions.yaml").read_text()) if d
]
NS = "models-as-a-service"
OPT = "llm/facebook-opt-125m-simulated"
ALIAS = "publishers/llm/models/facebook/opt-125m"
ALICE = Identity("alice", "alice", ("system:authenticated",))
PREMIUM = Identity("pam", "pam", ("premium-user", "system:authenticated"))

Json = dict[str, Any]


def fixture(kind: str, name: str) -> Json:
    found = next(d for d in FIXTURES if d["kind"] == kind and d["metadata"]["name"] == name)
    return copy.deepcopy(found)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    with KubeEmulator(tmp_path) as server:
        server.put_objects(FIXTURES)
        yield server


@pytest.fixture
async def plans(
    kube: Kube, metrics: Metrics
) -> AsyncIterator[tuple[SubscriptionPlans, WatchedSubscriptions]]:
    watched = WatchedSubscriptions(kube.retain(), NS, backoff_s=0.02, max_backoff_s=0.05)
    source = SubscriptionPlans(WatchSelector(watched), metrics)
    yield source, watched
    await source.close()


def seen(watched: WatchedSubscriptions, kind: str) -> int:
    """How many objects of a kind (subscriptions, policies, models) the view holds."""
    view = watched.view()
    return len(getattr(view, kind)) if view is not None else 0


async def listed(watched: WatchedSubscriptions) -> None:
    await eventually(lambda: watched.view() is not None, "the first list of every kind")


async def test_the_upstream_samples_select_as_maas_does(
    plans: tuple[SubscriptionPlans, WatchedSubscriptions],
) -> None:
    source, watched = plans
    await listed(watched)
    chosen = await source.plan_for(PlanQuery(ALICE, model=OPT, charged=True))
    assert chosen == Plan(
        f"{NS}/simulator-subscription",
        era="subscriptions",
        model=OPT,
        rates=(Rate(100, 60),),
        route="llm/facebook-opt-125m-simulated-kserve-route",  # MaaSModelRef status
    )
    assert chosen.selected_key == f"{NS}/simulator-subscription@{OPT}"
    # A body-routed request names the model by its alias; the MaaSModelRef resolves it.
    by_alias = await source.plan_for(PlanQuery(ALICE, model=ALIAS, charged=True))
    assert isinstance(by_alias, Plan)
    assert by_alias.model == OPT
    # The premium model belongs to premium-user only.
    premium_model = "llm/premium-simulated-simulated-premium"
    refused = await source.plan_for(PlanQuery(ALICE, model=premium_model, charged=True))
    assert refused == PlanRefusal(
        Outcome.NO_SUBSCRIPTION, "no matching subscription found for user", "not_found"
    )
    pam = await source.plan_for(PlanQuery(PREMIUM, model=premium_model, charged=True))
    assert isinstance(pam, Plan)
    assert pam.rates == (Rate(1000, 60),)
    # No model named: a listing needs no subscription; a metered request meets the default deny.
    assert await source.plan_for(PlanQuery(ALICE)) is None
    unsubscribed = await source.plan_for(PlanQuery(ALICE, charged=True))
    assert isinstance(unsubscribed, Plan)
    assert unsubscribed.rates == DEFAULT_DENY


async def test_an_api_key_runs_under_its_bound_subscription_whatever_the_header_says(
    plans: tuple[SubscriptionPlans, WatchedSubscriptions],
) -> None:
    source, watched = plans
    await listed(watched)
    key = Identity(
        "pam", "pam", ("premium-user",), key_name="k", subscription="simulator-subscription"
    )
    refused = await source.plan_for(
        PlanQuery(key, model=OPT, requested="premium-simulator-subscription", charged=True)
    )
    # Bound to the free subscription, owned through system:authenticated, which pam's key lacks.
    assert refused == PlanRefusal(
        Outcome.NO_SUBSCRIPTION, "access denied to requested subscription", "access_denied"
    )


async def test_changes_are_seen_and_the_last_good_view_outlives_api_errors(
    plans: tuple[SubscriptionPlans, WatchedSubscriptions], emulator: KubeEmulator
) -> None:
    source, watched = plans
    await listed(watched)
    second = fixture("MaaSSubscription", "premium-simulator-subscription")
    second["metadata"]["name"] = "second"
    second["spec"]["owner"]["groups"] = [{"name": "system:authenticated"}]
    second["spec"]["modelRefs"][0].update(name="facebook-opt-125m-simulated")
    emulator.put_objects([second])

    async def code() -> str:
        found = await source.plan_for(PlanQuery(ALICE, model=OPT, charged=True))
        return found.code if isinstance(found, PlanRefusal) else "selected"

    await eventually(lambda: seen(watched, "subscriptions") == 3, "the new subscription")
    assert await code() == "multiple_subscriptions"
    chosen = await source.plan_for(PlanQuery(ALICE, model=OPT, requested="second", charged=True))
    assert isinstance(chosen, Plan)
    assert chosen.name == f"{NS}/second"

    emulator.fail_with(503)
    emulator.drop_watches()
    assert await code() == "multiple_subscriptions"  # the last good view stays in force
    emulator.fail_with(None)
    emulator.delete_custom("maas.opendatahub.io", "v1alpha1", NS, "maassubscriptions", "second")
    await eventually(lambda: seen(watched, "subscriptions") == 2, "the deletion")
    assert await code() == "selected"


async def test_only_the_configured_namespace_holds_subscriptions_and_models_come_from_any(
    plans: tuple[SubscriptionPlans, WatchedSubscriptions], emulator: KubeEmulator
) -> None:
    _source, watched = plans
    elsewhere = fixture("MaaSSubscription", "simulator-subscription")
    elsewhere["metadata"]["namespace"] = "someone-else"
    model = fixture("MaaSModelRef", "facebook-opt-125m-simulated")
    model["metadata"]["namespace"] = "team-x"
    model["status"]["resolvedModelAlias"] = "team-x/alias"
    emulator.put_objects([elsewhere, model])
    await eventually(lambda: seen(watched, "models") == 3, "the model in another namespace")
    view = watched.view()
    assert view is not None
    assert {s.namespace for s in view.subscriptions} == {NS}
    assert view.resolve("team-x/alias") == "team-x/facebook-opt-125m-simulated"


async def test_nothing_is_selected_before_the_first_list(
    emulator: KubeEmulator, kube: Kube, metrics: Metrics
) -> None:
    emulator.fail_with(503)
    watched = WatchedSubscriptions(kube.retain(), NS, backoff_s=0.02, max_backoff_s=0.05)
    source = SubscriptionPlans(WatchSelector(watched), metrics)
    try:
        with pytest.raises(PlanUnavailable):
            await source.plan_for(PlanQuery(ALICE, model=OPT, charged=True))
        assert metrics.unavailable.labels("subscriptions")._value.get() == 1
        emulator.fail_with(None)
        await listed(watched)
        assert isinstance(await source.plan_for(PlanQuery(ALICE, model=OPT)), Plan)
    finally:
        await source.close()


async def test_a_rate_maas_refuses_leaves_the_default_deny(
    plans: tuple[SubscriptionPlans, WatchedSubscriptions], emulator: KubeEmulator
) -> None:
    source, watched = plans
    broken = fixture("MaaSSubscription", "simulator-subscription")
    broken["spec"]["modelRefs"][0]["tokenRateLimits"] = [{"limit": 100, "window": "1d"}]
    emulator.put_objects([broken])
    await eventually(
        lambda: any(
            m.rates and m.rates[0].window == "1d"
            for s in (watched.view().subscriptions if watched.view() else ())
            for m in s.models
        ),
        "the edit",
    )
    chosen = await source.plan_for(PlanQuery(ALICE, model=OPT, charged=True))
    assert isinstance(chosen, Plan)
    # The controller leaves it out of the model's policy: gateway-default-deny's limit 0 applies.
    assert chosen.rates == DEFAULT_DENY
