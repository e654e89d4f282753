"""Subscription selection as maas-api and MaaS's gateway policy make it: our selection over the
objects (``View.select``) and our reading of maas-api's answers (``selection_of``) against the
maas-api stand-in (extproc/sim/maas_api.py, written from maas-api's selector, imports none of it)
on the upstream fixtures and on objects made to reach every branch."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.domain import Rate
from extproc.sim.maas_api import MaasApiStandIn
from extproc.subscriptions import objects
from extproc.subscriptions.plans import selection_of
from extproc.subscriptions.select import Refusal, Selected, View

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT / "tests" / "fixtures" / "upstream" / "maas-c0639b1b-subscriptions.yaml"
LOCAL = ROOT / "deploy" / "local" / "subscriptions" / "maas-objects.yaml"


def load(path: Path) -> list[Json]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def sub(
    name: str,
    owners: list[str],
    models: list[tuple[str, str, list[Json]]],
    *,
    namespace: str = "models-as-a-service",
    priority: int | None = None,
    phase: str = "Active",
    users: list[str] | None = None,
    ready: dict[str, bool] | None = None,
    deleting: bool = False,
    metadata: Json | None = None,
    billing: Json | None = None,
) -> Json:
    spec: Json = {
        "owner": {"groups": [{"name": g} for g in owners], "users": users or []},
        "modelRefs": [
            {"namespace": ns, "name": n, "tokenRateLimits": rates} for ns, n, rates in models
        ],
    }
    for ref in spec["modelRefs"]:
        # maassubscription_types.go at c0639b1b: ModelSubscriptionRef.BillingRate{PerToken string}
        if billing and ref["name"] in billing:
            ref["billingRate"] = billing[ref["name"]]
    if priority is not None:
        spec["priority"] = priority
    if metadata:
        spec["tokenMetadata"] = metadata
    meta: Json = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = "2026-08-21T00:00:00Z"
    status: Json = {"phase": phase}
    if ready is not None:
        status["tokenRateLimitStatuses"] = [
            {"model": m, "ready": r, "name": f"maas-trlp-{m}", "namespace": "llm"}
            for m, r in ready.items()
        ]
    return {
        "apiVersion": "maas.opendatahub.io/v1alpha1",
        "kind": "MaaSSubscription",
        "metadata": meta,
        "spec": spec,
        "status": status,
    }


def policy(name: str, groups: list[str], models: list[tuple[str, str]], users: Any = ()) -> Json:
    return {
        "apiVersion": "maas.opendatahub.io/v1alpha1",
        "kind": "MaaSAuthPolicy",
        "metadata": {"name": name, "namespace": "models-as-a-service"},
        "spec": {
            "modelRefs": [{"namespace": ns, "name": n} for ns, n in models],
            "subjects": {"groups": [{"name": g} for g in groups], "users": list(users)},
        },
    }


def model(namespace: str, name: str, alias: str = "") -> Json:
    status: Json = {"phase": "Ready"}
    if alias:
        status["resolvedModelAlias"] = alias
    return {
        "apiVersion": "maas.opendatahub.io/v1alpha1",
        "kind": "MaaSModelRef",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"modelRef": {"kind": "LLMInferenceService", "name": name}},
        "status": status,
    }


PER_MINUTE = [{"limit": 100, "window": "1m"}]
# Objects that reach every branch of maas-api's selection.
CRAFTED = [
    sub("basic", ["everyone"], [("llm", "m1", PER_MINUTE), ("llm", "m2", PER_MINUTE)]),
    sub("gold", ["gold"], [("llm", "m1", [{"limit": 500, "window": "1h"}])], priority=5),
    sub("gold", ["gold"], [("llm", "m1", PER_MINUTE)], namespace="other", priority=5),
    sub("tied-a", ["tie"], [("llm", "m3", [{"limit": 9, "window": "1m"}])], priority=1),
    sub("tied-b", ["tie"], [("llm", "m3", [{"limit": 90, "window": "1m"}])], priority=1),
    sub("pending", ["late"], [("llm", "m1", PER_MINUTE)], phase="Pending"),
    sub("unreconciled", ["late2"], [("llm", "m1", PER_MINUTE)], phase=""),
    sub("degraded-ok", ["deg"], [("llm", "m1", PER_MINUTE)], phase="Degraded", ready={"m1": True}),
    sub(
        "degraded-no", ["deg2"], [("llm", "m1", PER_MINUTE)], phase="Degraded", ready={"m1": False}
    ),
    sub("degraded-none", ["deg3"], [("llm", "m1", PER_MINUTE)], phase="Degraded"),
    sub("degraded-norates", ["deg4"], [("llm", "m2", [])], phase="Degraded"),
    sub("going", ["going"], [("llm", "m1", PER_MINUTE)], deleting=True),
    sub("named", [], [("llm", "m2", PER_MINUTE)], users=["dave"]),
    sub("no-policy", ["nopol"], [("llm", "m4", PER_MINUTE)]),
    sub("bad-window", ["badw"], [("llm", "m1", [{"limit": 10, "window": "1d"}])]),
    sub(
        "meta",
        ["meta"],
        [("llm", "m1", [{"limit": 10, "window": "30s"}, {"limit": 1000, "window": "24h"}])],
        metadata={"organizationId": "org-1", "costCenter": "cc-9"},
    ),
    {"kind": "MaaSSubscription", "metadata": {"name": "no-spec", "namespace": "x"}},
    sub("priced", ["pay"], [("llm", "m1", PER_MINUTE)], billing={"m1": {"perToken": "0.000002"}}),
    sub("priced-bad", ["pay2"], [("llm", "m1", PER_MINUTE)], billing={"m1": {"perToken": "x"}}),
    sub("priced-int", ["pay3"], [("llm", "m1", PER_MINUTE)], billing={"m1": {"perToken": 5}}),
    sub("priced-odd", ["pay4"], [("llm", "m1", PER_MINUTE)], billing={"m1": "0.1"}),
    policy(
        "all",
        [
            "everyone",
            "gold",
            "tie",
            "late",
            "late2",
            "deg",
            "deg2",
            "deg3",
            "pay",
            "pay2",
            "pay3",
            "pay4",
        ],
        [("llm", "m1")],
    ),
    policy("two", ["everyone", "deg4", "badw", "meta", "going"], [("llm", "m2"), ("llm", "m1")]),
    policy("tie", ["tie"], [("llm", "m3")]),
    policy("dave", [], [("llm", "m2")], users=[" dave "]),
    model("llm", "m1", "publishers/llm/models/one"),
    model("llm", "m2"),
    model("llm", "m3", "three"),
    model("llm", "m4"),
]

CALLERS = [
    ("nobody", []),
    ("eve", ["everyone"]),
    ("gina", ["everyone", " gold "]),
    ("tom", ["tie", "everyone"]),
    ("lee", ["late", "late2"]),
    ("dee", ["deg"]),
    ("dan", ["deg2"]),
    ("don", ["deg3", "deg4"]),
    ("gus", ["going"]),
    ("dave", []),
    ("nick", ["nopol"]),
    ("bea", ["badw"]),
    ("mia", ["meta"]),
    ("pat", ["pay"]),
    ("pam", ["pay2"]),
    ("pip", ["pay3"]),
    ("poe", ["pay4"]),
    ("", []),
]
ASKED = [
    "",
    "basic",
    "gold",
    "models-as-a-service/gold",
    "other/gold",
    "other/nope",
    "nope",
    "tied-a",
    "pending",
    "degraded-ok",
    "degraded-no",
    "named",
    "going",
    "meta",
]
MODELS = ["llm/m1", "llm/m2", "m2", "three", "publishers/llm/models/one", "llm/m4", "llm/nope", ""]


def view_of(docs: list[Json]) -> View:
    subs = tuple(
        s for d in docs if d["kind"] == "MaaSSubscription" if (s := objects.subscription(d))
    )
    policies = tuple(
        p for d in docs if d["kind"] == "MaaSAuthPolicy" if (p := objects.auth_policy(d))
    )
    models = tuple(objects.model_ref(d) for d in docs if d["kind"] == "MaaSModelRef")
    return View(subs, policies, models)


def outcome(choice: Selected | Refusal) -> tuple[object, ...]:
    if isinstance(choice, Refusal):
        return ("refused", choice.code, choice.message)
    entry = choice.model
    return (
        "selected",
        choice.subscription.qualified,
        entry.name,
        entry.rates,
        choice.subscription.organization_id,
        choice.subscription.cost_center,
        entry.per_token,
    )


def stand_in_outcome(stand_in: MaasApiStandIn, *args: Any) -> tuple[object, ...]:
    answer = stand_in.select(*args)
    if answer.get("error") == "internal_error":
        return ("refused", "internal_error", answer["message"])
    return outcome(selection_of(answer))


@pytest.mark.parametrize("source", ["crafted", "upstream", "local"])
def test_selection_agrees_with_the_maas_api_stand_in_everywhere(source: str) -> None:
    docs = {"crafted": CRAFTED, "upstream": load(UPSTREAM), "local": load(LOCAL)}[source]
    view = view_of(docs)
    stand_in = MaasApiStandIn(copy.deepcopy(docs))
    callers = [
        *CALLERS,
        ("bob", ["premium-group", "system:authenticated"]),
        ("x", ["premium-user"]),
    ]
    models = [*MODELS, "llm/facebook-opt-125m-simulated", "facebook/opt-125m"]
    asked = [*ASKED, "premium-subscription", "simulator-subscription"]
    compared = 0
    for (user, groups), requested, wanted in itertools.product(callers, asked, models):
        if not wanted:
            continue  # the gateway selects only for requests that name a model
        ours = outcome(view.select(groups, user, requested, wanted))
        theirs = stand_in_outcome(stand_in, groups, user, requested, wanted)
        assert ours == theirs, (user, groups, requested, wanted)
        compared += 1
    assert compared > 500


@pytest.mark.parametrize(
    ("user", "groups", "requested", "wanted", "expected"),
    [
        ("eve", ["everyone"], "", "llm/m1", ("selected", "models-as-a-service/basic", "m1")),
        (
            "eve",
            ["everyone"],
            "",
            "publishers/llm/models/one",
            ("selected", "models-as-a-service/basic", "m1"),
        ),
        ("eve", ["everyone"], "", "m2", ("selected", "models-as-a-service/basic", "m2")),
        ("gina", ["everyone", "gold"], "", "llm/m1", ("refused", "multiple_subscriptions")),
        (
            "gina",
            ["everyone", "gold"],
            "gold",
            "llm/m1",
            ("selected", "models-as-a-service/gold", "m1"),
        ),
        ("gina", ["everyone", "gold"], "other/gold", "llm/m1", ("selected", "other/gold", "m1")),
        ("gina", ["everyone", "gold"], "other/nope", "llm/m1", ("refused", "not_found")),
        ("eve", ["everyone"], "gold", "llm/m1", ("refused", "access_denied")),
        ("eve", ["everyone"], "basic", "three", ("refused", "model_not_in_subscription")),
        ("lee", ["late"], "", "llm/m1", ("refused", "model_unhealthy")),
        ("dee", ["deg"], "", "llm/m1", ("selected", "models-as-a-service/degraded-ok", "m1")),
        ("dan", ["deg2"], "", "llm/m1", ("refused", "model_unhealthy")),
        ("don", ["deg4"], "", "llm/m2", ("selected", "models-as-a-service/degraded-norates", "m2")),
        ("gus", ["going"], "", "llm/m1", ("refused", "unauthorized")),  # being deleted
        ("nick", ["nopol"], "", "llm/m4", ("refused", "unauthorized")),  # no MaaSAuthPolicy
        ("dave", [], "", "llm/m2", ("selected", "models-as-a-service/named", "m2")),
        ("nobody", [], "", "llm/m1", ("refused", "not_found")),
        ("tom", ["tie"], "", "three", ("refused", "multiple_subscriptions")),
        ("tom", ["tie"], "tied-a", "three", ("selected", "models-as-a-service/tied-a", "m3")),
    ],
)
def test_what_each_branch_selects(
    user: str, groups: list[str], requested: str, wanted: str, expected: tuple[str, ...]
) -> None:
    found = outcome(view_of(CRAFTED).select(groups, user, requested, wanted))
    assert found[: len(expected)] == expected


def test_a_tie_in_priority_goes_to_the_larger_limit_then_the_name() -> None:
    view = view_of(CRAFTED)
    ordered = [s.name for s in view._ordered if s.name.startswith("tied")]
    assert ordered == ["tied-b", "tied-a"]  # 90 beats 9 at the same priority
    both = view.select(["tie"], "tom", "tied", "llm/m3")
    assert isinstance(both, Refusal)
    assert both.code == "not_found"


def test_rates_as_the_controller_writes_them() -> None:
    view = view_of(CRAFTED)
    chosen = view.select(["meta"], "mia", "", "llm/m1")
    assert isinstance(chosen, Selected)
    assert objects.enforced_rates(chosen.model) == (Rate(10, 30), Rate(1000, 86_400))
    assert (chosen.subscription.organization_id, chosen.subscription.cost_center) == (
        "org-1",
        "cc-9",
    )
    bad = view.select(["badw"], "bea", "", "llm/m1")
    assert isinstance(bad, Selected)
    assert objects.enforced_rates(bad.model) is None  # left out of the policy: default deny
    none = objects.SubscriptionModel("llm", "m", ())
    assert objects.enforced_rates(none) == (objects.DEFAULT_RATE,)


@pytest.mark.parametrize(
    ("window", "seconds"),
    [
        ("1s", 1),
        ("30s", 30),
        ("1m", 60),
        ("24h", 86_400),
        ("8784h", 8_784 * 3600),
        ("9999m", 599_940),
    ],
)
def test_windows_maas_accepts(window: str, seconds: int) -> None:
    assert objects.window_seconds(window) == seconds


@pytest.mark.parametrize(
    "window",
    ["", "0m", "01m", "1d", "10000s", "8785h", "9999h", "1m\n", "1.5m", "1M", " 1m", "1h30m"],
)
def test_windows_maas_refuses(window: str) -> None:
    assert objects.window_seconds(window) is None


def test_objects_of_the_wrong_shape_read_as_maas_api_reads_them() -> None:
    odd = sub("odd", ["g"], [("llm", "m1", [{"limit": True, "window": "1m"}, {"limit": 2.5}])])
    odd["spec"]["priority"] = 2**31
    odd["spec"]["owner"]["users"] = ["ok", 3]  # not all strings: no users at all
    read = objects.subscription(odd)
    assert read is not None
    assert read.priority == 0
    assert read.users == ()
    assert [r.limit for r in read.models[0].rates] == [None, None]
    assert objects.enforced_rates(read.models[0]) is None
    assert objects.subscription({"kind": "MaaSSubscription", "spec": "x"}) is None
    assert objects.auth_policy({"spec": {"subjects": "x", "modelRefs": [{"name": ""}]}}) == (
        objects.AuthPolicy()
    )


@pytest.mark.parametrize(
    ("user", "group", "rate"),
    [
        ("pat", "pay", 2_000_000),
        ("pam", "pay2", None),
        ("pip", "pay3", None),
        ("poe", "pay4", None),
    ],
)
def test_billing_rates_are_read_exactly_or_not_at_all(
    user: str, group: str, rate: int | None
) -> None:
    """billingRate.perToken "0.000002" (currency units a token) is 2,000,000 micro-units per
    million tokens; text that is not a plain decimal, or not a string, prices nothing."""
    choice = view_of(CRAFTED).select([group], user, "", "llm/m1")
    assert isinstance(choice, Selected)
    assert objects.billing_rate(choice.model) == rate
