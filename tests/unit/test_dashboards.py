"""Every PromQL expression of the Grafana dashboards names only metrics the sidecar exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from extproc.config import DEFAULT_LIMITS
from extproc.domain import Charge, Decision, Identity, Outcome, Tier, Usage
from extproc.observability.metrics import Metrics

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "dashboards"
# PromQL words that look like metric names: functions, aggregations, keywords.
_PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "avg", "or", "and",
    "unless", "vector", "ignoring", "on", "group_left", "group_right", "without", "count",
    "topk", "sort_desc",
}  # fmt: skip


def dashboard_exprs() -> list[tuple[str, str]]:
    """(dashboard file, expression) for every panel target and every query variable."""
    found: list[tuple[str, str]] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc: dict[str, Any] = json.loads(path.read_text())
        panels = [p for top in doc["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            found += [(path.name, target["expr"]) for target in panel.get("targets", [])]
        for variable in doc.get("templating", {}).get("list", []):
            if variable.get("type") == "query":  # label_values(<selector>, <label>)
                selector = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["definition"])
                found.append((path.name, selector))
    return found


def dashboard_panels() -> list[tuple[str, str]]:
    """(panel title, expression) for every panel target of every dashboard."""
    found: list[tuple[str, str]] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc: dict[str, Any] = json.loads(path.read_text())
        for panel in (p for top in doc["panels"] for p in (top, *top.get("panels", []))):
            found += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    return found


def metric_names(expr: str) -> set[str]:
    """Identifiers in metric position: not labels (inside {}), not ranges, not functions."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_matchers)
    without_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left)\s*\([^)]*\)", "", without_ranges
    )
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", without_groupings))
    return {n for n in names if n not in _PROMQL_WORDS and not n.startswith("__")}


def exported_names() -> set[str]:
    """Sample names of a per-user registry after one of everything has happened."""
    metrics = Metrics(per_user=True)
    metrics.set_limits(DEFAULT_LIMITS)
    tier = Tier("free", 0, frozenset())
    identity = Identity("alice", "alice")
    metrics.decided(Decision(Outcome.ALLOW, identity=identity, tier=tier), 0.001)
    limited = Decision(Outcome.TOKEN_LIMITED, identity=identity, tier=tier, limit_kind="tokens")
    metrics.decided(limited, 0.001)
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, estimated=True)
    metrics.charged(Charge("alice", "free", "m", usage, disconnected=True, priced=True))
    metrics.stream_seconds.observe(0.1)
    metrics.store_errors.labels("admit").inc()
    metrics.store_seconds.labels("admit").observe(0.001)
    metrics.spool_depth.set(0)
    metrics.spool_dropped.inc()
    metrics.cache_lookups.labels("token_review", "hit").inc()
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_the_dashboards_have_queries() -> None:
    files = {name for name, _ in dashboard_exprs()}
    assert files == {"maas-overview.json", "maas-user.json"}


@pytest.mark.parametrize(("dashboard", "expr"), dashboard_exprs())
def test_every_metric_in_a_dashboard_query_is_exported(dashboard: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{dashboard}: no metric in {expr!r}"
    unknown = names - exported_names()
    assert not unknown, f"{dashboard}: {expr!r} uses metrics the sidecar does not export: {unknown}"


def test_the_name_extraction_sees_through_labels_and_functions() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, op) (rate(maas_store_seconds_bucket{op="x"}[5m])))'
        " / ignoring(source) group_left sum(rate(maas_charges_total[$__rate_interval]))"
    )
    assert metric_names(expr) == {"maas_store_seconds_bucket", "maas_charges_total"}
    assert {"maas_tokens_total", "maas_admission_seconds_bucket"} <= exported_names()
