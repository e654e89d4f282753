"""Value types shared by every layer: who is calling, their plan, what they used, what we decided."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller.

    ``userid`` is the counter key Kuadrant uses (``auth.identity.userid``): the service-account
    name for Kubernetes tokens, the configured user for API keys.
    """

    userid: str
    username: str
    groups: tuple[str, ...] = ()
    # An API key minted by maas-api (subscription era): its id and user-given name, and the
    # MaaSSubscription it was bound to when minted ("" for tokens and static keys).
    key_id: str = ""
    key_name: str = ""
    subscription: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """A tier's (or a model override's) request and token budgets per window; 0 means unlimited."""

    requests: int = 0
    requests_window_s: int = 120
    tokens: int = 0
    tokens_window_s: int = 60


@dataclass(frozen=True, slots=True)
class Rate:
    """One token rate of a MaaSSubscription's model: ``limit`` tokens per ``window_s`` seconds."""

    limit: int
    window_s: int


Era = Literal["tiers", "subscriptions"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What limits and bills a caller's requests, in either era.

    Tier era: a tier of the tier-to-group mapping (``name``, ``level``, ``groups``), its limits
    in the configuration. Subscription era: the MaaSSubscription selected for the request
    (``name`` is ``<namespace>/<name>``), with the token ``rates`` of the MaaSModelRef ``model``
    it was selected for and its ``tokenMetadata``.
    """

    name: str
    level: int = 0
    groups: frozenset[str] = frozenset()
    display_name: str = ""
    era: Era = "tiers"
    model: str = ""  # subscriptions: the MaaSModelRef "<namespace>/<name>" the rates are for
    rates: tuple[Rate, ...] = ()  # subscriptions: every rate of that model, all enforced
    organization_id: str = ""  # subscriptions: spec.tokenMetadata.organizationId
    cost_center: str = ""  # subscriptions: spec.tokenMetadata.costCenter
    route: str = ""  # subscriptions: the model's HTTPRoute, which its rate limit policy targets
    # subscriptions: the modelRef's billingRate.perToken, in micro-units per million tokens
    billing_rate: int | None = None

    @property
    def subscription(self) -> str:
        """``<namespace>/<name>`` of the subscription; "" for a tier."""
        return self.name if self.era == "subscriptions" else ""

    @property
    def tier(self) -> str:
        """The tier's name; "" for a subscription."""
        return self.name if self.era == "tiers" else ""

    @property
    def selected_key(self) -> str:
        """Kuadrant's ``auth.identity.selected_subscription_key``: ``<sub ns>/<sub>@<model>``."""
        return f"{self.name}@{self.model}" if self.era == "subscriptions" else ""


Tier = Plan  # the tier era's name for a plan: Tier(name, level, groups, display_name)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one response used. ``None`` means the upstream did not report that field.

    ``prompt_tokens`` includes the cached (read) and cache-creation (written) input tokens, and
    ``completion_tokens`` includes the reasoning tokens, as OpenAI reports them; the disjoint
    kinds that are priced come from ``accounting.pricing.split``.

    "Not reported" is kept apart from 0 so that a missing field is never charged as free.
    ``estimated`` marks usage we computed ourselves because the upstream reported none.
    ``invalid`` says why the upstream reported numbers we cannot trust ("" when we can): a
    count that is negative, a fraction, not a number, not finite or above the configured bound,
    or a body that inflated past the decompression cap. Its numbers are then all ``None``.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # cached input read (part of prompt_tokens)
    # Cache writes (Anthropic's cache_creation_input_tokens), part of prompt_tokens too.
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None  # part of completion_tokens
    estimated: bool = False
    invalid: str = ""  # one of UNTRUSTED_REASONS

    @property
    def reported(self) -> bool:
        return (
            self.prompt_tokens is not None
            or self.completion_tokens is not None
            or self.total_tokens is not None
        )

    def total(self) -> int:
        """The tokens to charge: ``total_tokens`` when reported, else the sum of the parts."""
        if self.total_tokens is not None:
            return self.total_tokens
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def updated(self, newer: Usage) -> Usage:
        """This usage with every field ``newer`` reports taken from ``newer`` (later events win)."""
        return Usage(
            prompt_tokens=_pick(newer.prompt_tokens, self.prompt_tokens),
            completion_tokens=_pick(newer.completion_tokens, self.completion_tokens),
            total_tokens=_pick(newer.total_tokens, self.total_tokens),
            cached_tokens=_pick(newer.cached_tokens, self.cached_tokens),
            reasoning_tokens=_pick(newer.reasoning_tokens, self.reasoning_tokens),
            estimated=self.estimated or newer.estimated,
            invalid=self.invalid or newer.invalid,
            cache_creation_tokens=_pick(newer.cache_creation_tokens, self.cache_creation_tokens),
        )


# Why upstream usage is not trusted: the ``reason`` label of maas_upstream_usage_invalid_total.
UNTRUSTED_REASONS = (
    "negative",  # a count below 0
    "fraction",  # a number with a fractional part
    "not_a_number",  # a string, a bool, an array or an object where a count belongs
    "not_finite",  # NaN
    "too_large",  # above limits.max_request_tokens, infinite, or a literal too long to read
    "decompression_bomb",  # the compressed body inflated past the ratio or size cap
)


def _pick(first: int | None, second: int | None) -> int | None:
    return first if first is not None else second


class Outcome(enum.Enum):
    """What admission decided; ``replies`` maps each to an Envoy answer."""

    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"  # 401
    NO_TIER = "no_tier"  # 403
    NO_SUBSCRIPTION = (
        "no_subscription"  # 403: subscription selection refused (reason_code says why)
    )
    FORBIDDEN = "forbidden"  # 403: no access to the model
    SPOOFED = "spoofed"  # 403: client sent X-MaaS-* headers (only when configured to reject)
    RATE_LIMITED = "rate_limited"  # 429: request limit
    TOKEN_LIMITED = "token_limited"  # 429: token limit
    QUOTA_EXCEEDED = "quota_exceeded"  # 429: a budget (limits.budgets) is spent for its period
    BAD_REQUEST = "bad_request"  # 400: a token bound the client sent is not a count we accept
    UNAVAILABLE = "unavailable"  # 503: a dependency failed and policy is fail-closed
    INVALID_PATH = "invalid_path"  # 400: the path has no single reading (extproc.paths)
    UNKNOWN_ROUTE = "unknown_route"  # 404: under a model prefix but neither charged nor exempt
    INTERNAL_ERROR = "internal_error"  # 500: a bug of ours; logged in one line, counted


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of admission: a value, never an exception."""

    outcome: Outcome
    reason: str = ""
    identity: Identity | None = None
    tier: Plan | None = None  # the caller's plan: a tier, or the selected subscription
    model: str = ""
    route: str = (
        ""  # "<namespace>/<name>" of the HTTPRoute (Kuadrant's limit namespace); "" unknown
    )
    charged: bool = False  # whether the route is metered (completions-like POST)
    reserved_tokens: int = 0
    token_windows: tuple[int, ...] = ()  # start of each token window the reservation went into
    limit_kind: str = ""  # "requests" or "tokens": the limit that refused, or the tightest one
    limit: int = 0
    remaining: int = -1  # -1: unknown
    reset_s: int = 0
    retry_after_s: int = 0
    strip_headers: tuple[str, ...] = ()  # client-sent X-MaaS-* headers to remove
    inject_usage: bool = False  # ext_proc rewrites the request to ask the stream for usage
    prompt_estimate: int = 0  # prompt tokens estimated from the request, for missing usage
    request_id: str = ""  # set when the request is admitted to a charged route
    admitted_ms: int = 0  # the admission clock (its day holds the reservation until settled)
    reason_code: str = ""  # MaaS's error code for a subscription refusal (x-ext-auth-reason)
    path: str = ""  # the normalized request path (extproc.paths) that names the model route
    # Budgets (limits.budgets): whether admission reserved in them, and the caller's groups
    # that group budgets name (the settle finds the same counters from them).
    budgets_held: bool = False
    budget_groups: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


@dataclass(frozen=True, slots=True)
class Charge:
    """What one finished response costs one user, handed to the store to settle a reservation."""

    userid: str
    tier: str  # "" in the subscription era
    model: str
    usage: Usage
    reserved_tokens: int = 0
    token_windows: tuple[int, ...] = ()
    status: int = 200
    disconnected: bool = False
    path: str = ""  # the request path
    route: str = ""  # the HTTPRoute admission counted the request in (Kuadrant's domain)
    request_id: str = ""  # the admission's id: a settle with an id already applied is ignored
    admitted_ms: int = 0  # 0: not admitted with a reservation (nothing unsettled to clear)
    # The subscription era: "<namespace>/<name>" of the subscription, the API key's name, the
    # subscription's tokenMetadata, and the window (seconds) of each of its token rates.
    subscription: str = ""
    key_name: str = ""
    organization_id: str = ""
    cost_center: str = ""
    rate_windows: tuple[int, ...] = ()
    budgets_held: bool = False  # see Decision
    budget_groups: tuple[str, ...] = ()
    # Set once before the settle (accounting.pricing): the response's cost in micro-units of
    # the configured currency, rounded up per request, and whether a price applied at all.
    cost_micros: int = 0
    priced: bool = False
    # From the request's headers to the response's last byte as the gateway saw it (the ext_proc
    # stream, or Envoy's access log entry); 0: not measured.
    duration_ms: int = 0
    # The subscription era: the plan's billingRate.perToken (micro-units per million tokens).
    billing_rate: int | None = None

    @property
    def plan(self) -> str:
        """The plan charged: the subscription in the subscription era, else the tier."""
        return self.subscription or self.tier
