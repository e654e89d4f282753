"""Listings across users (per user, per API key): aggregated once into a snapshot, then sorted
and paged from it with opaque page tokens.

A listing reads every (user, day) ledger hash of the period, in batches (one round trip each),
so its cost grows with users × days; without filters it reads only each hash's totals
(``CounterStore.ledger_totals``). The snapshot makes that cost once per listing, not per
page or sort order: later pages, and the same query within ``fresh_s``, read the snapshot.
Pages of one listing all come from the snapshot its first page took, so settles meanwhile
neither repeat a row nor skip one; its page tokens stay good while it is read at least every
``keep_s``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import operator
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from operator import add

from extproc.errors import ConfigError
from extproc.observability.usage_query import Filters, Row, zero_totals
from extproc.store.base import CounterStore

BATCH_USERS = 256  # users per round trip: short enough not to hold the event loop
Names = tuple[str, ...]
Entries = list[tuple[Names, tuple[int, ...]]]  # a listing's rows: names, then summed amounts
SUMMED = tuple(zero_totals())  # the amounts a listing adds up, in this order


@dataclass(frozen=True, slots=True)
class Query:
    """What selects a listing's rows (page tokens are bound to it, sort and order included)."""

    route: str
    users: tuple[str, ...] | None  # None: every user with usage in the period
    days: tuple[str, ...]
    filters: Filters
    user_prefix: str = ""

    def fingerprint(self, sort: str, order: str) -> str:
        text = json.dumps(
            [self.route, self.users, self.days, self.filters.given(), self.user_prefix, sort, order]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(slots=True)
class Snapshot:
    """One listing's rows as of its first page: names (``columns``) and amounts (``summed``)."""

    id: str
    columns: tuple[str, ...]
    summed: tuple[str, ...]
    entries: Entries
    totals: Row
    used: float
    _orders: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def ordered(self, sort: str, order: str) -> list[int]:
        """Indexes of ``entries`` by ``sort`` (a naming column or an amount), ties by names."""
        view = self._orders.get((sort, order))
        if view is None:
            entries = self.entries
            if sort in self.columns:
                at = self.columns.index(sort)
                view = sorted(range(len(entries)), key=lambda i: (entries[i][0][at], entries[i][0]))
            else:
                amount = self.summed.index(sort)
                view = sorted(
                    range(len(entries)), key=lambda i: (entries[i][1][amount], entries[i][0])
                )
            if order == "desc":
                view.reverse()
            self._orders[(sort, order)] = view
        return view

    def row(self, index: int) -> Row:
        names, amounts = self.entries[index]
        return {
            **dict(zip(self.columns, names, strict=True)),
            **dict(zip(self.summed, amounts, strict=True)),
        }


async def aggregate(
    store: CounterStore, users: Sequence[str], query: Query, per_key: bool
) -> tuple[Entries, Row]:
    """Per user (or per user, key and subscription) sums of the rows the filters admit.

    Users without an admitted row get no entry. Raises what the store raises (``Unavailable``).
    """
    summed = SUMMED
    amounts_of = operator.attrgetter(*summed)  # one C call a row, not one getattr an amount
    sums: dict[Names, tuple[int, ...]] = {}
    # Rows by model and attribution only where a filter or the per-key view needs them.
    whole = per_key or bool(query.filters.given())
    read = store.ledgers if whole else store.ledger_totals
    # Whole hashes take longer to fold: smaller batches keep each turn of the event loop short.
    size = BATCH_USERS // 4 if whole else BATCH_USERS
    batches = [users[start : start + size] for start in range(0, len(users), size)]
    # The next batch is asked for before this one is folded: Redis reads while Python adds.
    coming = asyncio.ensure_future(read(batches[0], query.days)) if batches else None
    try:
        for index, batch in enumerate(batches):
            assert coming is not None
            found = await coming
            coming = None
            if index + 1 < len(batches):
                coming = asyncio.ensure_future(read(batches[index + 1], query.days))
                await asyncio.sleep(0)  # it sends its commands before this turn folds
            for user, rows in zip(batch, found, strict=True):
                for row in rows:
                    if not query.filters.admits(row):
                        continue
                    names = (
                        (user, row.attribution.key, row.attribution.subscription)
                        if per_key
                        else (user,)
                    )
                    amounts = amounts_of(row)
                    before = sums.get(names)
                    sums[names] = amounts if before is None else tuple(map(add, before, amounts))
    finally:
        if coming is not None:
            coming.cancel()
    entries = list(sums.items())
    totals = [sum(column) for column in zip(*sums.values(), strict=True)] or [0] * len(summed)
    return entries, dict(zip(summed, totals, strict=True))


class SnapshotCache:
    """Snapshots by query: reused for ``fresh_s``, kept for page tokens ``keep_s`` after their
    last read, at most ``max_snapshots`` (the least recently read go first). Concurrent first
    pages of one query share one aggregation."""

    def __init__(
        self,
        *,
        fresh_s: float = 10.0,
        keep_s: float = 300.0,
        max_snapshots: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fresh_s = fresh_s
        self._keep_s = keep_s
        self._max = max_snapshots
        self._clock = clock
        self._by_id: dict[str, tuple[Query, float, Snapshot]] = {}  # id -> (query, taken, snapshot)
        self._building: dict[Query, asyncio.Task[Snapshot]] = {}

    async def take(
        self,
        query: Query,
        columns: tuple[str, ...],
        build: Callable[[], Awaitable[tuple[Entries, Row]]],
    ) -> Snapshot:
        """A snapshot of ``query`` taken within ``fresh_s``, or a new one."""
        now = self._clock()
        self._expire(now)
        for taken_query, taken, snapshot in self._by_id.values():
            if taken_query == query and now - taken <= self._fresh_s:
                snapshot.used = now
                return snapshot
        task = self._building.get(query)
        if task is None:

            async def run() -> Snapshot:
                try:
                    entries, totals = await build()
                finally:
                    self._building.pop(query, None)
                taken = self._clock()
                snapshot = Snapshot(secrets.token_hex(16), columns, SUMMED, entries, totals, taken)
                self._by_id[snapshot.id] = (query, taken, snapshot)
                self._expire(taken)
                return snapshot

            task = self._building[query] = asyncio.ensure_future(run())
            # A failure is raised to every waiting caller; when none waits any more, drop it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(task)

    def find(self, snapshot_id: str, query: Query) -> Snapshot | None:
        now = self._clock()
        self._expire(now)
        found = self._by_id.get(snapshot_id)
        if found is None or found[0] != query:
            return None
        found[2].used = now
        return found[2]

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, _, s) in self._by_id.items() if now - s.used > self._keep_s]:
            del self._by_id[key]
        while len(self._by_id) > self._max:
            oldest = min(self._by_id, key=lambda k: self._by_id[k][2].used)
            del self._by_id[oldest]


# ------------------------------------------------------------------------------ page tokens

_VERSION = 1


@dataclass(frozen=True, slots=True)
class PageToken:
    snapshot: str
    offset: int
    fingerprint: str

    def encode(self) -> str:
        text = json.dumps([_VERSION, self.snapshot, self.offset, self.fingerprint])
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> PageToken:
        """The token, or ConfigError naming ``page_token`` for anything not made by ``encode``."""
        wanted = "a next_page_token of a previous page"
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            parts = json.loads(raw)
        except (binascii.Error, ValueError, RecursionError) as exc:
            raise ConfigError("page_token", wanted, value) from exc
        if not (
            isinstance(parts, list)
            and len(parts) == 4
            and parts[0] == _VERSION
            and isinstance(parts[1], str)
            and type(parts[2]) is int
            and 0 <= parts[2] <= 10**9
            and isinstance(parts[3], str)
        ):
            raise ConfigError("page_token", wanted, value)
        return cls(parts[1], parts[2], parts[3])
