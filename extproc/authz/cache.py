"""Bounded expiring caches and single-flight calls for the answers of remote identity/tier/access checks."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Cached(Generic[V]):
    """One remembered answer; ``value`` may itself be None (a cached "no")."""

    value: V
    expires_at: float


class ExpiringCache(Generic[K, V]):
    """An LRU map whose entries each expire at their own time, on the injected clock."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, Cached[V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> Cached[V] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: K, value: V, ttl_s: float) -> None:
        """Remember ``value`` for ``ttl_s`` seconds; a ttl of 0 or less forgets the key."""
        if ttl_s <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = Cached(value, self._clock() + ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class SingleFlight(Generic[K, V]):
    """Concurrent calls for the same key share one underlying call and its result or error."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    def joining(self, key: K) -> bool:
        """Whether a call for ``key`` is already under way (a caller would share it)."""
        return key in self._running

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        task = self._running.get(key)
        if task is None:
            started = asyncio.ensure_future(call())
            self._running[key] = task = started
            started.add_done_callback(lambda _: self._forget(key, started))
        # shield: one caller giving up (its request was cancelled) must not cancel the others' call.
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: a failure nobody awaited any more is not "lost"

    async def close(self) -> None:
        """Cancel calls still under way."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
