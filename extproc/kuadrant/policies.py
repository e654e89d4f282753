"""Limits declared by Kuadrant policies in the cluster, watched so admission enforces them.

Subscription era: the per-model TokenRateLimitPolicies MaaS's controller writes (one limit per
(subscription, model), predicate ``auth.identity.selected_subscription_key == "<sub ns>/<sub>@
<model ns>/<model>" && !request.path.endsWith("/v1/models")``, several rates allowed:
maas-controller ``maassubscription_controller.go`` at c0639b1b) give each subscription's rates
for a model and the limit its tokens are reported into; ``gateway-default-deny`` is skipped (the
sidecar denies the unsubscribed itself). Tier era, as follows.

A TokenRateLimitPolicy (``kuadrant.io/v1alpha1``) limit becomes a tier's token limit and a
RateLimitPolicy (``kuadrant.io/v1``) limit its request limit, whatever the limit is called, when
its predicates select one tier and nothing the sidecar does not already enforce: the MaaS seed
shape ``auth.identity.tier == "<tier>"`` (models-as-a-service ``deployment/base/policies/
usage-policies/`` at 1282feb5), and the conjunction ``auth.identity.tier == "<tier>" &&
!request.path.endsWith("/v1/models")`` it reads from a6ae8dca on (the last tier-era commit,
ae050cb6). Kuadrant ANDs a policy's top-level ``when`` and every entry of a limit's ``when``
(kuadrant-operator ``internal/controller/ratelimit_workflow_helpers.go`` at ae698811,
``wasmActionSpecsFromTokenLimit``), so all of them are read as one conjunction. A path term is
accepted only when it holds on every path the sidecar limits, and ``"x-maas-…" in
request.headers`` marks a limit the data plane never triggers (``kuadrant.mode: all``, README
"Feeding Kuadrant"). One rate ``{limit, window}`` and the per-user counter are required too.
Anything else is logged, counted in ``maas_policy_predicates_ignored_total`` and left out:
never guessed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from extproc.authz.kube import Kube
from extproc.config import KuadrantConfig, LimitsConfig, RoutesConfig
from extproc.domain import Limits, Rate
from extproc.kuadrant.objects import Collection, ObjectWatch, Snapshot
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.kuadrant")

Kind = Literal["tokens", "requests"]
_TIER = re.compile(r"""^auth\.identity\.tier\s*==\s*(["'])([^"'\\]+)\1$""")
# The subscription era (maas-controller maassubscription_controller.go at c0639b1b,
# reconcileTRLPForModel): one limit per (subscription, model) in the model's policy.
_SUBSCRIPTION_KEY = re.compile(
    r"""^auth\.identity\.selected_subscription_key\s*==\s*(["'])([^"'\\]+)\1$"""
)
# MaaS's gateway-wide 0-token default for the unsubscribed: the sidecar denies those itself.
DEFAULT_DENY_POLICY = "gateway-default-deny"
_ENDS_WITH = re.compile(r"""^request\.path\.endsWith\(\s*(["'])([^"'\\]+)\1\s*\)$""")
# `"x-maas-…" in request.headers`: never true in the data plane (ext_authz strips every client
# X-MaaS-* header and sets none of that name), so Kuadrant never charges the limit: the marker
# of a limit only the sidecar enforces and reports (kuadrant.mode: all).
_SIDECAR_ONLY = re.compile(r"""^(["'])x-maas-[a-z0-9-]+\1\s+in\s+request\.headers$""")
_WINDOW = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
CHARGED_SUFFIXES = RoutesConfig().charged_suffixes


@dataclass(frozen=True, slots=True)
class PolicyKind:
    group: str
    version: str
    plural: str
    kind: Kind


TOKEN_POLICIES = PolicyKind("kuadrant.io", "v1alpha1", "tokenratelimitpolicies", "tokens")
REQUEST_POLICIES = PolicyKind("kuadrant.io", "v1", "ratelimitpolicies", "requests")


@dataclass(frozen=True, slots=True)
class PolicyLimit:
    """One understood policy limit: ``limit`` per ``window_s`` for each user of ``tier``; in the
    subscription era, every rate of one ``selected_subscription_key`` (``tier`` then "")."""

    policy: str  # <namespace>/<name>
    name: str
    kind: Kind
    tier: str
    limit: int
    window_s: int
    subscription: str = ""  # "<sub ns>/<sub>@<model ns>/<model>"
    rates: tuple[Rate, ...] = ()

    @property
    def rate(self) -> Rate:
        return Rate(self.limit, self.window_s)


def conjuncts(predicate: str) -> list[str] | None:
    """The terms of ``a && (b && c) && ...``, flattened, outer parentheses dropped; None when
    quotes or parentheses do not balance. A term may still hold ``||``: it is then not
    understood, which is the safe answer (``&&`` binds tighter than ``||`` in CEL)."""
    parts = _top_level_split(predicate)
    if parts is None:
        return None
    terms: list[str] = []
    for part in parts:
        part = part.strip()
        if _enclosed(part):
            inner = conjuncts(part[1:-1])
            if inner is None:
                return None
            terms.extend(inner)
        else:
            terms.append(part)
    return terms


def _outside_quotes(text: str) -> Iterator[tuple[int, str, int]]:
    """(index, char, parenthesis depth after it) for each character outside string literals;
    a depth below 0, or a literal left open, yields a final (-1, "", -1)."""
    depth, quote, index = 0, "", 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        else:
            depth += {"(": 1, ")": -1}.get(char, 0)
            yield index, char, depth
            if depth < 0:
                return
        index += 1
    if quote or depth:
        yield -1, "", -1


def _top_level_split(text: str) -> list[str] | None:
    """``text`` cut at each ``&&`` outside literals and parentheses; None when unbalanced."""
    parts: list[str] = []
    start = 0
    for index, char, depth in _outside_quotes(text):
        if depth < 0:
            return None
        if depth == 0 and char == "&" and text.startswith("&&", index) and index >= start:
            parts.append(text[start:index])
            start = index + 2
    parts.append(text[start:])
    return parts


def _enclosed(term: str) -> bool:
    """Whether the parenthesis opening ``term`` is the one closing it."""
    if not (term.startswith("(") and term.endswith(")")):
        return False
    for index, _char, depth in _outside_quotes(term):
        if depth <= 0:
            return index == len(term) - 1 and depth == 0
    return False


def subscription_key_of(term: str) -> str | None:
    """The key of ``auth.identity.selected_subscription_key == "<key>"``; None otherwise."""
    match = _SUBSCRIPTION_KEY.match(term.strip())
    return match[2] if match else None


def tier_of(predicate: object) -> str | None:
    """The tier of ``auth.identity.tier == "<tier>"``; None for any other predicate."""
    if not isinstance(predicate, str):
        return None
    match = _TIER.match(predicate.strip())
    return match[2] if match else None


def always_true_on(term: str, charged_suffixes: Sequence[str]) -> bool:
    """Whether ``!request.path.endsWith("<s>")`` holds on every path the sidecar limits.

    A path ends with both a charged suffix ``c`` and ``s`` only if one of them ends with the
    other; when neither does for any ``c``, no limited path ends with ``s``.
    """
    if not term.startswith("!"):
        return False
    inner = term[1:].strip()
    while _enclosed(inner):
        inner = inner[1:-1].strip()
    match = _ENDS_WITH.match(inner)
    if match is None:
        return False
    suffix = match[2]
    return not any(c.endswith(suffix) or suffix.endswith(c) for c in charged_suffixes)


def predicate_tier(
    predicates: Iterable[object], charged_suffixes: Sequence[str] = CHARGED_SUFFIXES
) -> str | None:
    """The one tier a list of ANDed predicates selects, when every other term holds on every
    limited path; None for any other shape."""
    selected = predicate_selects(predicates, charged_suffixes)
    return selected[1] if selected is not None and selected[0] == "tier" else None


def predicate_selects(
    predicates: Iterable[object], charged_suffixes: Sequence[str] = CHARGED_SUFFIXES
) -> tuple[Literal["tier", "subscription"], str] | None:
    """What a list of ANDed predicates selects: one tier, or one selected subscription key,
    when every other term holds on every limited path; None for any other shape."""
    found: set[tuple[Literal["tier", "subscription"], str]] = set()
    for predicate in predicates:
        terms = conjuncts(predicate) if isinstance(predicate, str) else None
        if not terms:
            return None
        for term in terms:
            tier, key = tier_of(term), subscription_key_of(term)
            if tier is not None:
                found.add(("tier", tier))
            elif key is not None:
                found.add(("subscription", key))
            elif not (_SIDECAR_ONLY.match(term) or always_true_on(term, charged_suffixes)):
                return None
    return found.pop() if len(found) == 1 else None


def window_seconds(text: object) -> int | None:
    """``1m``, ``30s``, ``2h``, ``1h30m`` as seconds; None for anything else."""
    if not isinstance(text, str):
        return None
    match = _WINDOW.match(text.strip())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    return total or None


def policy_limits(
    policy: Mapping[str, Any],
    kind: Kind,
    counter_expression: str,
    charged_suffixes: Sequence[str] = CHARGED_SUFFIXES,
) -> tuple[list[PolicyLimit], list[str]]:
    """The understood limits of a policy object, and one reason per limit left out."""
    meta = policy.get("metadata") or {}
    where = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = policy.get("spec") or {}
    understood: list[PolicyLimit] = []
    ignored: list[str] = []
    for section in (spec, spec.get("defaults"), spec.get("overrides")):
        if not isinstance(section, Mapping) or not isinstance(section.get("limits"), Mapping):
            continue
        top = section.get("when") or []
        if not isinstance(top, list):
            ignored.append(f"{where}: top-level when {top!r} is not a list")
            continue
        for name, body in section["limits"].items():
            parsed = _limit(where, str(name), body, kind, counter_expression, top, charged_suffixes)
            if isinstance(parsed, PolicyLimit):
                understood.append(parsed)
            else:
                ignored.append(f"{where} limit {name}: {parsed}")
    return understood, ignored


def _limit(
    where: str,
    name: str,
    body: object,
    kind: Kind,
    counter_expression: str,
    top: list[Any],
    charged_suffixes: Sequence[str],
) -> PolicyLimit | str:
    if not isinstance(body, Mapping):
        return "not a mapping"
    when = body.get("when") or []
    if not isinstance(when, list) or not all(isinstance(w, Mapping) for w in [*top, *when]):
        return f"predicates {when!r} are not a list of predicates"
    predicates = [w.get("predicate") for w in [*top, *when]]
    selected = predicate_selects(predicates, charged_suffixes)
    if selected is None:
        shown = " && ".join(" ".join(str(p).split()) for p in predicates) or "(none)"
        return (
            f'predicates {shown!r} do not select one tier (auth.identity.tier == "<tier>") '
            'or subscription (auth.identity.selected_subscription_key == "<key>")'
        )
    counters = body.get("counters") or []
    expressions = [c.get("expression") for c in counters if isinstance(c, Mapping)]
    if expressions != [counter_expression]:
        return f"counters {expressions!r} are not [{counter_expression}]"
    rates = body.get("rates") or []
    several = selected[0] == "subscription"  # a subscription's model may have several rates
    if not isinstance(rates, list) or not rates or (len(rates) != 1 and not several):
        return f"rates {rates!r} are not one rate"
    read: list[Rate] = []
    for rate in rates:
        if not isinstance(rate, Mapping):
            return f"rate {rate!r} is not {{limit: <n>, window: <duration>}}"
        limit, window = rate.get("limit"), window_seconds(rate.get("window"))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0 or window is None:
            return f"rate {dict(rate)!r} is not {{limit: <n>, window: <duration>}}"
        read.append(Rate(limit, window))
    first = read[0]
    if several:
        return PolicyLimit(
            where, name, kind, "", first.limit, first.window_s, selected[1], tuple(read)
        )
    return PolicyLimit(where, name, kind, selected[1], first.limit, first.window_s)


def merged(base: LimitsConfig, limits: Iterable[PolicyLimit]) -> LimitsConfig:
    """``base`` with each tier's limits replaced by the policies' (the tightest when several)."""
    tiers = dict(base.tiers)
    declared: dict[tuple[str, Kind], PolicyLimit] = {}
    for item in limits:
        if not item.tier:
            continue  # a subscription's limit: read per request (``rates_for``)
        key = (item.tier, item.kind)
        current = declared.get(key)
        if current is None or item.limit / item.window_s < current.limit / current.window_s:
            declared[key] = item
    for (tier, kind), item in sorted(declared.items()):
        limits_of = tiers.get(tier, Limits())
        if kind == "tokens":
            tiers[tier] = replace(limits_of, tokens=item.limit, tokens_window_s=item.window_s)
        else:
            tiers[tier] = replace(limits_of, requests=item.limit, requests_window_s=item.window_s)
    return replace(base, tiers=tiers)


class PolicyLimits:
    """A ``LimitsProvider``: configured limits overlaid with those the watched policies declare.

    One thread per policy kind lists the policies in ``kuadrant.policy_namespace`` and watches
    from there (list again on 410 Gone, back off on errors); the last good view stays in force.
    """

    def __init__(
        self,
        kube: Kube,
        config: KuadrantConfig,
        base: LimitsConfig,
        metrics: Metrics,
        *,
        charged_suffixes: Sequence[str] = CHARGED_SUFFIXES,
        kinds: tuple[PolicyKind, ...] = (TOKEN_POLICIES, REQUEST_POLICIES),
        namespace: str | None = None,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._kube = kube
        self._config = config
        self._base = base
        self._metrics = metrics
        self._charged_suffixes = tuple(charged_suffixes)
        self._kinds = {kind.plural: kind.kind for kind in kinds}
        self._current = base
        self._limits: tuple[PolicyLimit, ...] = ()
        # The subscription era: selected_subscription_key -> the rates its policy limit declares.
        self._subscription_rates: dict[str, tuple[Rate, ...]] = {}
        self._ignored: frozenset[tuple[str, str]] = frozenset()  # (plural, reason) in force now
        self._lock = threading.Lock()
        self._closed = False
        self._watch = ObjectWatch(
            kube,
            [
                Collection(
                    kind.group,
                    kind.version,
                    kind.plural,
                    config.policy_namespace if namespace is None else namespace,
                )
                for kind in kinds
            ],
            self._recompute,
            watch_timeout_s=watch_timeout_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )

    def current(self) -> LimitsConfig:
        return self._current

    @property
    def limits(self) -> tuple[PolicyLimit, ...]:
        return self._limits

    def rates_for(self, key: str) -> tuple[Rate, ...] | None:
        """The rates the watched policies declare for a ``selected_subscription_key``."""
        return self._subscription_rates.get(key)

    def subscription_limit(self, key: str) -> tuple[str, str] | None:
        """The policy (``<namespace>/<name>``) and limit a ``selected_subscription_key`` is
        counted in, as the watched policies declare them; None when none does."""
        for item in self._limits:
            if item.subscription == key:
                return item.policy, item.name
        return None

    def limit_name_for(self, tier: str) -> str:
        """The configured TokenRateLimitPolicy's limit whose predicate selects ``tier``, whatever
        it is called ("" when it declares none)."""
        policy = f"{self._config.policy_namespace}/{self._config.policy_name}"
        for item in self._limits:
            if item.kind == "tokens" and item.policy == policy and item.tier == tier:
                return item.name
        return ""

    def _recompute(self, objects: Snapshot) -> None:
        # Called under the watch's lock with every object: a view of an older snapshot never
        # replaces a newer one. An ignored limit is counted (and logged) when it appears, not
        # again on each recompute.
        understood: list[PolicyLimit] = []
        ignored_now: set[tuple[str, str]] = set()
        for (plural, _namespace, name), obj in objects:
            if name == DEFAULT_DENY_POLICY:
                continue  # the unsubscribed are refused by the sidecar's own default deny
            kind = self._kinds[plural]
            found, ignored = policy_limits(
                obj, kind, self._config.counter_expression, self._charged_suffixes
            )
            understood.extend(found)
            for reason in ignored:
                ignored_now.add((plural, reason))
                if (plural, reason) not in self._ignored:
                    self._metrics.policy_predicates_ignored.inc()
                    log.warning("policy limit ignored: %s", " ".join(reason.split()))
        self._ignored = frozenset(ignored_now)
        limits = tuple(understood)
        if limits != self._limits:
            self._limits = limits
            self._current = merged(self._base, limits)
            rates: dict[str, tuple[Rate, ...]] = {}
            for item in limits:
                if item.subscription:
                    rates.setdefault(item.subscription, item.rates)  # the first, in name order
            self._subscription_rates = rates
            log.info(
                "policy limits loaded: %s",
                ", ".join(
                    f"{i.tier or i.subscription}:{i.kind}="
                    + ",".join(f"{r.limit}/{r.window_s}s" for r in (i.rates or (i.rate,)))
                    for i in limits
                )
                or "none",
            )

    async def close(self) -> None:
        """Stop the watch threads (idempotent), then release the client."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await self._watch.close()
        await self._kube.release()


def limit_names(config: KuadrantConfig, policies: PolicyLimits | None) -> Callable[[str], str]:
    """tier -> the policy limit its tokens are reported into: configured name, else the watched
    policy's limit for that tier, else ``limit_name_template``."""
    explicit = dict(config.limit_names)

    def name_for(tier: str) -> str:
        if tier in explicit:
            return explicit[tier]
        if policies is not None and (found := policies.limit_name_for(tier)):
            return found
        return config.limit_name_template.format(tier=tier)

    return name_for
