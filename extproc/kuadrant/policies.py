"""Per-tier limits declared by Kuadrant policies in the cluster, watched so admission enforces them.

A TokenRateLimitPolicy (``kuadrant.io/v1alpha1``) limit becomes a tier's token limit and a
RateLimitPolicy (``kuadrant.io/v1``) limit its request limit, when the limit has the shape the MaaS
seed policies use: ``when: [{predicate: 'auth.identity.tier == "<tier>"'}]``, one rate
``{limit, window}`` and the per-user counter. Anything else is logged, counted in
``maas_policy_predicates_ignored_total`` and left out: never guessed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from kubernetes import client, watch

from extproc.authz.kube import CONNECT_TIMEOUT_S, Kube, run_list_watch, stop_watches
from extproc.config import KuadrantConfig, LimitsConfig
from extproc.domain import Limits
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.kuadrant")

Kind = Literal["tokens", "requests"]
_TIER = re.compile(r"""^\s*auth\.identity\.tier\s*==\s*(["'])([^"'\\]+)\1\s*$""")
_WINDOW = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


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
    """One understood policy limit: ``limit`` per ``window_s`` for each user of ``tier``."""

    policy: str  # <namespace>/<name>
    name: str
    kind: Kind
    tier: str
    limit: int
    window_s: int


def tier_of(predicate: object) -> str | None:
    """The tier of ``auth.identity.tier == "<tier>"``; None for any other predicate."""
    if not isinstance(predicate, str):
        return None
    match = _TIER.match(predicate)
    return match[2] if match else None


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
    policy: Mapping[str, Any], kind: Kind, counter_expression: str
) -> tuple[list[PolicyLimit], list[str]]:
    """The understood limits of a policy object, and one reason per limit left out."""
    meta = policy.get("metadata") or {}
    where = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = policy.get("spec") or {}
    if spec.get("when"):
        return [], [f"{where}: top-level when is not understood"]
    sections = [
        spec.get("limits"),
        *((spec.get(k) or {}).get("limits") for k in ("defaults", "overrides")),
    ]
    understood: list[PolicyLimit] = []
    ignored: list[str] = []
    for limits in sections:
        if not isinstance(limits, Mapping):
            continue
        for name, body in limits.items():
            parsed = _limit(where, str(name), body, kind, counter_expression)
            if isinstance(parsed, PolicyLimit):
                understood.append(parsed)
            else:
                ignored.append(f"{where} limit {name}: {parsed}")
    return understood, ignored


def _limit(
    where: str, name: str, body: object, kind: Kind, counter_expression: str
) -> PolicyLimit | str:
    if not isinstance(body, Mapping):
        return "not a mapping"
    when = body.get("when") or []
    if not isinstance(when, list) or len(when) != 1 or not isinstance(when[0], Mapping):
        return f"predicates {when!r} are not one tier predicate"
    tier = tier_of(when[0].get("predicate"))
    if tier is None:
        return f'predicate {when[0].get("predicate")!r} is not auth.identity.tier == "<tier>"'
    counters = body.get("counters") or []
    expressions = [c.get("expression") for c in counters if isinstance(c, Mapping)]
    if expressions != [counter_expression]:
        return f"counters {expressions!r} are not [{counter_expression}]"
    rates = body.get("rates") or []
    if not isinstance(rates, list) or len(rates) != 1 or not isinstance(rates[0], Mapping):
        return f"rates {rates!r} are not one rate"
    limit, window = rates[0].get("limit"), window_seconds(rates[0].get("window"))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0 or window is None:
        return f"rate {dict(rates[0])!r} is not {{limit: <n>, window: <duration>}}"
    return PolicyLimit(where, name, kind, tier, limit, window)


def merged(base: LimitsConfig, limits: Iterable[PolicyLimit]) -> LimitsConfig:
    """``base`` with each tier's limits replaced by the policies' (the tightest when several)."""
    tiers = dict(base.tiers)
    declared: dict[tuple[str, Kind], PolicyLimit] = {}
    for item in limits:
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
        kinds: tuple[PolicyKind, ...] = (TOKEN_POLICIES, REQUEST_POLICIES),
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._kube = kube
        self._custom = client.CustomObjectsApi(kube.api_client)
        self._config = config
        self._base = base
        self._metrics = metrics
        self._watch_timeout_s = watch_timeout_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}  # (plural, name) -> object
        self._current = base
        self._limits: tuple[PolicyLimit, ...] = ()
        self._ignored: frozenset[tuple[str, str]] = frozenset()  # (plural, reason) in force now
        self._stop = threading.Event()
        self._closed = False
        self._watches: list[watch.Watch] = []
        self._threads: list[threading.Thread] = []
        for kind in kinds:
            stream = watch.Watch()
            thread = threading.Thread(
                target=self._run, args=(kind, stream), name=f"watch-{kind.plural}", daemon=True
            )
            self._watches.append(stream)
            self._threads.append(thread)
            thread.start()

    def current(self) -> LimitsConfig:
        return self._current

    @property
    def limits(self) -> tuple[PolicyLimit, ...]:
        return self._limits

    def limit_name_for(self, tier: str) -> str:
        """The configured TokenRateLimitPolicy's limit for ``tier`` ("" when it declares none)."""
        policy = f"{self._config.policy_namespace}/{self._config.policy_name}"
        for item in self._limits:
            if item.kind == "tokens" and item.policy == policy and item.tier == tier:
                return item.name
        return ""

    # ------------------------------------------------------------------ the watch threads

    def _run(self, kind: PolicyKind, stream: watch.Watch) -> None:
        run_list_watch(
            self._kube,
            self._stop,
            kind.plural,
            lambda: self._list(kind),
            lambda version: self._follow(kind, stream, version),
            backoff_s=self._backoff_s,
            max_backoff_s=self._max_backoff_s,
        )

    def _list(self, kind: PolicyKind) -> str | None:
        listed = self._custom.list_namespaced_custom_object(
            kind.group,
            kind.version,
            self._config.policy_namespace,
            kind.plural,
            _request_timeout=self._kube.timeout,
        )
        self._kube.note_success()
        items = {
            (kind.plural, str((item.get("metadata") or {}).get("name", ""))): item
            for item in listed.get("items") or []
        }
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind.plural]:
                del self._objects[key]
            self._objects.update(items)
        self._recompute()
        return str((listed.get("metadata") or {}).get("resourceVersion") or "") or None

    def _follow(self, kind: PolicyKind, stream: watch.Watch, version: str | None) -> str | None:
        events = stream.stream(
            self._custom.list_namespaced_custom_object,
            kind.group,
            kind.version,
            self._config.policy_namespace,
            kind.plural,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=(CONNECT_TIMEOUT_S, self._watch_timeout_s + 30),
        )
        try:
            for event in events:
                if self._stop.is_set():
                    break
                raw: dict[str, Any] = event.get("raw_object") or event.get("object") or {}
                meta = raw.get("metadata") or {}
                key = (kind.plural, str(meta.get("name", "")))
                changed = True
                with self._lock:
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._objects[key] = raw
                    elif event.get("type") == "DELETED":
                        self._objects.pop(key, None)
                    else:
                        changed = False
                if changed:
                    self._recompute()
                version = str(meta.get("resourceVersion") or "") or version
        finally:
            events.close()
        return version

    def _recompute(self) -> None:
        # Under the lock the objects change under: both watch threads recompute, and a view of an
        # older snapshot must not replace a newer one. An ignored limit is counted (and logged)
        # when it appears, not again on each recompute.
        with self._lock:
            self._recompute_locked()

    def _recompute_locked(self) -> None:
        objects = sorted(self._objects.items())
        understood: list[PolicyLimit] = []
        ignored_now: set[tuple[str, str]] = set()
        for (plural, _name), obj in objects:
            kind: Kind = "tokens" if plural == TOKEN_POLICIES.plural else "requests"
            found, ignored = policy_limits(obj, kind, self._config.counter_expression)
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
            log.info(
                "policy limits loaded: %s",
                ", ".join(f"{i.tier}:{i.kind}={i.limit}/{i.window_s}s" for i in limits) or "none",
            )

    async def close(self) -> None:
        """Stop the watch threads (idempotent), then release the client."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await asyncio.to_thread(stop_watches, self._threads, self._watches, "policy watch threads")
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
