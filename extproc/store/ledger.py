"""The usage ledger's record format: one hash per (user, day), fields ``model|kind`` -> amount.

Both stores (memory and Redis) write and read it through these helpers, so they cannot drift.
Settled kinds (``keys.LEDGER_KINDS``) only ever grow. The five kinds every entry has (prompt,
completion, total, estimated, requests) are always written; the later ones (token kinds, cost,
reported counts) only when not 0, so traffic that reports none of them keeps the hash as small
as before, and a missing field reads as 0. ``unsettled`` and ``open`` hold the
reservations of admitted requests whose settle has not come yet: admission adds them, the settle
takes them off again, so what stays there belongs to requests whose charge never arrived (the
sidecar that followed the stream was killed).

Every write also adds its amounts to the hash's totals over all models and attributions: one
field per kind, named by the kind alone (``keys.ledger_total_field``). A listing of every user
reads those few fields of each (user, day) with HMGET instead of the whole hash (``totals``;
docs/benchmarks.md, "Usage API over a large ledger"); ``rows`` leaves them out.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence

from extproc.domain import Charge
from extproc.store import keys
from extproc.store.base import NO_ATTRIBUTION, Attribution, Hold, LedgerEntry, LedgerRow

UNSETTLED = "unsettled"  # reserved tokens of admitted requests not settled yet
OPEN = "open"  # how many admitted requests are not settled yet


ALWAYS_WRITTEN = 5  # the first kinds of keys.LEDGER_KINDS, written even when 0


def entry_for(charge: Charge, now_ms: int) -> LedgerEntry:
    """The ledger entry one settled charge adds, on the day of ``now_ms``."""
    usage = charge.usage
    total = usage.total()
    return LedgerEntry(
        userid=charge.userid,
        day=day_of(now_ms),
        model=model_of(charge.model),
        prompt_tokens=usage.prompt_tokens or 0,
        completion_tokens=usage.completion_tokens or 0,
        total_tokens=total,
        estimated_tokens=total if usage.estimated else 0,
        attribution=attribution_of(charge),
        cached_tokens=usage.cached_tokens or 0,
        cache_creation_tokens=usage.cache_creation_tokens or 0,
        reasoning_tokens=usage.reasoning_tokens or 0,
        cost_micros=charge.cost_micros,
        cached_reported=int(usage.cached_tokens is not None),
        cache_creation_reported=int(usage.cache_creation_tokens is not None),
        reasoning_reported=int(usage.reasoning_tokens is not None),
        priced_requests=int(charge.priced),
    )


def attribution_of(charge: Charge) -> Attribution:
    if not charge.subscription:
        return NO_ATTRIBUTION
    return Attribution(
        charge.subscription, charge.key_name, charge.organization_id, charge.cost_center
    )


def hold_for(
    userid: str,
    model: str,
    tokens: int,
    admitted_ms: int,
    attribution: Attribution = NO_ATTRIBUTION,
) -> Hold:
    """The unsettled record admission writes (and the settle releases) for one request."""
    return Hold(
        userid=userid,
        day=day_of(admitted_ms),
        model=model_of(model),
        tokens=tokens,
        attribution=attribution,
    )


def model_of(model: str) -> str:
    return model or "unknown"


def amounts(entry: LedgerEntry) -> tuple[int, ...]:
    """The entry's numbers in ``keys.LEDGER_KINDS`` order."""
    return (
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.total_tokens,
        entry.estimated_tokens,
        entry.requests,
        entry.cached_tokens,
        entry.cache_creation_tokens,
        entry.reasoning_tokens,
        entry.cost_micros,
        entry.cached_reported,
        entry.cache_creation_reported,
        entry.reasoning_reported,
        entry.priced_requests,
    )


def entry_fields(entry: LedgerEntry) -> list[tuple[str, int]]:
    """The (field, amount) pairs one settled entry adds, in ``keys.LEDGER_KINDS`` order (the
    later kinds only when not 0), then the same amounts for the hash's totals."""
    parts = entry.attribution.parts()
    written = [
        (kind, amount)
        for index, (kind, amount) in enumerate(zip(keys.LEDGER_KINDS, amounts(entry), strict=True))
        if amount or index < ALWAYS_WRITTEN
    ]
    return [(keys.ledger_field(entry.model, kind, parts), amount) for kind, amount in written] + [
        (keys.ledger_total_field(kind), amount) for kind, amount in written
    ]


def hold_fields(hold: Hold, sign: int) -> tuple[tuple[str, int], ...]:
    """The (field, amount) pairs that add (sign 1) or release (sign -1) a hold, and its totals."""
    parts = hold.attribution.parts()
    return (
        (keys.ledger_field(hold.model, UNSETTLED, parts), sign * hold.tokens),
        (keys.ledger_field(hold.model, OPEN, parts), sign),
        (keys.ledger_total_field(UNSETTLED), sign * hold.tokens),
        (keys.ledger_total_field(OPEN), sign),
    )


# The totals fields a listing reads (HMGET), in this order (``totals``).
TOTAL_KINDS = (*keys.LEDGER_KINDS, UNSETTLED, OPEN)
TOTAL_FIELDS = tuple(keys.ledger_total_field(kind) for kind in TOTAL_KINDS)


def rows(day: str, fields: dict[str, int]) -> list[LedgerRow]:
    """Fold a ledger hash (``model|kind`` -> amount, ``keys.ledger_field``) into one row per
    model and attribution, sorted."""
    per_model: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}
    for name, amount in fields.items():
        if keys.is_ledger_total(name):
            continue
        model, kind, attribution = keys.ledger_field_parts(name)
        per_model.setdefault((model, attribution), {})[kind] = int(amount)
    return [
        _row(day, model, Attribution.of(attribution), kinds)
        for (model, attribution), kinds in sorted(per_model.items())
        if any(kinds.values())
    ]


def totals(hashes: Sequence[Sequence[int | bytes | str | None]]) -> LedgerRow | None:
    """The totals of a user's hashes (each the values of ``TOTAL_FIELDS``, None where missing)
    as one row of day and model "", or None when they hold nothing."""
    found = [[0 if value is None else int(value) for value in values] for values in hashes]
    sums = [sum(column) for column in zip(*found, strict=True)]
    if not any(sums):
        return None
    return _row("", "", NO_ATTRIBUTION, dict(zip(TOTAL_KINDS, sums, strict=True)))


def _row(day: str, model: str, attribution: Attribution, kinds: dict[str, int]) -> LedgerRow:
    return LedgerRow(
        day=day,
        model=model,
        prompt_tokens=kinds.get("prompt", 0),
        completion_tokens=kinds.get("completion", 0),
        total_tokens=kinds.get("total", 0),
        estimated_tokens=kinds.get("estimated", 0),
        requests=kinds.get("requests", 0),
        unsettled_tokens=max(0, kinds.get(UNSETTLED, 0)),
        unsettled_requests=max(0, kinds.get(OPEN, 0)),
        attribution=attribution,
        cached_tokens=kinds.get("cached", 0),
        cache_creation_tokens=kinds.get("cache_creation", 0),
        reasoning_tokens=kinds.get("reasoning", 0),
        cost_micros=kinds.get("cost", 0),
        cached_reported=kinds.get("cached_n", 0),
        cache_creation_reported=kinds.get("cache_creation_n", 0),
        reasoning_reported=kinds.get("reasoning_n", 0),
        priced_requests=kinds.get("priced", 0),
    )


def day_of(now_ms: int) -> str:
    """The UTC day of a millisecond timestamp, as the ledger names it (YYYYMMDD)."""
    return _day_name(now_ms // 86_400_000)


@functools.lru_cache(maxsize=16)
def _day_name(day: int) -> str:
    # Pure and called on every charge: worth remembering the few days in play.
    return dt.datetime.fromtimestamp(day * 86_400, tz=dt.UTC).strftime("%Y%m%d")
