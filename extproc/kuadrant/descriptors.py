"""Pure functions naming what Limitador counts: limit identifiers, domains, conditions, descriptors."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

TOKEN_LIMIT_PREFIX = "tokenlimit"  # TokenRateLimitPolicy limits
REQUEST_LIMIT_PREFIX = "limit"  # RateLimitPolicy limits
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
# descriptors[0]["key"] with either quote; the only shape Kuadrant writes into Limitador's limits.
_DESCRIPTOR_REF = r"""descriptors\[0\]\[(?P<q>["'])(?P<key>.+?)(?P=q)\]"""
_CONDITION = re.compile(rf"""^\s*{_DESCRIPTOR_REF}\s*==\s*(?P<q2>["'])(?P<value>.*?)(?P=q2)\s*$""")
_VARIABLE = re.compile(rf"^\s*{_DESCRIPTOR_REF}\s*$")

Entries = tuple[tuple[str, str], ...]


def limit_identifier(
    policy_namespace: str, policy_name: str, limit_name: str, prefix: str = TOKEN_LIMIT_PREFIX
) -> str:
    """The descriptor key Kuadrant sets to "1" when a policy limit applies to a request.

    ``tokenlimit.<limit name, [^A-Za-z0-9_] as _>__<first 8 hex of sha256(ns/policy/limit)>``.
    """
    digest = hashlib.sha256(f"{policy_namespace}/{policy_name}/{limit_name}".encode()).hexdigest()
    return f"{prefix}.{_UNSAFE.sub('_', limit_name)}__{digest[:8]}"


def route_domain(path: str, route_template: str, default_route: str) -> str:
    """The ``<HTTPRoute namespace>/<HTTPRoute name>`` a request path went through; "" if unknown.

    Path routes ``/<namespace>/<name>/v1/...`` fill ``route_template``; paths without that prefix
    (body-model routes) use ``default_route``.
    """
    path = path.split("?", 1)[0]
    index = path.find("/v1/")
    if index > 0:
        segments = path[1:index].split("/")
        if len(segments) == 2 and all(segments):
            return route_template.format(namespace=segments[0], name=segments[1])
    return default_route


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


def metric_labels(userid: str, tier: str, model: str) -> Entries:
    """descriptors[1]: the labels Limitador puts on ``authorized_hits``; empty values left out."""
    return tuple((k, v) for k, v in (("user", userid), ("tier", tier), ("model", model)) if v)
