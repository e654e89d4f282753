"""The limiter: admit against request and token windows with a reservation, then settle actual usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from extproc.config import LimitsConfig
from extproc.domain import Charge, Limits, Rate
from extproc.export import record as charge_record
from extproc.limits import windows
from extproc.store import keys, ledger
from extproc.store.base import NO_ATTRIBUTION, Adjustment, Attribution, CounterStore, WindowCounter


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    kind: str = ""  # "requests" or "tokens": the limit that refused (or the tightest one)
    limit: int = 0
    remaining: int = -1  # -1: no limit applies
    reset_s: int = 0
    retry_after_s: int = 0
    reserved_tokens: int = 0
    token_windows: tuple[int, ...] = ()  # start of each token window the reservation went into
    admitted_ms: int = 0  # when the store took the reservation (0: it did not, e.g. fail_open)


class LimitsProvider(Protocol):
    """The limits in force now; they may change at run time (e.g. from watched policies)."""

    def current(self) -> LimitsConfig: ...


class FixedLimits:
    """Limits that never change: the configured ones."""

    def __init__(self, config: LimitsConfig) -> None:
        self._config = config

    def current(self) -> LimitsConfig:
        return self._config


@dataclass(frozen=True, slots=True)
class _Plan:
    """The counters of one (user, tier, model, route), built once: keys, limits, windows, kinds."""

    requests: tuple[tuple[str, int, int], ...]  # (key, limit, window_ms)
    tokens: tuple[tuple[str, int, int], ...]


_PLAN_CACHE_SIZE = 50_000


class Limiter:
    """Builds the counters for (user, tier, model) and turns store answers into verdicts."""

    def __init__(
        self,
        store: CounterStore,
        config: LimitsConfig | LimitsProvider,
        clock_ms: Callable[[], int],
        *,
        export: bool = False,
    ) -> None:
        self._store = store
        self._export = export  # hand every settle its charge record (export.stream.enabled)
        self._limits = FixedLimits(config) if isinstance(config, LimitsConfig) else config
        self._clock_ms = clock_ms
        self._sliding = self._limits.current().window == "sliding"
        # Key strings and limits per (user, tier, model, route) and per (user, subscription,
        # model, rates), rebuilt when the limits change.
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._plans_for: LimitsConfig | None = None

    @property
    def _config(self) -> LimitsConfig:
        return self._limits.current()

    def reservation_for(self, tier: str, requested: int | None, prompt_estimate: int = 0) -> int:
        """Tokens to hold at admission: the prompt estimate plus the completion bound.

        The completion bound is the request's own (``max_tokens`` and kin), else the tier's
        default. Holding the whole request keeps a user within one reservation of the limit
        however many requests run at once, as long as no response uses more than it reserved.
        """
        if requested is not None and requested > 0:
            bound = requested
        else:
            bound = self._config.reservation_tokens.get(
                tier, self._config.default_reservation_tokens
            )
        return max(0, prompt_estimate) + bound

    def _limit_sets(self, tier: str, model: str) -> list[tuple[Limits, str]]:
        sets: list[tuple[Limits, str]] = []
        base = self._config.tiers.get(tier)
        if base is not None:
            sets.append((base, ""))
        override = self._config.models.get(tier, {}).get(model) if model else None
        if override is not None:
            sets.append((override, model))
        return sets

    def token_counters(
        self, userid: str, tier: str, model: str, route: str = ""
    ) -> list[tuple[str, int]]:
        """(key, window_ms) of every token counter this request is charged to, in admit order."""
        return [(key, window) for key, _, window in self._plan(userid, tier, model, route).tokens]

    @staticmethod
    def subscription_counters(
        userid: str, subscription: str, model: str, windows_s: tuple[int, ...]
    ) -> list[tuple[str, int]]:
        """(key, window_ms) of the token counters of a subscription's rates for one model."""
        return [
            (
                keys.subscription_tokens_key(userid, subscription, model, index, window),
                window * 1000,
            )
            for index, window in enumerate(windows_s)
        ]

    def _rates_plan(
        self, userid: str, subscription: str, model: str, rates: tuple[Rate, ...]
    ) -> _Plan:
        """Subscription era: one token counter per rate, each with its own reservation."""
        cache_key = (userid, subscription, model, rates)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            counters = self.subscription_counters(
                userid, subscription, model, tuple(r.window_s for r in rates)
            )
            plan = _Plan(
                requests=(),
                tokens=tuple(
                    (key, rate.limit, window_ms)
                    for (key, window_ms), rate in zip(counters, rates, strict=True)
                ),
            )
            self._plans[cache_key] = plan
        return plan

    def _plan(self, userid: str, tier: str, model: str, route: str) -> _Plan:
        config = self._config
        if config is not self._plans_for or len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
            self._plans_for = config
        # limits.scope user: one budget across every route; route: one per HTTPRoute, as Kuadrant.
        route = route if config.scope == "route" else ""
        plan = self._plans.get((userid, tier, model, route))
        if plan is None:
            sets = self._limit_sets(tier, model)
            plan = _Plan(
                requests=tuple(
                    (
                        keys.requests_key(userid, tier, scope, route=route),
                        lim.requests,
                        lim.requests_window_s * 1000,
                    )
                    for lim, scope in sets
                    if lim.requests
                ),
                tokens=tuple(
                    (
                        keys.tokens_key(userid, tier, scope, route=route),
                        lim.tokens,
                        lim.tokens_window_s * 1000,
                    )
                    for lim, scope in sets
                    if lim.tokens
                ),
            )
            self._plans[(userid, tier, model, route)] = plan
        return plan

    def now_ms(self) -> int:
        """The limiter's clock: admission times travel with the request to its settle."""
        return self._clock_ms()

    async def admit(
        self,
        userid: str,
        tier: str,
        model: str,
        reserve: int,
        route: str = "",
        *,
        rates: tuple[Rate, ...] | None = None,
        attribution: Attribution = NO_ATTRIBUTION,
        request_id: str = "",
        now_ms: int | None = None,
    ) -> Verdict:
        """Check and take the reservation; the ledger holds it as unsettled until the settle.

        With ``rates`` (the subscription era), ``tier`` is the subscription and the counters are
        its rates for ``model``, all admitted in the same atomic step.
        """
        if rates is None:
            plan = self._plan(userid, tier, model, route)
        else:
            plan = self._rates_plan(userid, tier, model, rates)
        sliding = self._sliding
        counters = [WindowCounter(k, lim, w, 1, sliding) for k, lim, w in plan.requests]
        counters += [WindowCounter(k, lim, w, reserve, sliding) for k, lim, w in plan.tokens]
        kinds = ["requests"] * len(plan.requests) + ["tokens"] * len(plan.tokens)
        now = self._clock_ms() if now_ms is None else now_ms
        hold = ledger.hold_for(userid, model, reserve, now, attribution)
        result = await self._store.admit(counters, now, hold, request_id=request_id)
        if not counters:
            return Verdict(allowed=True, reserved_tokens=reserve, admitted_ms=now)
        if not result.allowed:
            index = result.denied_index
            state, counter = result.states[index], counters[index]
            return Verdict(
                allowed=False,
                kind=kinds[index],
                limit=counter.limit,
                remaining=0,
                reset_s=windows.retry_after_s(state.reset_ms),
                retry_after_s=windows.retry_after_s(state.reset_ms),
            )
        # Report the tightest limit: the one with the least room left, as RateLimit-* headers do.
        pairs = list(zip(counters, result.states, kinds, strict=True))
        counter, state, kind = min(pairs, key=lambda p: p[0].limit - p[1].value)
        token_windows = tuple(s.window_start_ms for c, s, k in pairs if k == "tokens")
        return Verdict(
            allowed=True,
            kind=kind,
            limit=counter.limit,
            remaining=max(0, counter.limit - state.value),
            reset_s=windows.retry_after_s(state.reset_ms),
            reserved_tokens=reserve,
            token_windows=token_windows,
            admitted_ms=now,
        )

    async def settle(self, charge: Charge) -> bool:
        """Swap the reservation for the actual tokens, record the ledger entry, release the hold.

        False when the store had applied this charge's request id already.
        """
        now = self._clock_ms()
        token_windows = charge.token_windows
        if charge.subscription:
            counters = self.subscription_counters(
                charge.userid, charge.subscription, charge.model, charge.rate_windows
            )
        else:
            counters = self.token_counters(charge.userid, charge.tier, charge.model, charge.route)
        adjustments = []
        for index, (key, window_ms) in enumerate(counters):
            admitted = index < len(token_windows)
            adjustments.append(
                Adjustment(
                    key=key,
                    window_ms=window_ms,
                    window_start_ms=token_windows[index] if admitted else -1,
                    reserved=charge.reserved_tokens if admitted else 0,
                    actual=charge.usage.total(),
                    sliding=self._sliding,
                )
            )
        release = None
        if charge.admitted_ms:
            release = ledger.hold_for(
                charge.userid,
                charge.model,
                charge.reserved_tokens,
                charge.admitted_ms,
                ledger.attribution_of(charge),
            )
        return await self._store.settle(
            adjustments,
            ledger.entry_for(charge, now),
            now,
            request_id=charge.request_id,
            release=release,
            record=charge_record.encode_charge(charge, now) if self._export else "",
        )
