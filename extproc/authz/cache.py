"""Bounded expiring caches and single-flight calls for the answers of remote identity/tier/access checks."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

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


class Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class CachedChecks(Generic[K, V]):
    """A remote check's answers by key: a pass (a value) and a refusal (None) each kept for its
    own TTL, concurrent first checks of one key sharing one call, every lookup counted in
    ``lookups`` (``hit``, ``negative_hit``, ``miss``, ``shared``). The check itself stores its
    answer (``keep`` / ``refuse``), since only it knows how long that answer may be trusted."""

    def __init__(
        self,
        lookups: Mapping[str, Incrementable],
        clock: Callable[[], float],
        max_entries: int,
        max_negative_entries: int,
    ) -> None:
        self._lookups = lookups
        self._valid: ExpiringCache[K, V] = ExpiringCache(max_entries, clock)
        self._invalid: ExpiringCache[K, None] = ExpiringCache(
            min(max_entries, max_negative_entries), clock
        )
        self._flights: SingleFlight[K, V | None] = SingleFlight()

    async def get(self, key: K, check: Callable[[], Awaitable[V | None]]) -> V | None:
        if (valid := self._valid.get(key)) is not None:
            self._lookups["hit"].inc()
            return valid.value
        if self._invalid.get(key) is not None:
            self._lookups["negative_hit"].inc()
            return None
        self._lookups["shared" if self._flights.joining(key) else "miss"].inc()
        return await self._flights.run(key, check)

    def keep(self, key: K, value: V, ttl_s: float) -> None:
        self._valid.put(key, value, ttl_s)

    def refuse(self, key: K, ttl_s: float) -> None:
        self._invalid.put(key, None, ttl_s)

    async def close(self) -> None:
        await self._flights.close()
        self._valid.clear()
        self._invalid.clear()
