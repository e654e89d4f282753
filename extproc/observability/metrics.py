"""Prometheus metrics: one registry per process, label children cached off the hot path."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from extproc.accounting.pricing import BILLED_KINDS, parts
from extproc.domain import UNTRUSTED_REASONS, Charge, Decision, Era, Limits
from extproc.observability.model_labels import ModelLabels

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STREAM_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)


_CHILD_CACHE_SIZE = 10_000  # per-model / per-user label sets cached; beyond it the cache restarts


class Metrics:
    """Every metric the sidecar exports, documented in the README's metrics table."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        per_user: bool = False,
        era: Era = "tiers",
        models: ModelLabels | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.per_user = per_user
        self.keys = per_user and era == "subscriptions"  # the API key's name beside the user
        self.models = models or ModelLabels()  # bounds the `model` label (default: all "other")
        r = self.registry
        # The plan's label: "tier", or in the subscription era "subscription" (its <ns>/<name>).
        tier = "tier" if era == "tiers" else "subscription"
        user = ["user"] if per_user else []  # opt-in: one series per user
        if self.keys:
            user.append("key")
        self.requests = Counter(
            "maas_requests", "Admission decisions", ["decision", tier, *user], registry=r
        )
        self.limited = Counter(
            "maas_limited_requests",
            "Requests refused by a limit",
            ["limit", tier, *user],
            registry=r,
        )
        token_labels = [tier, "model", "kind", *user]
        self.tokens = Counter(
            "maas_tokens",
            "Tokens charged, by kind (prompt, completion, total)",
            token_labels,
            registry=r,
        )
        self.charges = Counter(
            "maas_charges",
            "Responses charged, by how usage was known",
            [tier, "source"],
            registry=r,
        )
        self.responses = Counter(
            "maas_responses",
            "Metered responses, by upstream status class (none: no response headers)",
            ["status_class", tier],
            registry=r,
        )
        self.tier_limit = Gauge(
            "maas_tier_limit",
            "Configured per-user limit of each tier, per window (kind: requests, tokens)",
            ["tier", "kind"],
            registry=r,
        )
        self.tier_limit_window = Gauge(
            "maas_tier_limit_window_seconds",
            "Window of each configured tier limit",
            ["tier", "kind"],
            registry=r,
        )
        self.disconnects = Counter(
            "maas_disconnects",
            "Streams that ended before the response completed",
            [tier],
            registry=r,
        )
        self.admission_seconds = Histogram(
            "maas_admission_seconds",
            "Time to decide admission",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_seconds = Histogram(
            "maas_stream_seconds",
            "Duration of ext_proc streams",
            buckets=_STREAM_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "maas_store_errors", "Counter store operations that failed", ["op"], registry=r
        )
        self.store_seconds = Histogram(
            "maas_store_seconds",
            "Counter store round-trip time",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.spool_depth = Gauge(
            "maas_spool_depth", "Charges waiting for the store to come back", registry=r
        )
        self.spool_dropped = Counter(
            "maas_spool_dropped",
            "Charges dropped: the spool was full, or they outlived store.dedupe_ttl_s",
            registry=r,
        )
        self.settle_duplicates = Counter(
            "maas_settle_duplicates",
            "Settles the store had applied already (a replay after a lost reply): ignored",
            registry=r,
        )
        self.reservation_exceeded = Counter(
            "maas_reservation_exceeded",
            "Charges larger than their admission's reservation (the overshoot bound can break)",
            [tier],
            registry=r,
        )
        self.charges_pending = Gauge(
            "maas_charges_pending",
            "Charges handed to the store and not yet settled or spooled",
            registry=r,
        )
        self.internal_errors = Counter(
            "maas_internal_errors",
            "Unexpected errors answered with a defined reply instead of a traceback",
            ["where"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "maas_cache_lookups", "Cache lookups", ["cache", "result"], registry=r
        )
        self.unavailable = Counter(
            "maas_dependency_unavailable",
            "Admissions that met a failed dependency (refused, or let through under fail_open)",
            ["dependency"],
            registry=r,
        )
        for dependency in ("identity", "tiers", "access"):  # known values start at 0, not absent
            self.unavailable.labels(dependency)
        self.tier_mapping_rejected = Counter(
            "maas_tier_mapping_rejected",
            "Tier mapping updates rejected as invalid; the last good mapping stays in use",
            registry=r,
        )
        self.kuadrant_reports = Counter(
            "maas_kuadrant_reports",
            "Limitador Report calls: sent, failed (each failed attempt), dropped (never delivered)",
            ["result"],
            registry=r,
        )
        self.kuadrant_queue_depth = Gauge(
            "maas_kuadrant_queue_depth", "Charges and hits waiting to be reported", registry=r
        )
        self.kuadrant_skipped = Counter(
            "maas_kuadrant_skipped",
            "Charges not reported because no discovered limit fits (no_route, no_limit, ...)",
            ["reason"],
            registry=r,
        )
        self.policy_predicates_ignored = Counter(
            "maas_policy_predicates_ignored",
            "Policy limits whose predicates, counters or rates are not understood (not enforced)",
            registry=r,
        )
        self.httproute_conflicts = Counter(
            "maas_httproute_conflicts",
            "Model names or services two watched HTTPRoutes claim (left out of the route map)",
            registry=r,
        )
        self.usage_invalid = Counter(
            "maas_upstream_usage_invalid",
            "Responses whose reported usage was not trusted and was charged as a capped estimate",
            ["reason"],
            registry=r,
        )
        for reason in UNTRUSTED_REASONS:
            self.usage_invalid.labels(reason)
        # Token kinds and cost (issue #16): the billed kinds are disjoint, so they add up.
        self.token_kinds = Counter(
            "maas_token_kind",
            "Tokens charged, by billed kind (input, cached_input, cache_creation, output,"
            " reasoning: disjoint, they add up to prompt + completion)",
            [tier, "model", "kind", *user],
            registry=r,
        )
        self.cost_micros = Counter(
            "maas_cost_micros",
            "Cost of the priced charges, in micro-units of the configured currency",
            [tier, "model", *user],
            registry=r,
        )
        self._kind_children: dict[tuple[str, ...], tuple[Counter, ...]] = {}
        self._cost_children: dict[tuple[str, ...], Counter] = {}
        # Budgets (limits.budgets): soft thresholds, shadow mode, and the events' webhook.
        self.budget_threshold_crossed = Counter(
            "maas_budget_threshold_crossed",
            "Soft budget thresholds reached: once per budget, subject, period and threshold",
            ["budget", "threshold"],
            registry=r,
        )
        self.budget_would_refuse = Counter(
            "maas_budget_would_refuse",
            "Requests a budget in shadow mode would have refused (they were allowed)",
            ["budget"],
            registry=r,
        )
        self.budget_events = Counter(
            "maas_budget_events",
            "Soft-limit events for the webhook, by result (sent, failed, dropped)",
            ["result"],
            registry=r,
        )
        for result in ("sent", "failed", "dropped"):
            self.budget_events.labels(result)
        self.cloudevents = Counter(
            "maas_export_cloudevents",
            "Charge records pushed as CloudEvents: sent; failed (an attempt, retried); "
            "dropped (never sent: refused by the receiver, trimmed, or not a record)",
            ["result"],
            registry=r,
        )
        for result in ("sent", "failed", "dropped"):
            self.cloudevents.labels(result)
        self.cloudevents_spool = Gauge(
            "maas_export_cloudevents_spool",
            "Charge records read from the export stream and not yet delivered",
            registry=r,
        )
        self._decision_children: dict[tuple[str, ...], Counter] = {}
        self._response_children: dict[tuple[int, str], Counter] = {}
        # Label children are looked up once: ``labels()`` costs more than the increment itself.
        self._token_children: dict[tuple[str, ...], tuple[Counter, ...]] = {}
        self._charge_children: dict[tuple[str, str], Counter] = {}

    def set_limits(self, tiers: Mapping[str, Limits]) -> None:
        """Export the configured tier limits, so a dashboard can draw them; 0 (unlimited) is left out."""
        for tier, limits in tiers.items():
            for kind, amount, window_s in (
                ("requests", limits.requests, limits.requests_window_s),
                ("tokens", limits.tokens, limits.tokens_window_s),
            ):
                if amount:
                    self.tier_limit.labels(tier, kind).set(amount)
                    self.tier_limit_window.labels(tier, kind).set(window_s)

    def _user(self, userid: str, key: str) -> tuple[str, ...]:
        if not self.per_user:
            return ()
        return (userid, key) if self.keys else (userid,)

    def decided(self, decision: Decision, seconds: float) -> None:
        tier = decision.tier.name if decision.tier else ""
        identity = decision.identity
        user = self._user(identity.userid, identity.key_name) if identity else self._user("", "")
        key = (decision.outcome.value, tier, *user)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.requests.labels(*key)
        child.inc()
        self.admission_seconds.observe(seconds)
        if decision.limit_kind and not decision.allowed:
            self.limited.labels(decision.limit_kind, tier, *user).inc()

    def charged(self, charge: Charge) -> None:
        usage = charge.usage
        user = self._user(charge.userid, charge.key_name)
        tier = charge.plan
        model = self.models.label(charge.model, charge.path, subscribed=bool(charge.subscription))
        children = self._token_children.get((tier, model, *user))
        if children is None:
            if len(self._token_children) >= _CHILD_CACHE_SIZE:
                self._token_children.clear()
            children = tuple(
                self.tokens.labels(tier, model, kind, *user)
                for kind in ("prompt", "completion", "total")
            )
            self._token_children[(tier, model, *user)] = children
        for token_child, amount in zip(
            children, (usage.prompt_tokens, usage.completion_tokens, usage.total()), strict=True
        ):
            if amount:
                token_child.inc(amount)
        self._kinds_and_cost(charge, (tier, model, *user))
        if usage.invalid:
            self.usage_invalid.labels(usage.invalid).inc()
        source = "estimated" if usage.estimated else ("reported" if usage.reported else "none")
        by_source = self._charge_children.get((tier, source))
        if by_source is None:
            by_source = self._charge_children[(tier, source)] = self.charges.labels(tier, source)
        by_source.inc()
        status_key = (charge.status // 100, tier)
        child = self._response_children.get(status_key)
        if child is None:
            status_class = f"{status_key[0]}xx" if charge.status else "none"
            child = self._response_children[status_key] = self.responses.labels(status_class, tier)
        child.inc()
        if charge.disconnected:
            self.disconnects.labels(tier).inc()

    def _kinds_and_cost(self, charge: Charge, key: tuple[str, ...]) -> None:
        """``maas_token_kind_total`` from ``pricing.split``; ``maas_cost_micros_total`` for priced
        charges only (its series appears with the first priced charge, 0 included)."""
        children = self._kind_children.get(key)
        if children is None:
            if len(self._kind_children) >= _CHILD_CACHE_SIZE:
                self._kind_children.clear()
                self._cost_children.clear()
            tier, model, *user = key
            children = self._kind_children[key] = tuple(
                self.token_kinds.labels(tier, model, kind, *user) for kind in BILLED_KINDS
            )
        for child, amount in zip(children, parts(charge.usage), strict=True):
            if amount:  # the counts come in BILLED_KINDS order, as the children
                child.inc(amount)
        if charge.priced:
            cost = self._cost_children.get(key)
            if cost is None:
                cost = self._cost_children[key] = self.cost_micros.labels(*key)
            cost.inc(charge.cost_micros)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Expose ``/metrics`` on its own port, in a thread outside the event loop."""
    return start_http_server(port, addr=host, registry=metrics.registry)
