"""Pure functions naming what Limitador counts: limit identifiers, domains, conditions, descriptors."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

TOKEN_LIMIT_PREFIX = "tokenlimit"  # TokenRateLimitPolicy limits
REQUEST_LIMIT_PREFIX = "limit"  # RateLimitPolicy limits
# Go's unicode.IsLetter (categories Lu, Ll, Lt, Lm, Lo) and unicode.IsDigit (Nd).
_KEPT = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nd"})
# descriptors[0]["key"] with either quote; the only shape Kuadrant writes into Limitador's limits.
_DESCRIPTOR_REF = r"""descriptors\[0\]\[(?P<q>["'])(?P<key>.+?)(?P=q)\]"""
_CONDITION = re.compile(rf"""^\s*{_DESCRIPTOR_REF}\s*==\s*(?P<q2>["'])(?P<value>.*?)(?P=q2)\s*$""")
_VARIABLE = re.compile(rf"^\s*{_DESCRIPTOR_REF}\s*$")

Entries = tuple[tuple[str, str], ...]


def limit_identifier(
    policy_namespace: str, policy_name: str, limit_name: str, prefix: str = TOKEN_LIMIT_PREFIX
) -> str:
    """The descriptor key Kuadrant sets to "1" when a policy limit applies to a request.

    ``tokenlimit.<limit name, each character not a letter, digit or _ as _>__<first 8 hex of
    sha256(ns/policy/limit)>``; letters and digits in any script are kept, as Go's
    ``unicode.IsLetter`` / ``unicode.IsDigit`` keep them (kuadrant-operator
    ``internal/controller/ratelimit_workflow_helpers.go`` at ae698811,
    ``TokenLimitNameToLimitadorIdentifier`` and ``LimitNameToLimitadorIdentifier``).
    """
    digest = hashlib.sha256(f"{policy_namespace}/{policy_name}/{limit_name}".encode()).hexdigest()
    return f"{prefix}.{sanitized(limit_name)}__{digest[:8]}"


def sanitized(name: str) -> str:
    """``name`` with every character but letters, digits and ``_`` replaced by ``_``."""
    return "".join(c if c == "_" or unicodedata.category(c) in _KEPT else "_" for c in name)


def parse_condition(text: str) -> tuple[str, str] | None:
    """``descriptors[0]["k"] == "v"`` as (k, v); None for any other shape."""
    match = _CONDITION.match(text)
    return (match["key"], match["value"]) if match else None


def parse_variable(text: str) -> str | None:
    """``descriptors[0]["k"]`` as k; None for any other shape."""
    match = _VARIABLE.match(text)
    return match["key"] if match else None


@dataclass(frozen=True, slots=True)
class Hit:
    """What one Report says: the domain, the entries of descriptors[0] and [1], the tokens."""

    domain: str
    counters: Entries  # descriptors[0]
    labels: Entries  # descriptors[1]: Limitador's metric labels
    hits: int


def report_entries(identifier: str, variables: Entries) -> Entries:
    """descriptors[0]: the limit's flag set to "1", then one entry per counter variable."""
    return ((identifier, "1"), *variables)


def metric_labels(
    userid: str,
    tier: str,
    model: str,
    subscription: str = "",
    organization_id: str = "",
    cost_center: str = "",
) -> Entries:
    """descriptors[1]: the labels Limitador puts on ``authorized_hits``; empty values left out.

    The subscription era's are those of MaaS's TelemetryPolicy (models-as-a-service
    ``deployment/base/observability/gateway-telemetry-policy.yaml`` at c0639b1b): the
    subscription's name (``auth.identity.selected_subscription``), its organization id and cost
    center, beside user and model.
    """
    named = (
        ("user", userid),
        ("tier", tier),
        ("model", model),
        ("subscription", subscription.rpartition("/")[2]),
        ("organization_id", organization_id),
        ("cost_center", cost_center),
    )
    return tuple((k, v) for k, v in named if v)


def subscription_limit(subscription: str, model: str, route: str) -> tuple[str, str, str]:
    """(policy namespace, policy name, limit name) MaaS's controller writes for a subscription's
    model (maas-controller ``maassubscription_controller.go`` at c0639b1b,
    ``reconcileTRLPForModel``): the TokenRateLimitPolicy ``maas-trlp-<model>`` in the model's
    HTTPRoute's namespace, its limit ``<subscription ns>-<subscription>-<model>-tokens``."""
    _, _, model_name = model.rpartition("/")
    route_namespace = route.partition("/")[0]
    safe = subscription.replace("/", "-")
    return route_namespace, f"maas-trlp-{model_name}", f"{safe}-{model_name}-tokens"
