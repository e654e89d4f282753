"""Budget rules (``limits.budgets``): what a budget counts, whose it is, over which period.

Parsed once from the config; every bad value is a ``ConfigError`` naming its key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from extproc.errors import ConfigError
from extproc.limits.periods import Calendar, PeriodClock

Scope = Literal["user", "group", "subscription", "organization", "model"]
Unit = Literal["tokens", "cost", "requests"]
SCOPES: tuple[Scope, ...] = ("user", "group", "subscription", "organization", "model")
UNITS: tuple[Unit, ...] = ("tokens", "cost", "requests")
CALENDARS: tuple[Calendar, ...] = ("day", "week", "month")
# Counts stay exact in Lua numbers and Prometheus samples below 2**53.
MAX_LIMIT = 2**52
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION = re.compile(r"^(\d+)(s|m|h|d)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True, slots=True)
class Match:
    """Which requests a budget counts; an empty set matches every value."""

    tiers: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    subscriptions: frozenset[str] = frozenset()

    def matches(self, tier: str, subscription: str, model: str) -> bool:
        return (
            (not self.tiers or tier in self.tiers)
            and (not self.models or model in self.models)
            and (not self.subscriptions or subscription in self.subscriptions)
        )


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    scope: Scope
    unit: Unit
    limit: int  # tokens, requests, or micro-units of currency
    calendar: Calendar | None = None  # None: a rolling window of ``rolling_s``
    rolling_s: int = 0
    time_zone: str = "UTC"
    groups: frozenset[str] = frozenset()  # scope group: the groups that each have the budget
    match: Match = Match()
    soft: tuple[int, ...] = ()  # percent thresholds, ascending
    enforce: bool = True  # False: shadow mode, counted and reported, never refusing
    clock: PeriodClock | None = field(default=None, compare=False, repr=False)

    @property
    def period_name(self) -> str:
        return self.calendar or f"{self.rolling_s}s"


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """Where soft-limit events go (``limits.alerts``): a webhook, retried off the request path."""

    webhook_url: str = ""  # "": events only as metrics
    timeout_s: float = 2.0
    attempts: int = 5
    queue_size: int = 1000


def parse_budgets(value: object) -> tuple[Budget, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("limits.budgets", "a list of budgets", value)
    budgets = tuple(_budget(f"limits.budgets[{i}]", item) for i, item in enumerate(value))
    seen: set[str] = set()
    for i, budget in enumerate(budgets):
        if budget.name in seen:
            raise ConfigError(
                f"limits.budgets[{i}].name", "a name no other budget has", budget.name
            )
        seen.add(budget.name)
    return budgets


def check_era(budgets: tuple[Budget, ...], era: str) -> None:
    """What a budget can count depends on the era: the tier era has no organizations."""
    for i, budget in enumerate(budgets):
        if era == "tiers" and budget.scope == "organization":
            raise ConfigError(
                f"limits.budgets[{i}].scope",
                "user, group, subscription or model (organizations need maas.era subscriptions)",
                budget.scope,
            )
        if era == "tiers" and budget.match.subscriptions:
            raise ConfigError(
                f"limits.budgets[{i}].match.subscriptions", "maas.era subscriptions", "tiers"
            )
        if era == "subscriptions" and budget.match.tiers:
            raise ConfigError(f"limits.budgets[{i}].match.tiers", "maas.era tiers", era)


def _budget(key: str, value: object) -> Budget:
    if not isinstance(value, Mapping):
        raise ConfigError(key, "a mapping", value)
    raw = cast(Mapping[str, Any], value)
    allowed = {"name", "scope", "groups", "unit", "limit", "period", "time_zone", "match"}
    allowed |= {"soft", "mode"}
    for setting in raw:
        if setting not in allowed:
            raise ConfigError(f"{key}.{setting}", "one of " + ", ".join(sorted(allowed)))
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{key}.name", "1-64 letters, digits, '_', '.', '-'", name)
    scope = _choice(f"{key}.scope", raw.get("scope", "user"), SCOPES)
    unit = _choice(f"{key}.unit", raw.get("unit", "tokens"), UNITS)
    limit = raw.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"{key}.limit", f"a whole number from 1 to {MAX_LIMIT}", limit)
    groups = _strings(f"{key}.groups", raw.get("groups", []))
    if scope == "group" and not groups:
        raise ConfigError(f"{key}.groups", "the groups that share the budget (scope group)")
    if scope != "group" and groups:
        raise ConfigError(f"{key}.groups", "nothing unless scope is group", sorted(groups))
    calendar, rolling_s = _period(f"{key}.period", raw.get("period"))
    zone_name = raw.get("time_zone", "UTC")
    try:
        zone = ZoneInfo(zone_name) if isinstance(zone_name, str) and zone_name else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if zone is None:
        raise ConfigError(f"{key}.time_zone", "an IANA time zone like Europe/Paris", zone_name)
    mode = _choice(f"{key}.mode", raw.get("mode", "enforce"), ("enforce", "shadow"))
    return Budget(
        name=name,
        scope=scope,
        unit=unit,
        limit=limit,
        calendar=calendar,
        rolling_s=rolling_s,
        time_zone=zone_name,
        groups=groups,
        match=_match(f"{key}.match", raw.get("match", {})),
        soft=_soft(f"{key}.soft", raw.get("soft", [])),
        enforce=mode == "enforce",
        clock=PeriodClock(calendar, zone) if calendar else None,
    )


def _choice(key: str, value: object, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ConfigError(key, "one of " + ", ".join(choices), value)
    return value


def _strings(key: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "a list of non-empty strings", value)
    return frozenset(value)


def _period(key: str, value: object) -> tuple[Calendar | None, int]:
    if value == "day" or value == "week" or value == "month":
        return value, 0
    if isinstance(value, Mapping) and set(value) == {"rolling"}:
        text = value["rolling"]
        match = _DURATION.match(text.strip()) if isinstance(text, str) else None
        if isinstance(text, int) and not isinstance(text, bool) and text >= 1:
            return None, text
        if match and int(match.group(1)) >= 1:
            return None, int(match.group(1)) * _UNIT_S[match.group(2)]
        raise ConfigError(f"{key}.rolling", "a whole duration >= 1s like 60s, 2h or 7d", text)
    raise ConfigError(key, "day, week, month or {rolling: <duration>}", value)


def _match(key: str, value: object) -> Match:
    if not isinstance(value, Mapping):
        raise ConfigError(key, "a mapping of tiers, models, subscriptions", value)
    for name in value:
        if name not in ("tiers", "models", "subscriptions"):
            raise ConfigError(f"{key}.{name}", "one of models, subscriptions, tiers")
    return Match(
        tiers=_strings(f"{key}.tiers", value.get("tiers", [])),
        models=_strings(f"{key}.models", value.get("models", [])),
        subscriptions=_strings(f"{key}.subscriptions", value.get("subscriptions", [])),
    )


def _soft(key: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in value
    ):
        raise ConfigError(key, "a list of percentages from 1 to 1000, like [80, 100]", value)
    return tuple(sorted(set(value)))


def parse_alerts(value: object) -> AlertsConfig:
    if value is None:
        return AlertsConfig()
    if not isinstance(value, Mapping):
        raise ConfigError("limits.alerts", "a mapping", value)
    for name in value:
        if name not in ("webhook_url", "timeout", "attempts", "queue_size"):
            raise ConfigError(
                f"limits.alerts.{name}", "one of attempts, queue_size, timeout, webhook_url"
            )
    url = value.get("webhook_url", "")
    if not isinstance(url, str) or (url and not re.match(r"^https?://[^\s/]+", url)):
        raise ConfigError("limits.alerts.webhook_url", "an http:// or https:// URL", url)
    timeout = value.get("timeout", 2)
    match = (
        re.match(r"^(\d+(?:\.\d+)?)(ms|s)?$", str(timeout))
        if not isinstance(timeout, bool)
        else None
    )
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError("limits.alerts.timeout", "a duration > 0 like 2s or 500ms", timeout)
    timeout_s = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    attempts = value.get("attempts", 5)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise ConfigError("limits.alerts.attempts", "a whole number from 1 to 100", attempts)
    size = value.get("queue_size", 1000)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1_000_000:
        raise ConfigError("limits.alerts.queue_size", "a whole number from 1 to 1000000", size)
    return AlertsConfig(url, timeout_s, attempts, size)
