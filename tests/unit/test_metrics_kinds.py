"""maas_token_kind_total and maas_cost_micros_total: the disjoint billed kinds, and the cost of
priced charges, under the same bounded labels as the other token metrics."""

from __future__ import annotations

from extproc.domain import Charge, Usage
from extproc.observability.metrics import Metrics
from extproc.observability.model_labels import ModelLabels

KNOWN = ModelLabels(["m"])
# 100 prompt tokens of which 30 read from a cache and 10 written to one; 50 completion tokens of
# which 20 reasoning.
RICH = Usage(
    prompt_tokens=100,
    completion_tokens=50,
    total_tokens=150,
    cached_tokens=30,
    cache_creation_tokens=10,
    reasoning_tokens=20,
)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def kinds(metrics: Metrics, **labels: str) -> dict[str, float]:
    return {
        sample.labels["kind"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "maas_token_kind_total"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    }


def test_the_kinds_are_disjoint_and_add_up_to_the_total() -> None:
    metrics = Metrics(models=KNOWN)
    metrics.charged(Charge("alice", "free", "m", RICH))
    metrics.charged(Charge("alice", "free", "m", RICH))
    found = kinds(metrics, tier="free", model="m")
    assert found == {
        "input": 120,
        "cached_input": 60,
        "cache_creation": 20,
        "output": 60,
        "reasoning": 40,
    }
    assert sum(found.values()) == value(
        metrics, "maas_tokens_total", tier="free", model="m", kind="total"
    )


def test_usage_without_details_is_all_input_and_output() -> None:
    metrics = Metrics(models=KNOWN)
    metrics.charged(Charge("a", "free", "m", Usage(prompt_tokens=7, completion_tokens=3)))
    metrics.charged(Charge("a", "free", "m", Usage(total_tokens=11)))  # total only: input
    found = kinds(metrics)
    assert found == {
        "input": 18,
        "cached_input": 0,
        "cache_creation": 0,
        "output": 3,
        "reasoning": 0,
    }


def test_cost_counts_priced_charges_only() -> None:
    metrics = Metrics(models=KNOWN)
    metrics.charged(Charge("a", "free", "m", RICH, cost_micros=1234, priced=True))
    metrics.charged(Charge("a", "free", "m", RICH, cost_micros=0, priced=True))
    assert value(metrics, "maas_cost_micros_total", tier="free", model="m") == 1234
    metrics.charged(Charge("a", "premium", "m", RICH))  # no price configured: no series
    assert value(metrics, "maas_cost_micros_total", tier="premium", model="m") is None


def test_client_chosen_models_are_bounded_and_the_user_label_opt_in() -> None:
    metrics = Metrics(per_user=True, models=KNOWN)
    for i in range(50):
        metrics.charged(Charge("bob", "free", f"made-up-{i}", RICH, cost_micros=1, priced=True))
    assert value(metrics, "maas_cost_micros_total", tier="free", model="other", user="bob") == 50
    models = {
        sample.labels["model"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name in ("maas_token_kind_total", "maas_cost_micros_total")
    }
    assert models == {"other"}
    assert kinds(metrics, user="bob")["reasoning"] == 50 * 20


def test_subscriptions_label_the_plan_subscription() -> None:
    metrics = Metrics(era="subscriptions", models=KNOWN)
    charge = Charge("a", "", "m", RICH, subscription="ns/gold", cost_micros=9, priced=True)
    metrics.charged(charge)
    assert value(metrics, "maas_cost_micros_total", subscription="ns/gold", model="m") == 9
    assert kinds(metrics, subscription="ns/gold")["cache_creation"] == 10
