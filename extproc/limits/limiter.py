"""The limiter: admit against request and token windows with a reservation, then settle actual usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from extproc.accounting.pricing import NO_PRICES, PriceBook
from extproc.config import LimitsConfig
from extproc.domain import Charge, Limits, Rate
from extproc.export import record as charge_record
from extproc.limits import budget_counters, windows
from extproc.limits.budget_counters import BudgetCounter, BudgetCounters, Caller
from extproc.store import keys, ledger
from extproc.store.base import (
    NO_ATTRIBUTION,
    Adjustment,
    AdmitResult,
    Attribution,
    CounterStore,
    WindowCounter,
)


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
    budget: str = ""  # the budget that refused (kind "budget")
    budgets_held: bool = False  # the reservation went into the request's budgets too
    budget_groups: tuple[str, ...] = ()


class BudgetEvents(Protocol):
    """Where soft-limit crossings and shadow budgets' would-refusals go (never blocking)."""

    def would_refuse(self, counter: BudgetCounter, value: int) -> None: ...

    def reached(
        self, counter: BudgetCounter, threshold: int, period_key: str, value: int, end_ms: int
    ) -> None: ...


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
        prices: PriceBook = NO_PRICES,
        events: BudgetEvents | None = None,
        export: bool = False,
    ) -> None:
        self._store = store
        self._budgets = BudgetCounters(prices)
        self._events = events
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
        groups: tuple[str, ...] = (),
        billing_rate: int | None = None,
    ) -> Verdict:
        """Check and take the reservation; the ledger holds it as unsettled until the settle.

        With ``rates`` (the subscription era), ``tier`` is the subscription and the counters are
        its rates for ``model``, all admitted in the same atomic step. ``groups`` are the
        caller's, for group budgets; ``billing_rate`` the subscription's billingRate.perToken
        (micro-units per million tokens), for cost budgets.
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
        budgets = self._config.budgets
        spent: tuple[BudgetCounter, ...] = ()
        caller = None
        if budgets:  # nothing of this runs (or costs) without budgets
            caller = Caller(
                userid,
                "" if rates is not None else tier,
                tier if rates is not None else "",
                model,
                self.budget_groups(groups),
                attribution.organization_id,
                billing_rate,
            )
            spent, budget_counters = self._budget_counters(caller, reserve, now)
            counters += budget_counters
            kinds += ["budget"] * len(budget_counters)
        hold = ledger.hold_for(userid, model, reserve, now, attribution)
        result = await self._store.admit(counters, now, hold, request_id=request_id)
        if not counters:
            return Verdict(allowed=True, reserved_tokens=reserve, admitted_ms=now)
        first_budget = len(counters) - len(spent)
        if spent:
            self._report(spent, counters[first_budget:], result, first_budget, now)
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
                budget=spent[index - first_budget].budget.name if index >= first_budget else "",
            )
        # Report the tightest limit: the one with the least room left, as RateLimit-* headers
        # do; across units (tokens, requests, cost) the least room left as a share of its limit.
        pairs = list(zip(counters, result.states, kinds, strict=True))
        token_windows = tuple(s.window_start_ms for c, s, k in pairs if k == "tokens")
        groups = caller.groups if caller is not None else ()
        if spent:  # a shadow budget is never the one shown
            pairs = [p for p in pairs if p[0].enforce and p[0].limit > 0]
            if not pairs:
                return Verdict(
                    allowed=True,
                    reserved_tokens=reserve,
                    token_windows=token_windows,
                    admitted_ms=now,
                    budgets_held=True,
                    budget_groups=groups,
                )
            counter, state, kind = min(pairs, key=lambda p: (p[0].limit - p[1].value) / p[0].limit)
        else:
            counter, state, kind = min(pairs, key=lambda p: p[0].limit - p[1].value)
        # Built once, with the tightest limit (``dataclasses.replace`` would cost as much again).
        return Verdict(
            allowed=True,
            kind=kind,
            limit=counter.limit,
            remaining=max(0, counter.limit - state.value),
            reset_s=windows.retry_after_s(state.reset_ms),
            reserved_tokens=reserve,
            token_windows=token_windows,
            admitted_ms=now,
            budgets_held=bool(spent),
            budget_groups=groups,
        )

    def budget_groups(self, groups: tuple[str, ...]) -> tuple[str, ...]:
        """The caller's groups that some group budget names (the settle's way to its counters)."""
        budgets = self._config.budgets
        return self._budgets.budget_groups(budgets, groups) if budgets else ()

    def _budget_counters(
        self, caller: Caller, reserve: int, now: int
    ) -> tuple[tuple[BudgetCounter, ...], list[WindowCounter]]:
        """The request's budget counters and their store counters, in the same order."""
        spent: list[BudgetCounter] = []
        counters: list[WindowCounter] = []
        for counter in self._budgets.of(self._config.budgets, caller):
            amount = self._budgets.amount(counter.budget, reserve, caller)
            if amount is not None:
                spent.append(counter)
                counters.append(budget_counters.window_counter(counter, amount, now))
        return tuple(spent), counters

    def _report(
        self,
        spent: tuple[BudgetCounter, ...],
        counters: list[WindowCounter],
        result: AdmitResult,
        offset: int,
        now: int,
    ) -> None:
        """Soft thresholds reached and shadow budgets that would refuse, to ``events``."""
        events = self._events
        if events is None:
            return
        for index, (budget_counter, counter) in enumerate(zip(spent, counters, strict=True)):
            if offset + index >= len(result.states):
                break
            state = result.states[offset + index]
            denied = not result.allowed and result.denied_index == offset + index
            before = state.value if denied else state.value - counter.hits
            if not counter.enforce and before >= counter.limit:
                events.would_refuse(budget_counter, before)
            if not result.allowed and not denied:
                continue  # refused elsewhere: nothing was added here
            for threshold in budget_counter.budget.soft:
                if state.value * 100 >= threshold * counter.limit:
                    end = budget_counters.period_end_ms(counter, state, now)
                    events.reached(budget_counter, threshold, counter.key, state.value, end)

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
        if self._config.budgets:
            adjustments += self._budget_adjustments(charge, now)
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

    def _budget_adjustments(self, charge: Charge, now: int) -> list[Adjustment]:
        """The settle of each budget the charge's request spends (found again from the charge)."""
        caller = Caller(
            charge.userid,
            charge.tier,
            charge.subscription,
            charge.model,
            charge.budget_groups,
            charge.organization_id,
            charge.billing_rate,
        )
        out = []
        for counter in self._budgets.of(self._config.budgets, caller):
            budget = counter.budget
            reserved = self._budgets.amount(budget, charge.reserved_tokens, caller)
            if reserved is None:
                continue  # a cost budget, a model without prices: not counted
            actual = self._actual(budget.unit, charge, caller)
            held = reserved if charge.budgets_held else 0
            out.append(budget_counters.adjustment(counter, held, actual, charge.admitted_ms, now))
        return out

    def _actual(self, unit: str, charge: Charge, caller: Caller) -> int:
        if unit == "tokens":
            return charge.usage.total()
        if unit == "requests":
            return 1
        return self._budgets.actual_cost(charge, caller)
