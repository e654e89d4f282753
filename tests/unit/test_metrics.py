"""The metrics the sidecar records: status classes, tier limits, the opt-in user label, bounded models."""

from __future__ import annotations

from extproc.config import DEFAULT_LIMITS, parse
from extproc.domain import Charge, Decision, Identity, Limits, Outcome, Tier, Usage
from extproc.observability.metrics import Metrics
from extproc.observability.model_labels import OTHER, ModelLabels

FREE = Tier("free", 0, frozenset())
ALICE = Identity("alice", "alice")
USAGE = Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_responses_count_by_status_class_and_tier() -> None:
    metrics = Metrics()
    for status in (200, 201, 429, 503, 0):
        metrics.charged(Charge("alice", "free", "m", USAGE, status=status))
    assert value(metrics, "maas_responses_total", status_class="2xx", tier="free") == 2
    assert value(metrics, "maas_responses_total", status_class="4xx", tier="free") == 1
    assert value(metrics, "maas_responses_total", status_class="5xx", tier="free") == 1
    assert value(metrics, "maas_responses_total", status_class="none", tier="free") == 1


def test_tier_limits_are_exported_per_window_and_unlimited_ones_left_out() -> None:
    metrics = Metrics()
    metrics.set_limits({**DEFAULT_LIMITS, "open": Limits(requests=0, tokens=10)})
    assert value(metrics, "maas_tier_limit", tier="free", kind="tokens") == 100
    assert value(metrics, "maas_tier_limit_window_seconds", tier="free", kind="tokens") == 60
    assert value(metrics, "maas_tier_limit", tier="premium", kind="requests") == 20
    assert value(metrics, "maas_tier_limit_window_seconds", tier="premium", kind="requests") == 120
    assert (
        metrics.registry.get_sample_value("maas_tier_limit", {"tier": "open", "kind": "requests"})
        is None
    )


def test_the_user_label_is_opt_in() -> None:
    known = ModelLabels(["m"])
    plain, per_user = Metrics(models=known), Metrics(per_user=True, models=known)
    limited = Decision(Outcome.RATE_LIMITED, identity=ALICE, tier=FREE, limit_kind="requests")
    for metrics in (plain, per_user):
        metrics.decided(Decision(Outcome.ALLOW, identity=ALICE, tier=FREE), 0.001)
        metrics.decided(limited, 0.001)
        metrics.charged(Charge("alice", "free", "m", USAGE))
    assert value(plain, "maas_requests_total", decision="allow", tier="free") == 1
    assert value(plain, "maas_tokens_total", tier="free", model="m", kind="total") == 5
    user = {"user": "alice"}
    assert value(per_user, "maas_requests_total", decision="allow", tier="free", **user) == 1
    assert (
        value(per_user, "maas_limited_requests_total", limit="requests", tier="free", **user) == 1
    )
    assert value(per_user, "maas_tokens_total", tier="free", model="m", kind="total", **user) == 5


def test_known_dependencies_start_at_zero() -> None:
    metrics = Metrics()
    for dependency in ("identity", "tiers", "access"):
        assert (
            metrics.registry.get_sample_value(
                "maas_dependency_unavailable_total", {"dependency": dependency}
            )
            == 0
        )


def model_series(metrics: Metrics) -> set[str]:
    return {
        sample.labels["model"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "maas_tokens_total"
    }


def test_a_thousand_client_chosen_models_make_no_new_series() -> None:
    config = parse(
        {
            "limits": {"models": {"free": {"granite-8b": {"tokens": 10}}}},
            "access": {"body_models": {"facebook/opt-125m": "llm/opt"}},
        },
        serving=False,
    )
    metrics = Metrics(models=ModelLabels.from_config(config))
    for i in range(1000):
        metrics.charged(Charge("alice", "free", f"random-{i}", USAGE, path="/v1/chat/completions"))
    for model in ("granite-8b", "facebook/opt-125m", "llm/opt"):
        metrics.charged(Charge("alice", "free", model, USAGE, path="/v1/chat/completions"))
    assert model_series(metrics) == {OTHER, "granite-8b", "facebook/opt-125m", "llm/opt"}
    assert value(metrics, "maas_tokens_total", tier="free", model=OTHER, kind="total") == 5000


def test_access_checked_path_routes_name_the_model_up_to_a_bound() -> None:
    checked = ModelLabels(routes_checked=True, max_routes=3)
    unchecked = ModelLabels()
    assert checked.label("whatever", "/llm/opt/v1/chat/completions") == "llm/opt"
    assert unchecked.label("whatever", "/llm/opt/v1/chat/completions") == OTHER
    labels = {checked.label("x", f"/ns/m{i}/v1/chat/completions") for i in range(1000)}
    assert labels == {"ns/m0", "ns/m1", OTHER}  # three routes in all (llm/opt first), then other
    assert checked.label("x", "/v1/chat/completions") == OTHER  # a body-model route: no route


SUB = "models-as-a-service/premium-subscription"


def test_the_subscription_era_labels_the_subscription_and_opt_in_the_key() -> None:
    metrics = Metrics(era="subscriptions", per_user=True)
    bob = Identity("bob", "bob", key_name="bob-ci")
    plan = Tier(SUB, era="subscriptions", model="llm/opt")
    metrics.decided(Decision(Outcome.ALLOW, identity=bob, tier=plan), 0.001)
    metrics.charged(Charge("bob", "", "llm/opt", USAGE, subscription=SUB, key_name="bob-ci"))
    who = {"user": "bob", "key": "bob-ci"}
    assert value(metrics, "maas_requests_total", decision="allow", subscription=SUB, **who) == 1
    assert (
        value(metrics, "maas_tokens_total", subscription=SUB, model="llm/opt", kind="total", **who)
        == 5
    )
    assert value(metrics, "maas_responses_total", status_class="2xx", subscription=SUB) == 1
    without = Metrics(era="subscriptions")  # the key, like the user, is opt-in
    without.charged(Charge("bob", "", "llm/opt", USAGE, subscription=SUB, key_name="bob-ci"))
    assert value(without, "maas_tokens_total", subscription=SUB, model="llm/opt", kind="total") == 5
