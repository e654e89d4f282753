"""The subscription era's plan step: the selected MaaSSubscription and its rates for the request's model.

A request that names no model (``GET /v1/models``) needs no subscription, as MaaS's gateway
policy selects one only when the path or the model header names a model. Otherwise the selection
(watched objects, or maas-api) gives the subscription and its entry for the model, or the 403.
The entry's rates are those the controller writes into the model's TokenRateLimitPolicy: a
model listed without rates gets 100 per minute, and a subscription with an invalid rate gets no
limit there at all, so the gateway's ``gateway-default-deny`` (limit 0) applies: here, one rate
of 0 tokens (``DEFAULT_DENY``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from extproc.authz.base import PlanQuery, PlanRefusal
from extproc.authz.cache import ExpiringCache, SingleFlight
from extproc.domain import Outcome, Plan, Rate
from extproc.errors import PlanUnavailable
from extproc.observability.metrics import Metrics
from extproc.subscriptions import objects
from extproc.subscriptions.maas_api import Json, MaasApi
from extproc.subscriptions.select import PHASES, Refusal, Selected
from extproc.subscriptions.watch import WatchedSubscriptions

log = logging.getLogger("extproc.subscriptions")

DEFAULT_DENY = (Rate(0, 60),)  # gateway-default-deny: limit 0 per 1m
UNSUBSCRIBED = Plan("", era="subscriptions", rates=DEFAULT_DENY)
CACHE = "subscription_select"
MAX_ENTRIES = 100_000


class Selector(Protocol):
    async def select(
        self, groups: Sequence[str], username: str, requested: str, model: str
    ) -> Selected | Refusal: ...

    def route_of(self, model_ref: str) -> str:
        """The HTTPRoute ``<namespace>/<name>`` the MaaSModelRef names ("" unknown)."""
        ...

    async def close(self) -> None: ...


class WatchSelector:
    """Selection over the watched objects, done here."""

    def __init__(self, watched: WatchedSubscriptions) -> None:
        self._watched = watched

    async def select(
        self, groups: Sequence[str], username: str, requested: str, model: str
    ) -> Selected | Refusal:
        view = self._watched.view()
        if view is None:
            raise PlanUnavailable("the MaaS subscription objects are not listed yet")
        return view.select(groups, username, requested, model)

    def route_of(self, model_ref: str) -> str:
        view = self._watched.view()
        found = view.model_ref(model_ref) if view is not None else None
        return found.route if found is not None else ""

    async def close(self) -> None:
        await self._watched.close()


class MaasApiSelector:
    """Selection asked of maas-api, each answer kept ``ttl_s`` per (user, groups, ask, model)
    as Authorino keeps its ``subscription-info``; concurrent first asks share one call."""

    def __init__(
        self,
        api: MaasApi,
        metrics: Metrics,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._api = api
        self._ttl_s = ttl_s
        self._cache: ExpiringCache[tuple[str, ...], Selected | Refusal] = ExpiringCache(
            max_entries, clock
        )
        self._flights: SingleFlight[tuple[str, ...], Selected | Refusal] = SingleFlight()
        self._lookups = {
            result: metrics.cache_lookups.labels(CACHE, result)
            for result in ("hit", "miss", "shared")
        }

    async def select(
        self, groups: Sequence[str], username: str, requested: str, model: str
    ) -> Selected | Refusal:
        key = (username, "\n".join(groups), requested, model)
        if (cached := self._cache.get(key)) is not None:
            self._lookups["hit"].inc()
            return cached.value
        self._lookups["shared" if self._flights.joining(key) else "miss"].inc()
        body = {
            "groups": list(groups),
            "username": username,
            "requestedSubscription": requested,
            "requestedModel": model,
        }
        return await self._flights.run(key, lambda: self._ask(key, body))

    async def _ask(self, key: tuple[str, ...], body: Json) -> Selected | Refusal:
        choice = selection_of(await self._api.select(body, PlanUnavailable))
        self._cache.put(key, choice, self._ttl_s)
        return choice

    def route_of(self, model_ref: str) -> str:
        return ""  # maas-api does not say: the route map finds it

    async def close(self) -> None:
        await self._flights.close()
        self._cache.clear()
        await self._api.close()


def selection_of(answer: Json) -> Selected | Refusal:
    """A SelectResponse read as the gateway policy reads it (``subscription-valid`` and
    ``require-group-membership``); maas-api's own failure (``internal_error``) is an outage."""
    error, message = _text(answer, "error"), _text(answer, "message")
    if error == "internal_error":
        raise PlanUnavailable("maas-api could not select a subscription")
    if error:
        return Refusal(error, message or "Access denied")
    name, namespace = _text(answer, "name"), _text(answer, "namespace")
    healthy = _text(answer, "phase") in PHASES and not _text(answer, "deletionTimestamp")
    if not name or not healthy or answer.get("accessAllowed") is not True:
        return Refusal("unauthorized", message or "Access denied")
    resolved = _text(answer, "resolvedModel")
    model_ns, slash, model_name = resolved.rpartition("/")
    entry = objects.SubscriptionModel(model_ns if slash else "", model_name)
    refs = answer.get("modelRefs")
    for ref in refs if isinstance(refs, list) else []:
        if not isinstance(ref, dict):
            continue
        if ref.get("name") == model_name or (resolved and ref.get("model_name") == resolved):
            limits = ref.get("token_rate_limits")
            rate = ref.get("billing_rate")  # ModelRefInfo.BillingRate{PerToken `per_token`}
            entry = objects.SubscriptionModel(
                entry.namespace or "",
                _text(ref, "name") or model_name,
                tuple(
                    objects.ModelRate(_integer(r.get("limit")), _text(r, "window"))
                    for r in (limits if isinstance(limits, list) else [])
                    if isinstance(r, dict)
                ),
                _text(rate, "per_token") if isinstance(rate, dict) else "",
            )
            break
    subscription = objects.Subscription(
        namespace=namespace,
        name=name,
        organization_id=_text(answer, "organizationId"),
        cost_center=_text(answer, "costCenter"),
        phase=_text(answer, "phase"),
    )
    return Selected(subscription, entry)


def _text(mapping: Json, name: str) -> str:
    value = mapping.get(name)
    return value if isinstance(value, str) else ""


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SubscriptionPlans:
    """``PlanSource`` of the subscription era."""

    def __init__(
        self,
        selector: Selector,
        metrics: Metrics,
        route_of: Callable[[str, str], str] = lambda _namespace, _name: "",
        declared: Callable[[str], tuple[Rate, ...] | None] = lambda _key: None,
    ) -> None:
        self._selector = selector
        self._metrics = metrics
        self._route_of = route_of  # (namespace, name) of a model -> its HTTPRoute (route map)
        self._declared = declared  # selected key -> the rates a watched policy declares
        self._bad_rates: set[str] = set()  # selected keys whose billingRate was logged as bad

    async def plan_for(self, query: PlanQuery) -> Plan | PlanRefusal | None:
        if not query.model:
            # Nothing to select by: a listing passes; a metered request meets the default deny.
            return UNSUBSCRIBED if query.charged else None
        identity = query.identity
        # An API key always runs under the subscription it was minted for (celSubscription).
        requested = identity.subscription or query.requested
        try:
            choice = await self._selector.select(
                identity.groups, identity.username, requested, query.model
            )
        except PlanUnavailable:
            self._metrics.unavailable.labels("subscriptions").inc()
            raise
        if isinstance(choice, Refusal):
            return PlanRefusal(Outcome.NO_SUBSCRIPTION, choice.message, choice.code)
        sub, entry = choice.subscription, choice.model
        key = f"{sub.qualified}@{entry.ref}"
        rates = self._declared(key) or objects.enforced_rates(entry) or DEFAULT_DENY
        route = self._selector.route_of(entry.ref) or self._route_of(entry.namespace, entry.name)
        return Plan(
            sub.qualified,
            era="subscriptions",
            model=entry.ref,
            rates=rates,
            organization_id=sub.organization_id,
            cost_center=sub.cost_center,
            route=route,
            billing_rate=self._billing_rate(key, entry),
        )

    def _billing_rate(self, key: str, entry: objects.SubscriptionModel) -> int | None:
        """The entry's billingRate; a bad one is not used and logged once per selected key."""
        rate = objects.billing_rate(entry)
        bad = rate is None and entry.per_token
        if bad and key not in self._bad_rates and len(self._bad_rates) < MAX_ENTRIES:
            self._bad_rates.add(key)
            log.warning("billingRate.perToken of %s is not a plain decimal price: not used", key)
        return rate

    async def close(self) -> None:
        await self._selector.close()
