"""MaaSSubscription, MaaSAuthPolicy and MaaSModelRef objects read into values, as maas-api reads them.

Field names come from opendatahub-io/models-as-a-service ``maas-controller/api/maas/v1alpha1/``
(``maassubscription_types.go``, ``maasauthpolicy_types.go``, ``maasmodelref_types.go``,
``common_types.go``) at c0639b1b; what is read, and how leniently, from maas-api's own readers at
the same commit: ``maas-api/internal/subscription/selector.go`` (``parseSubscription``,
``parseModelRef``, ``parseTokenMetadata``) and ``maas-api/internal/authpolicy/checker.go``
(``AuthorizedModels``, ``policyMatchesSubject``). Like them, a field of the wrong type reads as
absent; only a subscription without ``spec`` is left out.

``spec.modelRefs[].billingRate.perToken`` (``BillingRate{PerToken string}``, "the cost per
token", in ``maassubscription_types.go``) is read as ``parseModelRef`` reads it, at
c0639b1b9baecf95fb836e00ba3f79178833781b: a string, else absent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.accounting import pricing
from extproc.domain import Rate

GROUP = "maas.opendatahub.io"
VERSION = "v1alpha1"
SUBSCRIPTIONS = "maassubscriptions"
AUTH_POLICIES = "maasauthpolicies"
MODEL_REFS = "maasmodelrefs"

# maassubscription_types.go TokenRateLimit: Window `^[1-9]\d{0,3}(s|m|h)$`, Limit 1..1e9; the
# controller also refuses windows over 366 days (maassubscription_controller.go,
# validateTokenRateLimit) and leaves such a subscription out of the model's policy.
_WINDOW = re.compile(r"^([1-9]\d{0,3})(s|m|h)\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_LIMIT = 1_000_000_000
MAX_WINDOW_S = 366 * 24 * 3600
# The controller writes this rate for a model listed without tokenRateLimits.
DEFAULT_RATE = Rate(100, 60)
_INT32_MAX = 2**31 - 1

Json = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ModelRate:
    """A rate as written: ``limit`` is None when it is not an integer (maas-api reads 0)."""

    limit: int | None
    window: str


@dataclass(frozen=True, slots=True)
class SubscriptionModel:
    """``spec.modelRefs[]``: one model of a subscription, its token rates and its
    ``billingRate.perToken`` as written ("" when absent or not a string)."""

    namespace: str
    name: str
    rates: tuple[ModelRate, ...] = ()
    per_token: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """``status.tokenRateLimitStatuses[]``: is the model's TokenRateLimitPolicy ready."""

    model: str
    ready: bool


@dataclass(frozen=True, slots=True)
class Subscription:
    namespace: str
    name: str
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    priority: int = 0
    models: tuple[SubscriptionModel, ...] = ()
    organization_id: str = ""
    cost_center: str = ""
    phase: str = ""
    deleting: bool = False
    rate_limit_statuses: tuple[RateLimitStatus, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def max_limit(self) -> int:
        """The largest limit of any rate: maas-api's second sort key."""
        return max((r.limit or 0 for m in self.models for r in m.rates), default=0)


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """``MaaSAuthPolicy``: who (``subjects``) may use which models (``modelRefs``)."""

    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    models: frozenset[tuple[str, str]] = frozenset()  # (namespace, name)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """``MaaSModelRef``: the body-routing alias of a model and the HTTPRoute it is served by."""

    namespace: str
    name: str
    alias: str = ""  # status.resolvedModelAlias (publishers/<ns>/models/<model> for KServe)
    route: str = ""  # "<status.httpRouteNamespace>/<status.httpRouteName>", "" unknown

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def window_seconds(window: str) -> int | None:
    """A MaaS window (``30s``, ``1m``, ``24h``) in seconds; None for anything MaaS refuses."""
    match = _WINDOW.match(window)
    if match is None:
        return None
    seconds = int(match[1]) * _UNIT_S[match[2]]
    return seconds if seconds <= MAX_WINDOW_S else None


def enforced_rates(model: SubscriptionModel) -> tuple[Rate, ...] | None:
    """The rates the controller puts in the model's policy; None when one of them is invalid
    (the controller then leaves the subscription out of the policy altogether)."""
    if not model.rates:
        return (DEFAULT_RATE,)
    rates: list[Rate] = []
    for rate in model.rates:
        seconds = window_seconds(rate.window)
        if rate.limit is None or not 0 < rate.limit <= MAX_LIMIT or seconds is None:
            return None
        rates.append(Rate(rate.limit, seconds))
    return tuple(rates)


def billing_rate(model: SubscriptionModel) -> int | None:
    """The model's ``billingRate.perToken`` as micro-units per million tokens; None when it is
    not set or not a price we read exactly (``pricing.per_token_micros``: a plain decimal, at
    most 12 decimals, no sign or exponent). The controller does not validate it (a free string)."""
    if not model.per_token:
        return None
    try:
        return pricing.per_token_micros(model.per_token)
    except ValueError:
        return None


def _map(value: object) -> Json:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _integer(value: object) -> int | None:
    """An integer as Go's unstructured JSON holds one (int64; never a bool or a float)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: object) -> tuple[str, ...]:
    """``NestedStringSlice``: every element a string, else nothing at all."""
    items = _list(value)
    return tuple(items) if all(isinstance(i, str) for i in items) else ()


def _group_names(value: object) -> tuple[str, ...]:
    return tuple(name for g in _list(value) if isinstance(name := _map(g).get("name"), str))


def _meta(obj: Json) -> tuple[str, str, bool]:
    meta = _map(obj.get("metadata"))
    deleting = bool(_text(meta.get("deletionTimestamp")))
    return _text(meta.get("namespace")), _text(meta.get("name")), deleting


def subscription(obj: Json) -> Subscription | None:
    """A MaaSSubscription as maas-api's selector reads it; None without a ``spec`` mapping."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None
    namespace, name, deleting = _meta(obj)
    owner = _map(spec.get("owner"))
    priority = _integer(spec.get("priority"))
    models = tuple(
        SubscriptionModel(
            _text(ref.get("namespace")),
            _text(ref.get("name")),
            tuple(
                ModelRate(_integer(_map(r).get("limit")), _text(_map(r).get("window")))
                for r in _list(ref.get("tokenRateLimits"))
                if isinstance(r, Mapping)
            ),
            _text(_map(ref.get("billingRate")).get("perToken")),
        )
        for ref in _list(spec.get("modelRefs"))
        if isinstance(ref, Mapping)
    )
    metadata = _map(spec.get("tokenMetadata"))
    status = _map(obj.get("status"))
    return Subscription(
        namespace=namespace,
        name=name,
        groups=_group_names(owner.get("groups")),
        users=_strings(owner.get("users")),
        priority=priority if priority is not None and 0 <= priority <= _INT32_MAX else 0,
        models=models,
        organization_id=_text(metadata.get("organizationId")),
        cost_center=_text(metadata.get("costCenter")),
        phase=_text(status.get("phase")).strip(),
        deleting=deleting,
        rate_limit_statuses=tuple(
            RateLimitStatus(_text(_map(s).get("model")), _map(s).get("ready") is True)
            for s in _list(status.get("tokenRateLimitStatuses"))
            if isinstance(s, Mapping)
        ),
    )


def auth_policy(obj: Json) -> AuthPolicy | None:
    """A MaaSAuthPolicy as maas-api's access checker reads it; None without a ``spec``."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None
    subjects = _map(spec.get("subjects"))
    return AuthPolicy(
        groups=tuple(n.strip() for n in _group_names(subjects.get("groups"))),
        users=tuple(u.strip() for u in _list(subjects.get("users")) if isinstance(u, str)),
        models=frozenset(
            (_text(ref.get("namespace")), name)
            for ref in map(_map, _list(spec.get("modelRefs")))
            if (name := _text(ref.get("name")))
        ),
    )


def model_ref(obj: Json) -> ModelRef:
    namespace, name, _ = _meta(obj)
    status = _map(obj.get("status"))
    route_ns, route = _text(status.get("httpRouteNamespace")), _text(status.get("httpRouteName"))
    return ModelRef(
        namespace,
        name,
        alias=_text(status.get("resolvedModelAlias")),
        route=f"{route_ns}/{route}" if route_ns and route else "",
    )
