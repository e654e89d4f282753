"""A CounterStore wrapper that times every call and spools failed settles for replay in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from extproc.config import StoreConfig
from extproc.errors import StoreUnavailable
from extproc.observability.metrics import Metrics
from extproc.store.base import (
    Adjustment,
    AdmitResult,
    CounterStore,
    Hold,
    LedgerEntry,
    LedgerRow,
    WindowCounter,
)

log = logging.getLogger("extproc.store.resilient")

_T = TypeVar("_T")
_OPS = ("admit", "settle", "claim", "ledger", "ledger_users", "ping")


@runtime_checkable
class Startable(Protocol):
    async def start(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Settle:
    adjustments: tuple[Adjustment, ...]
    entry: LedgerEntry | None
    now_ms: int  # the caller's clock at settle time, replayed as is so windows resolve the same
    request_id: str
    release: Hold | None
    record: str  # the charge record for the export stream, replayed with the charge
    spooled_s: float  # monotonic time it was spooled: older than the dedupe TTL is not replayed

    async def apply(self, store: CounterStore) -> bool:
        return await store.settle(
            self.adjustments,
            self.entry,
            self.now_ms,
            request_id=self.request_id,
            release=self.release,
            record=self.record,
        )


class ResilientStore:
    """Applies the failure policy around any CounterStore.

    ``admit`` failures are re-raised as ``StoreUnavailable``: admission decides between fail-open and
    fail-closed. A failed ``settle`` is never lost to policy: under either policy it goes to a
    bounded spool that a background task replays in order once the store answers a ping again.
    While the spool holds anything, new settles queue behind it, so charges land in order and a dead
    store is not asked (and waited for) once per response.
    """

    def __init__(
        self,
        inner: CounterStore,
        config: StoreConfig,
        metrics: Metrics,
        *,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        close_timeout_s: float = 2.0,
    ) -> None:
        self._inner = inner
        self._policy = config.failure_policy
        self._spool: deque[_Settle] = deque()
        self._spool_size = max(1, config.spool_size)
        self._metrics = metrics
        self._errors = {op: metrics.store_errors.labels(op) for op in _OPS}
        self._seconds = {op: metrics.store_seconds.labels(op) for op in _OPS}
        self._admit_errors, self._admit_seconds = self._errors["admit"], self._seconds["admit"]
        self._settle_errors, self._settle_seconds = self._errors["settle"], self._seconds["settle"]
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._close_timeout_s = close_timeout_s
        self._replayer: asyncio.Task[None] | None = None
        self._dropped_in_outage = 0
        self._closed = False
        self._max_age_s = float(config.dedupe_ttl_s)

    def __repr__(self) -> str:
        return f"ResilientStore({self._inner!r}, policy={self._policy}, spool={len(self._spool)})"

    @property
    def inner(self) -> CounterStore:
        """The store this one wraps (the export stream reads the memory store's records)."""
        return self._inner

    @property
    def spooled(self) -> int:
        """Settles waiting for the store to come back."""
        return len(self._spool)

    async def start(self) -> None:
        """Warm the inner store up (e.g. load scripts); a store that is down now is not fatal."""
        if isinstance(self._inner, Startable):
            try:
                await self._inner.start()
            except StoreUnavailable as exc:
                log.warning("counter store unavailable at start: %s", exc)
        if self._spool:
            self._ensure_replayer()

    async def admit(
        self,
        counters: Sequence[WindowCounter],
        now_ms: int,
        hold: Hold | None = None,
        *,
        request_id: str = "",
    ) -> AdmitResult:
        # ``_timed`` written out: one coroutine less on each request's path.
        started = time.perf_counter()
        try:
            return await self._inner.admit(counters, now_ms, hold, request_id=request_id)
        except StoreUnavailable:
            self._admit_errors.inc()
            raise
        finally:
            self._admit_seconds.observe(time.perf_counter() - started)

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
        """Apply now, or spool for replay; True unless the store had applied this id already."""
        spooled_s = time.monotonic()

        def spooled() -> _Settle:  # built only when the charge goes to the spool
            return _Settle(
                tuple(adjustments), entry, now_ms, request_id, release, record, spooled_s
            )

        if self._spool:
            self._push(spooled())
            return True
        # ``_timed`` written out: one coroutine less on each request's path.
        started = time.perf_counter()
        try:
            applied = await self._inner.settle(
                adjustments, entry, now_ms, request_id=request_id, release=release, record=record
            )
        except StoreUnavailable as exc:
            self._settle_errors.inc()
            log.warning("counter store unavailable: spooling charges for replay: %s", exc)
            self._push(spooled())
            return True
        except asyncio.CancelledError:
            # Torn down mid-call (shutdown): the settle may or may not have landed. The spool
            # replays it under the same id, so it lands exactly once either way.
            self._push(spooled())
            raise
        finally:
            self._settle_seconds.observe(time.perf_counter() - started)
        if not applied:
            self._metrics.settle_duplicates.inc()
        return applied

    async def claim(self, key: str, ttl_ms: int, now_ms: int) -> bool:
        return await self._timed("claim", self._inner.claim(key, ttl_ms, now_ms))

    async def ledger(self, userid: str, days: Sequence[str]) -> list[LedgerRow]:
        return await self._timed("ledger", self._inner.ledger(userid, days))

    async def ledgers(self, userids: Sequence[str], days: Sequence[str]) -> list[list[LedgerRow]]:
        return await self._timed("ledger", self._inner.ledgers(userids, days))

    async def ledger_totals(
        self, userids: Sequence[str], days: Sequence[str]
    ) -> list[list[LedgerRow]]:
        return await self._timed("ledger", self._inner.ledger_totals(userids, days))

    async def ledger_users(self, days: Sequence[str]) -> list[str]:
        return await self._timed("ledger_users", self._inner.ledger_users(days))

    async def ping(self) -> None:
        await self._timed("ping", self._inner.ping())

    async def close(self) -> None:
        """Stop replaying, try one last flush within ``close_timeout_s``, then close the store."""
        self._closed = True
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        if self._spool:
            with contextlib.suppress(TimeoutError, StoreUnavailable):
                async with asyncio.timeout(self._close_timeout_s):
                    await self._drain()
        if self._spool:
            lost = len(self._spool)
            self._spool.clear()
            self._metrics.spool_dropped.inc(lost)
            self._metrics.spool_depth.set(0)
            log.error("counter store unavailable at shutdown: %d charges lost", lost)
        await self._inner.close()

    async def _timed(self, op: str, call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        try:
            return await call
        except StoreUnavailable:
            self._errors[op].inc()
            raise
        finally:
            self._seconds[op].observe(time.perf_counter() - started)

    def _push(self, charge: _Settle) -> None:
        if len(self._spool) >= self._spool_size:
            self._drop_oldest()
        self._spool.append(charge)
        self._metrics.spool_depth.set(len(self._spool))
        self._ensure_replayer()

    def _drop_oldest(self) -> None:
        self._spool.popleft()
        self._metrics.spool_dropped.inc()
        self._dropped_in_outage += 1
        if self._dropped_in_outage == 1:  # one line per outage; the total comes on recovery
            log.error("charge spool full (%d): dropping the oldest charges", self._spool_size)

    def _ensure_replayer(self) -> None:
        if self._closed or (self._replayer is not None and not self._replayer.done()):
            return
        self._replayer = asyncio.get_running_loop().create_task(
            self._replay(), name="store-spool-replay"
        )

    async def _replay(self) -> None:
        """Ping with exponential backoff until the store answers, then drain; repeat until empty."""
        delay = self._retry_initial_s
        while self._spool:
            await asyncio.sleep(delay)
            try:
                await self._timed("ping", self._inner.ping())
                await self._drain()
            except StoreUnavailable:
                delay = min(delay * 2, self._retry_max_s)
                continue
            delay = self._retry_initial_s
        if self._dropped_in_outage:
            log.error("charge spool replayed: %d charges were dropped", self._dropped_in_outage)
        else:
            log.info("charge spool replayed")
        self._dropped_in_outage = 0

    async def _drain(self) -> None:
        """Settle spooled charges oldest first; stops at the first failure (raising it)."""
        while self._spool:
            charge = self._spool.popleft()
            if time.monotonic() - charge.spooled_s > self._max_age_s:
                # The store may have forgotten this id: a replay could charge it twice.
                self._metrics.spool_dropped.inc()
                self._dropped_in_outage += 1
                log.error("spooled charge older than store.dedupe_ttl_s: dropped, not replayed")
                continue
            try:
                applied = await self._timed("settle", charge.apply(self._inner))
            except (StoreUnavailable, asyncio.CancelledError):
                # Back to the front; if the spool filled up meanwhile it is the oldest: drop it.
                if len(self._spool) >= self._spool_size:
                    self._metrics.spool_dropped.inc()
                    self._dropped_in_outage += 1
                else:
                    self._spool.appendleft(charge)
                raise
            except Exception as exc:
                # A charge the store rejects for good must not block every charge behind it.
                self._metrics.spool_dropped.inc()
                log.error("spooled charge rejected by the store: dropped: %s", type(exc).__name__)
            else:
                if not applied:
                    self._metrics.settle_duplicates.inc()  # its first attempt had landed
            finally:
                self._metrics.spool_depth.set(len(self._spool))
