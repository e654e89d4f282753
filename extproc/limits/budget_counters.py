"""Budgets as store counters: whose counter a request spends, what it reserves, how it settles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.accounting.pricing import (
    BILLED_KINDS,
    MILLION,
    NO_PRICES,
    PriceBook,
    Prices,
    cost_micros,
)
from extproc.domain import Charge
from extproc.limits.budgets import Budget
from extproc.limits.periods import Period
from extproc.store import keys
from extproc.store.base import Adjustment, CounterState, WindowCounter

_CACHE_SIZE = 50_000


def cost_bound_micros(tokens: int, prices: Prices) -> int:
    """What ``tokens`` can cost at most: all of them at the model's dearest kind, rounded up."""
    dearest = max(prices.of(kind) for kind in BILLED_KINDS)
    return -(-tokens * dearest // MILLION)


@dataclass(frozen=True, slots=True)
class BudgetCounter:
    """One budget of one subject: the counter a request is charged to (period not yet chosen)."""

    budget: Budget
    subject: str
    key: str  # keys.budget_key; a calendar budget's period is appended per request


@dataclass(frozen=True, slots=True)
class Caller:
    """What decides which budgets a request spends, known at admission and again at settle."""

    userid: str
    tier: str  # "" in the subscription era
    subscription: str  # "" in the tier era
    model: str
    groups: tuple[str, ...] = ()  # the caller's groups that some group budget names
    organization: str = ""
    billing_rate: int | None = None  # subscriptions: billingRate.perToken, micros per million

    @property
    def plan(self) -> str:
        return self.subscription or self.tier


def _subjects(budget: Budget, caller: Caller) -> tuple[str, ...]:
    scope = budget.scope
    if scope == "user":
        return (caller.userid,)
    if scope == "group":
        return tuple(sorted(g for g in set(caller.groups) if g in budget.groups))
    if scope == "subscription":
        return (caller.plan,) if caller.plan else ()
    if scope == "organization":
        return (caller.organization,) if caller.organization else ()
    return (caller.model,) if caller.model else ()


class BudgetCounters:
    """The budgets of a caller, cached per caller for one set of budgets."""

    def __init__(self, prices: PriceBook = NO_PRICES) -> None:
        self._book = prices
        self._cache: dict[Caller, tuple[BudgetCounter, ...]] = {}
        self._cached_for: tuple[Budget, ...] = ()

    def budget_groups(self, budgets: Sequence[Budget], groups: Sequence[str]) -> tuple[str, ...]:
        """The caller's groups that some group budget names: all the settle needs to know."""
        named = {g for b in budgets if b.scope == "group" for g in b.groups}
        return tuple(sorted(g for g in set(groups) if g in named))

    def of(self, budgets: tuple[Budget, ...], caller: Caller) -> tuple[BudgetCounter, ...]:
        if budgets is not self._cached_for or len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
            self._cached_for = budgets
        found = self._cache.get(caller)
        if found is not None:
            return found
        out = []
        for budget in budgets:
            if not budget.match.matches(caller.tier, caller.subscription, caller.model):
                continue
            for subject in _subjects(budget, caller):
                key = keys.budget_key(budget.name, budget.scope, subject)
                out.append(BudgetCounter(budget, subject, key))
        found = self._cache[caller] = tuple(out)
        return found

    def amount(self, budget: Budget, tokens: int, caller: Caller) -> int | None:
        """What a request of ``tokens`` counts in ``budget``; None: the budget does not apply
        (a cost budget and a model without prices)."""
        if budget.unit == "tokens":
            return tokens
        if budget.unit == "requests":
            return 1
        prices = self._prices(caller)
        return None if prices is None else cost_bound_micros(tokens, prices)

    def actual_cost(self, charge: Charge, caller: Caller) -> int:
        """The charge's cost in micro-units: as the Charger priced it, else from the prices."""
        if charge.priced:
            return charge.cost_micros
        prices = self._prices(caller)
        return 0 if prices is None else cost_micros(charge.usage, prices)

    def _prices(self, caller: Caller) -> Prices | None:
        """The prices that apply, as the Charger finds them (``accounting.pricing.priced``)."""
        rate = None if caller.billing_rate is None else Prices.flat(caller.billing_rate)
        return self._book.prices_for(caller.model or "unknown", caller.plan, rate)


def period_of(counter: BudgetCounter, at_ms: int) -> Period:
    """The calendar period of a calendar budget at ``at_ms``."""
    clock = counter.budget.clock
    assert clock is not None  # a calendar budget always has its clock
    return clock.at(at_ms)


def window_counter(counter: BudgetCounter, hits: int, now_ms: int) -> WindowCounter:
    """The store counter of one budget at admission: its period's (calendar) or a sliding one."""
    budget = counter.budget
    if budget.calendar is None:
        return WindowCounter(
            counter.key, budget.limit, budget.rolling_s * 1000, hits, True, enforce=budget.enforce
        )
    period = period_of(counter, now_ms)
    return WindowCounter(
        keys.period_key(counter.key, period.label),
        budget.limit,
        0,
        hits,
        period_start_ms=period.start_ms,
        period_end_ms=period.end_ms,
        enforce=budget.enforce,
    )


def adjustment(
    counter: BudgetCounter, reserved: int, actual: int, admitted_ms: int, now_ms: int
) -> Adjustment:
    """The settle of one budget: the reservation made at ``admitted_ms`` swapped for ``actual``."""
    budget = counter.budget
    admitted_ms = admitted_ms or now_ms
    if budget.calendar is None:
        return Adjustment(
            counter.key, budget.rolling_s * 1000, admitted_ms, reserved, actual, sliding=True
        )
    held, current = period_of(counter, admitted_ms), period_of(counter, now_ms)
    return Adjustment(
        keys.period_key(counter.key, held.label),
        0,
        held.start_ms,
        reserved,
        actual,
        period_end_ms=held.end_ms,
        current_key=keys.period_key(counter.key, current.label),
        current_end_ms=current.end_ms,
    )


def period_end_ms(counter: WindowCounter, state: CounterState, now_ms: int) -> int:
    """When the period (or the rolling window's bucket) this state belongs to ends."""
    return counter.period_end_ms or now_ms + state.reset_ms
