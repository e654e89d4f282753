"""Admission: the ordered steps from request headers to a Decision (identity, plan, access, limits)."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from extproc.accounting import counts, estimate
from extproc.authz.base import (
    AccessChecker,
    IdentitySource,
    PlanQuery,
    PlanRefusal,
    PlanSource,
    TierPlans,
    TierSource,
)
from extproc.config import DEFAULT_MAX_REQUEST_TOKENS, AccountingConfig
from extproc.domain import Decision, Era, Identity, Outcome, Plan, Tier
from extproc.errors import StoreUnavailable, Unavailable
from extproc.limits.limiter import Limiter, Verdict
from extproc.routes import Route, RouteTable
from extproc.store.base import Attribution

log = logging.getLogger("extproc.admission")

OWN_HEADERS = ("x-maas-username", "x-maas-tier")
SUBSCRIPTION_HEADER = "x-maas-subscription"


@dataclass(frozen=True, slots=True)
class EraHeaders:
    """The client's X-MaaS-* headers in one era: which are ours to overwrite (not stripped),
    which are a legitimate input, which get a 403."""

    own: tuple[str, ...]  # set by our allow reply
    own_without_plan: tuple[str, ...]  # set when no plan applies (subscriptions: no model)
    inputs: tuple[str, ...] = ()  # read by admission, never a spoof
    refused: tuple[str, ...] = ()  # 403 whatever routes.spoofed_headers says


ERA_HEADERS: dict[str, EraHeaders] = {
    "tiers": EraHeaders(OWN_HEADERS, OWN_HEADERS),
    # maas-controller maasauthpolicy_controller.go at c0639b1b: deny-client-identity-headers
    # refuses x-maas-username and x-maas-group; X-MaaS-Subscription selects the subscription.
    "subscriptions": EraHeaders(
        own=("x-maas-username", "x-maas-group", SUBSCRIPTION_HEADER),
        own_without_plan=("x-maas-username", "x-maas-group"),
        inputs=(SUBSCRIPTION_HEADER,),
        refused=("x-maas-username", "x-maas-group"),
    ),
}
# Set by ext_authz on requests whose body ext_proc must rewrite (include_usage); the injector
# filter of the split layout runs only when it is there, and removes it.
INJECT_HEADER = "x-maas-inject"
SPOOF_PREFIX = "x-maas-"
# APIs whose streams report usage only when asked (stream_options.include_usage).
USAGE_OPT_IN_SUFFIXES = ("/chat/completions", "/v1/completions")
# With dependency_failure fail_open, a caller whose tier cannot be resolved is admitted as this
# tier: limited by ``limits.tiers.unknown`` if configured, else not limited.
UNRESOLVED_TIER = Tier("unknown", -1, frozenset())
# The same for a subscription that cannot be selected: admitted unlimited (no rates).
UNRESOLVED_SUBSCRIPTION = Plan("unknown", era="subscriptions")
# The request's completion bound, by the names the OpenAI, Anthropic and Responses APIs use;
# the first one set (and above 0) is the bound, every one set must be a valid count.
BOUND_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# The limiter's refusing kind -> the outcome (replies.py maps each to its status).
_REFUSALS = {"tokens": Outcome.TOKEN_LIMITED, "budget": Outcome.QUOTA_EXCEEDED}


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case keys, as ext_authz delivers them
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RequestBody:
    """What admission reads from a charged request's JSON body."""

    model: str = ""
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage was asked for
    prompt_chars: int = 0  # for estimates when the response reports no usage
    problem: str = ""  # why the request is refused with a 400; "" when it is not

    @classmethod
    def parse(cls, body: bytes, max_tokens: int = DEFAULT_MAX_REQUEST_TOKENS) -> RequestBody:
        """What admission needs from the body; ``problem`` set when it must be refused.

        A bound field that is not a whole number from 0 to ``max_tokens`` (``1.5``, ``"10"``,
        ``true``, ``1e30``, a 400-digit literal, NaN) and JSON nested past the parser's depth
        are refused. A body that is not JSON at all, or a missing or null bound, is admitted
        with the default reservation: the upstream refuses what it cannot read.
        """
        if not body:
            return cls()
        try:
            data: Any = counts.loads(body)
        except RecursionError:
            return cls(problem="the request body is nested too deeply")
        except (ValueError, UnicodeDecodeError):
            return cls()  # a malformed body is the upstream's to refuse; reserve the default
        if not isinstance(data, dict):
            return cls()
        model = data.get("model")
        bound = None
        for name in BOUND_FIELDS:
            value = data.get(name)
            if value is None:
                continue
            number, problem = counts.count(value)
            if number is None or problem or number > max_tokens:
                return cls(problem=f"{name}: expected a whole number from 0 to {max_tokens}")
            if bound is None and number > 0:
                bound = number
        options = data.get("stream_options")
        return cls(
            model=model if isinstance(model, str) else "",
            max_tokens=bound,
            stream=data.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prompt_chars=estimate.prompt_chars(data),
        )


class Admission:
    """Runs the steps in order; each refusal is returned as a Decision, never raised."""

    def __init__(
        self,
        routes: RouteTable,
        identities: IdentitySource,
        tiers: TierSource | None,
        access: AccessChecker,
        limiter: Limiter,
        *,
        plans: PlanSource | None = None,
        era: Era = "tiers",
        spoofed_headers: Literal["strip", "reject"] = "strip",
        unclassified: Literal["refuse", "pass"] = "refuse",
        store_failure: Literal["fail_open", "fail_closed"] = "fail_open",
        dependency_failure: Literal["fail_open", "fail_closed"] = "fail_closed",
        accounting: AccountingConfig | None = None,
        route_of: Callable[[str, str, str], str] | None = None,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    ) -> None:
        self._routes = routes
        self._identities = identities
        if plans is None:
            if tiers is None:
                raise ValueError("admission needs a tier source or a plan source")
            plans = TierPlans(tiers)
        self._plans = plans
        self._access = access
        self._limiter = limiter
        self._era = era
        self._headers = ERA_HEADERS[era]
        self._unresolved = UNRESOLVED_TIER if era == "tiers" else UNRESOLVED_SUBSCRIPTION
        self._reject_spoofed = spoofed_headers == "reject"
        self._refuse_unclassified = unclassified == "refuse"
        self._store_fail_open = store_failure == "fail_open"
        self._dependency_fail_open = dependency_failure == "fail_open"
        self._accounting = accounting or AccountingConfig()
        self._max_request_tokens = max_request_tokens  # limits.max_request_tokens
        # Request ids: a random prefix per process and a counter; unique across replicas and
        # restarts without a syscall per request.
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        # (path namespace, path name, body model) -> the HTTPRoute the request goes through.
        self._route_of = route_of or (lambda _namespace, _name, _model: "")

    def _next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    async def decide(self, request: AdmissionRequest) -> Decision:
        headers = self._headers
        route = self._routes.classify(request.method, request.path)
        spoofed = tuple(
            h for h in request.headers if h.startswith(SPOOF_PREFIX) and h not in headers.inputs
        )
        if spoofed and self._reject_spoofed:
            return Decision(
                Outcome.SPOOFED, "X-MaaS-* request headers are reserved for the gateway"
            )
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            # A browser's CORS preflight carries no credentials and no body: it passes, unbilled
            # and anonymous, so the upstream (or Envoy's CORS filter) can answer it.
            return Decision(Outcome.ALLOW, "cors preflight", strip_headers=spoofed)
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            return Decision(Outcome.UNAUTHENTICATED, "missing bearer token")
        try:
            identity = await self._identities.authenticate(token)
        except Unavailable as exc:
            # Fail closed whatever the policy: an unauthenticated request is never let through.
            log.warning("admission dependency unavailable: %s", type(exc).__name__)
            return Decision(Outcome.UNAVAILABLE, "identity service unavailable")
        if identity is None:
            return Decision(Outcome.UNAUTHENTICATED, "invalid or expired token")
        if forged := [h for h in spoofed if h in headers.refused]:
            # Subscription era: as MaaS's gateway policy, which sets them itself after auth.
            reason = f"the {forged[0]} request header is set by the gateway, not the client"
            return Decision(Outcome.SPOOFED, reason, identity, reason_code="unauthorized")
        if self._refuse_unclassified and (route.invalid or route.unclassified):
            # Never passed unbilled: a model path we cannot classify may still be served upstream.
            if route.invalid:
                reason = "the request path has no single reading"
                return Decision(Outcome.INVALID_PATH, reason, identity)
            reason = f"no {request.method} route {route.path} on this gateway"
            return Decision(Outcome.UNKNOWN_ROUTE, reason, identity)
        body = (
            RequestBody.parse(request.body, self._max_request_tokens)
            if route.charged
            else RequestBody()
        )
        query = PlanQuery(
            identity,
            model=route.model or body.model,
            requested=request.headers.get(SUBSCRIPTION_HEADER, "") if headers.inputs else "",
            charged=route.charged,
        )
        try:
            plan = await self._plans.plan_for(query)
        except Unavailable as exc:
            if not self._dependency_fail_open:
                log.warning("admission dependency unavailable: %s", type(exc).__name__)
                return Decision(Outcome.UNAVAILABLE, "plan source unavailable", identity)
            log.warning("plan unavailable: admitting as %s (fail_open)", self._unresolved.name)
            plan = self._unresolved
        if isinstance(plan, PlanRefusal):
            return Decision(plan.outcome, plan.reason, identity, reason_code=plan.code)
        if body.problem:
            return Decision(Outcome.BAD_REQUEST, body.problem, identity, plan)
        try:
            access = await self._access_ok(identity, route, body.model)
        except Unavailable as exc:
            if not self._dependency_fail_open:
                log.warning("admission dependency unavailable: %s", type(exc).__name__)
                return Decision(Outcome.UNAVAILABLE, "access check unavailable", identity, plan)
            log.warning("access check unavailable: admitting (fail_open)")
            access = True
        if not access:
            return Decision(Outcome.FORBIDDEN, "no access to this model", identity, plan)
        model = (plan.model if plan is not None else "") or body.model or route.model
        own = headers.own if plan is not None else headers.own_without_plan
        strip = tuple(h for h in spoofed if h not in own) if spoofed else ()
        if not route.charged:
            return Decision(
                Outcome.ALLOW,
                identity=identity,
                tier=plan,
                model=model,
                strip_headers=strip,
                path=route.path,
            )
        assert plan is not None  # a charged route always has a plan (a tier, or default deny)
        return await self._limit(route, identity, plan, model, body, strip)

    def route_of(self, route: Route, body_model: str) -> str:
        """The HTTPRoute of a path route, else of the body's model ("" when unknown)."""
        return self._route_of(route.namespace, route.name, "" if route.name else body_model)

    async def _access_ok(self, identity: Identity, route: Route, body_model: str) -> bool:
        if route.exempt and not route.name:
            return True
        if route.name:
            return await self._access.allowed(identity, route.namespace, route.name)
        if body_model:
            return await self._access.allowed(identity, "", body_model)
        return True

    async def _limit(
        self,
        route: Route,
        identity: Identity,
        plan: Plan,
        model: str,
        body: RequestBody,
        strip: tuple[str, ...],
    ) -> Decision:
        """The limits step of a charged route; the Decision is built once, here."""
        prompt_estimate = min(
            estimate.tokens_from_chars(body.prompt_chars, self._accounting.chars_per_token),
            self._max_request_tokens,
        )
        reserve = self._limiter.reservation_for(plan.tier, body.max_tokens, prompt_estimate)
        inject = (
            self._accounting.inject_include_usage
            and body.stream
            and not body.include_usage
            and route.path.endswith(USAGE_OPT_IN_SUFFIXES)
        )
        if inject and INJECT_HEADER in strip:
            strip = tuple(h for h in strip if h != INJECT_HEADER)  # ours overwrites it
        http_route = plan.route or self.route_of(route, body.model)
        request_id, now = self._next_request_id(), self._limiter.now_ms()
        try:
            if plan.era == "tiers":
                verdict = await self._limiter.admit(
                    identity.userid,
                    plan.name,
                    model,
                    reserve,
                    http_route,
                    request_id=request_id,
                    now_ms=now,
                    groups=identity.groups,
                )
            else:
                verdict = await self._limiter.admit(
                    identity.userid,
                    plan.name,
                    model,
                    reserve,
                    rates=plan.rates,
                    attribution=Attribution(
                        plan.name, identity.key_name, plan.organization_id, plan.cost_center
                    ),
                    request_id=request_id,
                    now_ms=now,
                    groups=identity.groups,
                    billing_rate=plan.billing_rate,
                )
        except StoreUnavailable:
            if not self._store_fail_open:
                return Decision(Outcome.UNAVAILABLE, "rate-limit store unavailable", identity, plan)
            log.warning("counter store unavailable: admitting without a reservation")
            # The admission may still run late (a timeout, not a refusal): the settle releases
            # its hold if it did, and a late one after the settle is void (store/lua/admit.lua).
            verdict = Verdict(
                allowed=True,
                reserved_tokens=reserve,
                admitted_ms=now,
                budget_groups=self._limiter.budget_groups(identity.groups),
            )
        if not verdict.allowed:
            outcome = _REFUSALS.get(verdict.kind, Outcome.RATE_LIMITED)
            reason = f"{verdict.kind} limit of {verdict.limit} exceeded"
            if verdict.budget:
                reason = f"budget {verdict.budget} used up: limit {verdict.limit}"
            return Decision(
                outcome,
                reason,
                identity,
                plan,
                model,
                route=http_route,
                charged=True,
                limit_kind=verdict.kind,
                limit=verdict.limit,
                remaining=0,
                reset_s=verdict.reset_s,
                retry_after_s=verdict.retry_after_s,
            )
        return Decision(
            Outcome.ALLOW,
            identity=identity,
            tier=plan,
            model=model,
            route=http_route,
            charged=True,
            reserved_tokens=verdict.reserved_tokens,
            token_windows=verdict.token_windows,
            request_id=request_id,
            admitted_ms=verdict.admitted_ms,
            limit_kind=verdict.kind,
            limit=verdict.limit,
            remaining=verdict.remaining,
            reset_s=verdict.reset_s,
            strip_headers=strip,
            inject_usage=inject,
            prompt_estimate=prompt_estimate,
            path=route.path,
            budgets_held=verdict.budgets_held,
            budget_groups=verdict.budget_groups,
        )


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
