"""The CounterStore protocol and the records it takes and returns; every store implements it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WindowCounter:
    """One counter checked and bumped at admission.

    Fixed windows start at the first hit and last ``window_ms`` (Kuadrant's semantics). The counter
    denies when its current value has reached ``limit`` (``value + 1 > limit``, as Limitador checks);
    otherwise ``hits`` is added. ``hits`` is 1 for request counters and the reservation for token
    counters. ``sliding`` counters weigh the previous window by the share of it still in view.

    A calendar period (``period_end_ms`` > 0) is a plain counter whose key names the period
    (``keys.period_key``): it counts from ``period_start_ms`` to ``period_end_ms`` and expires a
    little after its end. A counter that does not ``enforce`` (a budget in shadow mode) is
    checked and bumped but never denies; its state tells whether it would have.
    """

    key: str
    limit: int
    window_ms: int
    hits: int
    sliding: bool = False
    period_start_ms: int = 0
    period_end_ms: int = 0
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class CounterState:
    value: int  # after this admission's hits when admitted, before them when denied
    window_start_ms: int
    reset_ms: int  # milliseconds until the window ends (sliding: until one hit frees up)


@dataclass(frozen=True, slots=True)
class AdmitResult:
    allowed: bool
    states: tuple[CounterState, ...]  # one per counter, in order
    denied_index: int = -1  # the first counter over its limit


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Swap a reservation for the actual amount.

    If the counter is still in the window the reservation went into, it moves by
    ``actual - reserved``; if that window has ended, ``actual`` is charged to the current window
    (starting one if none is open), as Kuadrant charges after the response.

    A calendar period (``period_end_ms`` > 0): ``key`` is the reserved period's counter,
    ``current_key`` the current period's. While they are the same period the counter moves by
    ``actual - reserved``; otherwise ``actual`` goes to the current period, which ends at
    ``current_end_ms``.
    """

    key: str
    window_ms: int
    window_start_ms: int
    reserved: int
    actual: int
    sliding: bool = False
    period_end_ms: int = 0
    current_key: str = ""
    current_end_ms: int = 0


@dataclass(frozen=True, slots=True)
class Attribution:
    """Subscription era: what a ledger amount is booked to besides the user and the model."""

    subscription: str = ""  # "<namespace>/<name>" of the MaaSSubscription
    key: str = ""  # the API key's name ("" for tokens)
    organization_id: str = ""  # the subscription's tokenMetadata
    cost_center: str = ""

    def parts(self) -> tuple[str, ...]:
        """The ledger field's attribution parts; () in the tier era (no subscription)."""
        if not self.subscription:
            return ()
        return (self.subscription, self.key, self.organization_id, self.cost_center)

    @classmethod
    def of(cls, parts: tuple[str, ...]) -> Attribution:
        return cls(*parts[:4]) if len(parts) >= 4 else cls()


NO_ATTRIBUTION = Attribution()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One response's usage for the per-user, per-day, per-model ledger.

    The informational kinds (cached input read, cache creation, reasoning; each part of the
    prompt or completion) come with how many of the entry's requests reported them (0 or 1 per
    response), so a sum of 0 over requests that reported 0 stays apart from "not reported".
    ``cost_micros`` is the exact integer cost (accounting.pricing); ``priced_requests`` counts
    the requests a price applied to.
    """

    userid: str
    day: str  # YYYYMMDD, UTC
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_tokens: int  # the part of total_tokens that is an estimate
    requests: int = 1
    attribution: Attribution = NO_ATTRIBUTION
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    cached_reported: int = 0
    cache_creation_reported: int = 0
    reasoning_reported: int = 0
    priced_requests: int = 0


@dataclass(frozen=True, slots=True)
class Hold:
    """One admitted request's reservation, kept in the ledger as unsettled until its settle.

    Admission adds ``tokens`` (and one open request) to the (user, day) ledger; the settle takes
    the same off again. What is left belongs to requests whose charge never came.
    """

    userid: str
    day: str  # the admission's day: the settle releases the hold on that day, whenever it runs
    model: str
    tokens: int
    attribution: Attribution = NO_ATTRIBUTION


@dataclass(frozen=True, slots=True)
class LedgerRow:
    day: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_tokens: int
    requests: int
    unsettled_tokens: int = 0  # reservations of admitted requests not settled (yet)
    unsettled_requests: int = 0
    attribution: Attribution = NO_ATTRIBUTION
    # As in LedgerEntry: sums of the informational kinds, how many requests reported each, the
    # cost in micro-units and how many requests were priced.
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    cached_reported: int = 0
    cache_creation_reported: int = 0
    reasoning_reported: int = 0
    priced_requests: int = 0


class CounterStore(Protocol):
    """Atomic window counters plus the usage ledger. Each call is one round trip to the backend.

    Every method raises ``errors.StoreUnavailable`` when the backend fails.
    """

    async def admit(
        self,
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None = None,
        *,
        request_id: str = "",
    ) -> AdmitResult:
        """Check every counter; only if all pass, add each one's hits and the hold (all or nothing).

        With a ``request_id`` (and a hold) the request's state becomes ``held``; an admission
        whose request was settled already (it ran late, after its caller gave up on it) is void.
        """
        ...

    async def settle(
        self,
        adjustments: Sequence[Adjustment],
        entry: LedgerEntry | None,
        now_ms: int,
        *,
        request_id: str = "",
        release: Hold | None = None,
        record: str = "",
    ) -> bool:
        """Apply the adjustments, add the entry and release the hold, atomically per user.

        A ``record`` (the charge record's JSON, ``extproc.export.record``) is appended to the
        export stream in the same atomic step: it exists if and only if the charge was applied.

        With a ``request_id`` the settle is applied at most once: a second settle with the same
        id (a replay whose first attempt did land) changes nothing and returns False; and the
        release applies only if the admission's hold did (an admission that timed out at the
        caller may or may not have run).
        """
        ...

    async def claim(self, key: str, ttl_ms: int, now_ms: int) -> bool:
        """Set ``key`` unless it is set (for ``ttl_ms``): True for the one caller that set it.

        Soft-limit events are sent once across every replica by claiming their key first.
        """
        ...

    async def ledger(self, userid: str, days: Sequence[str]) -> list[LedgerRow]:
        """The ledger rows of one user for the given days (missing days give no rows)."""
        ...

    async def ledgers(self, userids: Sequence[str], days: Sequence[str]) -> list[list[LedgerRow]]:
        """``ledger`` of each user in ``userids`` (one list per user, in order), in one round trip
        per node: the listings across users read their batches with it."""
        ...

    async def ledger_totals(
        self, userids: Sequence[str], days: Sequence[str]
    ) -> list[list[LedgerRow]]:
        """Like ``ledgers``, but rows that only add up right: per user one row of day and model
        "" holding the totals of the hashes known to carry them (``ledger.totals``: a few fields
        instead of the whole hash), then the rows of the other hashes."""
        ...

    async def ledger_users(self, days: Sequence[str]) -> list[str]:
        """Users with at least one ledger row on the given days."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
