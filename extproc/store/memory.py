"""An in-process CounterStore: one replica's truth, for local runs and as the tests' reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.export.stream import MemoryRecords
from extproc.limits import windows
from extproc.limits.periods import PERIOD_GRACE_MS
from extproc.store import keys, ledger
from extproc.store.base import (
    Adjustment,
    AdmitResult,
    CounterState,
    Hold,
    LedgerEntry,
    LedgerRow,
    WindowCounter,
)


@dataclass(slots=True)
class _Window:
    value: int
    start_ms: int
    expires_ms: int = 0  # calendar periods: an hour after the period's end (store/lua/windows.lua)


class MemoryStore:
    """Fixed and sliding windows in dicts; the event loop makes every call atomic."""

    def __init__(
        self,
        retention_days: int = 90,
        dedupe_ttl_ms: int = 3_600_000,
        records: MemoryRecords | None = None,
    ) -> None:
        # The export stream (None: off); the settle appends to it as settle.lua does.
        self.records = records
        self._windows: dict[str, _Window] = {}
        self._ledger: dict[str, dict[str, int]] = {}
        self._users: dict[str, set[str]] = {}
        self._requests: dict[str, tuple[str, int]] = {}  # request_key -> (state, expiry ms)
        self._claims: dict[str, int] = {}  # claimed key -> expiry ms
        self._retention_days = retention_days
        self._dedupe_ttl_ms = dedupe_ttl_ms

    async def admit(
        self,
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None = None,
        *,
        request_id: str = "",
    ) -> AdmitResult:
        state_key = keys.request_key(hold.userid, request_id) if request_id and hold else ""
        if state_key and self._state(state_key, now_ms) == "settled":
            return AdmitResult(True, tuple(CounterState(0, now_ms, 0) for _ in counters))
        states: list[CounterState] = []
        for index, counter in enumerate(counters):
            if counter.period_end_ms:
                period = self._period(counter.key, now_ms)
                value = period.value if period else 0
                start, reset = counter.period_start_ms, counter.period_end_ms - now_ms
            else:
                value, start, reset = self._read(
                    counter.key, counter.window_ms, counter.sliding, now_ms
                )
            if value >= counter.limit and counter.enforce:
                states.append(CounterState(value, start, reset))
                return AdmitResult(False, tuple(states), index)
            states.append(CounterState(value + counter.hits, start, reset))
        for counter in counters:
            if counter.period_end_ms:
                self._add_period(counter.key, counter.period_end_ms, counter.hits, now_ms)
            else:
                self._add(counter.key, counter.window_ms, counter.sliding, counter.hits, now_ms)
        if hold is not None:
            self._hold(hold, 1, now_ms)
        if state_key:
            self._set_state(state_key, "held", now_ms)
        return AdmitResult(True, tuple(states))

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
        owner = entry or release
        state_key = keys.request_key(owner.userid, request_id) if request_id and owner else ""
        held = True
        if state_key:
            state = self._state(state_key, now_ms)
            if state == "settled":
                return False
            held = state == "held"
            self._set_state(state_key, "settled", now_ms)
        for adj in adjustments:
            if adj.period_end_ms:
                period = self._period(adj.key, now_ms)
                if period and adj.key == adj.current_key and now_ms < adj.period_end_ms:
                    period.value = max(0, period.value + adj.actual - adj.reserved)
                elif adj.actual:
                    self._add_period(adj.current_key, adj.current_end_ms, adj.actual, now_ms)
                continue
            if adj.sliding:
                bucket_key = keys.sliding_bucket_key(adj.key, adj.window_start_ms // adj.window_ms)
                window = self._windows.get(bucket_key)
                if window is not None and not windows.fixed_expired(
                    window.start_ms, 2 * adj.window_ms, now_ms
                ):
                    window.value = max(0, window.value + adj.actual - adj.reserved)
                else:
                    self._add(adj.key, adj.window_ms, True, adj.actual, now_ms)
                continue
            window = self._windows.get(adj.key)
            if (
                window is not None
                and window.start_ms == adj.window_start_ms
                and not (windows.fixed_expired(window.start_ms, adj.window_ms, now_ms))
            ):
                window.value = max(0, window.value + adj.actual - adj.reserved)
            elif adj.actual:
                self._add(adj.key, adj.window_ms, False, adj.actual, now_ms)
        if entry is not None:
            self._record(entry, now_ms)
        if release is not None and held:
            self._hold(release, -1, now_ms)
        if record and entry is not None and self.records is not None:
            self.records.append(record, now_ms)
        return True

    async def claim(self, key: str, ttl_ms: int, now_ms: int) -> bool:
        if self._claims.get(key, 0) > now_ms:
            return False
        if len(self._claims) >= 100_000:
            self._claims = {k: v for k, v in self._claims.items() if v > now_ms}
        self._claims[key] = now_ms + max(1, ttl_ms)
        return True

    async def ledger(self, userid: str, days: Sequence[str]) -> list[LedgerRow]:
        rows: list[LedgerRow] = []
        for day in days:
            fields = self._ledger.get(keys.ledger_key(userid, day))
            if fields:
                rows.extend(ledger.rows(day, fields))
        return rows

    async def ledgers(self, userids: Sequence[str], days: Sequence[str]) -> list[list[LedgerRow]]:
        return [await self.ledger(userid, days) for userid in userids]

    async def ledger_totals(
        self, userids: Sequence[str], days: Sequence[str]
    ) -> list[list[LedgerRow]]:
        found: list[list[LedgerRow]] = []
        for userid in userids:
            hashes = [self._ledger.get(keys.ledger_key(userid, day), {}) for day in days]
            row = ledger.totals([[h.get(name) for name in ledger.TOTAL_FIELDS] for h in hashes])
            found.append([] if row is None else [row])
        return found

    async def ledger_users(self, days: Sequence[str]) -> list[str]:
        users: set[str] = set()
        for day in days:
            users |= self._users.get(day, set())
        return sorted(users)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _read(self, key: str, window_ms: int, sliding: bool, now_ms: int) -> tuple[int, int, int]:
        if sliding:
            bucket = windows.bucket_of(now_ms, window_ms)
            current = self._value(keys.sliding_bucket_key(key, bucket), 2 * window_ms, now_ms)
            previous = self._value(keys.sliding_bucket_key(key, bucket - 1), 2 * window_ms, now_ms)
            value = windows.sliding_value(current, previous, now_ms, window_ms)
            return value, bucket * window_ms, windows.sliding_reset_ms(now_ms, window_ms)
        window = self._windows.get(key)
        if window is None or windows.fixed_expired(window.start_ms, window_ms, now_ms):
            return 0, now_ms, window_ms
        return window.value, window.start_ms, window.start_ms + window_ms - now_ms

    def _period(self, key: str, now_ms: int) -> _Window | None:
        """A calendar period's counter, unless it expired."""
        window = self._windows.get(key)
        return window if window is not None and window.expires_ms > now_ms else None

    def _add_period(self, key: str, end_ms: int, hits: int, now_ms: int) -> None:
        window = self._period(key, now_ms)
        if window is None:
            expires = now_ms + max(1, end_ms - now_ms) + PERIOD_GRACE_MS
            self._windows[key] = _Window(hits, now_ms, expires)
        else:
            window.value += hits

    def _value(self, key: str, ttl_ms: int, now_ms: int) -> int:
        window = self._windows.get(key)
        if window is None or windows.fixed_expired(window.start_ms, ttl_ms, now_ms):
            return 0
        return window.value

    def _add(self, key: str, window_ms: int, sliding: bool, hits: int, now_ms: int) -> None:
        if sliding:
            bucket = windows.bucket_of(now_ms, window_ms)
            key = keys.sliding_bucket_key(key, bucket)
            ttl_ms, start = 2 * window_ms, bucket * window_ms
        else:
            ttl_ms, start = window_ms, now_ms
        window = self._windows.get(key)
        if window is None or windows.fixed_expired(window.start_ms, ttl_ms, now_ms):
            self._windows[key] = _Window(hits, start)
        else:
            window.value += hits

    def _state(self, key: str, now_ms: int) -> str:
        """A request's state (``held``, ``settled``), or "" when none is kept (any more)."""
        state, expires = self._requests.get(key, ("", 0))
        return state if expires > now_ms else ""

    def _set_state(self, key: str, state: str, now_ms: int) -> None:
        if len(self._requests) >= 100_000:
            self._requests = {k: v for k, v in self._requests.items() if v[1] > now_ms}
        self._requests[key] = (state, now_ms + self._dedupe_ttl_ms)

    def _record(self, entry: LedgerEntry, now_ms: int) -> None:
        self._add_fields(entry.userid, entry.day, ledger.entry_fields(entry), now_ms)

    def _hold(self, hold: Hold, sign: int, now_ms: int) -> None:
        self._add_fields(hold.userid, hold.day, list(ledger.hold_fields(hold, sign)), now_ms)

    def _add_fields(self, userid: str, day: str, pairs: list[tuple[str, int]], now_ms: int) -> None:
        self._expire_ledger(now_ms)
        fields = self._ledger.setdefault(keys.ledger_key(userid, day), {})
        for name, amount in pairs:
            fields[name] = fields.get(name, 0) + amount
        self._users.setdefault(day, set()).add(userid)

    def _expire_ledger(self, now_ms: int) -> None:
        oldest = ledger.day_of(now_ms - self._retention_days * 86_400_000)
        for day in [d for d in self._users if d < oldest]:
            for userid in self._users.pop(day):
                self._ledger.pop(keys.ledger_key(userid, day), None)
