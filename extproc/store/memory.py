"""An in-process CounterStore: one replica's truth, for local runs and as the tests' reference."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.limits import windows
from extproc.store import keys
from extproc.store.base import (
    Adjustment,
    AdmitResult,
    CounterState,
    LedgerEntry,
    LedgerRow,
    WindowCounter,
)


@dataclass(slots=True)
class _Window:
    value: int
    start_ms: int


class MemoryStore:
    """Fixed and sliding windows in dicts; the event loop makes every call atomic."""

    def __init__(self, retention_days: int = 90) -> None:
        self._windows: dict[str, _Window] = {}
        self._ledger: dict[str, dict[str, int]] = {}
        self._users: dict[str, set[str]] = {}
        self._retention_days = retention_days

    async def admit(self, counters: Sequence[WindowCounter], now_ms: int) -> AdmitResult:
        states: list[CounterState] = []
        for index, counter in enumerate(counters):
            value, start, reset = self._read(
                counter.key, counter.window_ms, counter.sliding, now_ms
            )
            if value >= counter.limit:
                states.append(CounterState(value, start, reset))
                return AdmitResult(False, tuple(states), index)
            states.append(CounterState(value + counter.hits, start, reset))
        for counter in counters:
            self._add(counter.key, counter.window_ms, counter.sliding, counter.hits, now_ms)
        return AdmitResult(True, tuple(states))

    async def settle(
        self, adjustments: Sequence[Adjustment], entry: LedgerEntry | None, now_ms: int
    ) -> None:
        for adj in adjustments:
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

    async def ledger(self, userid: str, days: Sequence[str]) -> list[LedgerRow]:
        rows: list[LedgerRow] = []
        for day in days:
            fields = self._ledger.get(keys.ledger_key(userid, day))
            if fields:
                rows.extend(ledger_rows(day, fields))
        return rows

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

    def _record(self, entry: LedgerEntry, now_ms: int) -> None:
        self._expire_ledger(now_ms)
        fields = self._ledger.setdefault(keys.ledger_key(entry.userid, entry.day), {})
        for kind, amount in zip(keys.LEDGER_KINDS, ledger_amounts(entry), strict=True):
            name = keys.ledger_field(entry.model, kind)
            fields[name] = fields.get(name, 0) + amount
        self._users.setdefault(entry.day, set()).add(entry.userid)

    def _expire_ledger(self, now_ms: int) -> None:
        oldest = day_of(now_ms - self._retention_days * 86_400_000)
        for day in [d for d in self._users if d < oldest]:
            for userid in self._users.pop(day):
                self._ledger.pop(keys.ledger_key(userid, day), None)


def ledger_amounts(entry: LedgerEntry) -> tuple[int, int, int, int, int]:
    """The entry's numbers in ``keys.LEDGER_KINDS`` order."""
    return (
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.total_tokens,
        entry.estimated_tokens,
        entry.requests,
    )


def ledger_rows(day: str, fields: dict[str, int]) -> list[LedgerRow]:
    """Fold a ledger hash (``model|kind`` -> amount) into one row per model, sorted by model."""
    per_model: dict[str, dict[str, int]] = {}
    for name, amount in fields.items():
        model, _, kind = name.rpartition("|")
        per_model.setdefault(model, {})[kind] = int(amount)
    return [
        LedgerRow(
            day=day,
            model=model,
            prompt_tokens=kinds.get("prompt", 0),
            completion_tokens=kinds.get("completion", 0),
            total_tokens=kinds.get("total", 0),
            estimated_tokens=kinds.get("estimated", 0),
            requests=kinds.get("requests", 0),
        )
        for model, kinds in sorted(per_model.items())
    ]


def day_of(now_ms: int) -> str:
    """The UTC day of a millisecond timestamp, as the ledger names it (YYYYMMDD)."""
    return _day_name(now_ms // 86_400_000)


@functools.lru_cache(maxsize=16)
def _day_name(day: int) -> str:
    # Pure and called on every charge: worth remembering the few days in play.
    return dt.datetime.fromtimestamp(day * 86_400, tz=dt.UTC).strftime("%Y%m%d")
