"""Soft-limit events and shadow-mode reports of budgets, off the request path.

A request that finds a budget at or past one of its ``soft`` thresholds hands a candidate event
to ``BudgetAlerts.reached``, which only remembers and queues it (bounded; a full queue drops it
and counts ``maas_budget_events_total{result="dropped"}``). A background task claims the event's
key in the store (``SET NX`` with a TTL to the period's end), so across every replica one event
goes out per (budget, subject, period, threshold); only the claimer counts
``maas_budget_threshold_crossed_total`` and POSTs the event as JSON to ``limits.alerts.webhook_url``,
retried with backoff (``attempts``, each within ``timeout``). Delivery is at most once: an event
whose attempts all fail, or whose replica stops, is logged and counted as failed, never retried
by another replica. Nothing here can refuse or slow a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.errors import StoreUnavailable
from extproc.limits.budget_counters import BudgetCounter
from extproc.limits.budgets import AlertsConfig
from extproc.limits.periods import PERIOD_GRACE_MS
from extproc.observability.metrics import Metrics
from extproc.store import keys
from extproc.store.base import CounterStore

log = logging.getLogger("extproc.limits.alerts")

_SEEN_SIZE = 100_000
_LOG_EVERY_S = 60.0  # one "would refuse" line per budget per minute per process


@dataclass(frozen=True, slots=True)
class Event:
    key: str  # keys.alert_key: claimed once across replicas
    ttl_ms: int
    budget: str
    threshold: int
    body: dict[str, Any]


def _rfc3339(ms: int) -> str:
    stamp = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BudgetAlerts:
    """``limiter.BudgetEvents``: metrics, rate-limited log lines and the webhook queue."""

    def __init__(
        self,
        store: CounterStore,
        metrics: Metrics,
        config: AlertsConfig,
        clock_ms: Callable[[], int],
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._config = config
        self._clock_ms = clock_ms
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._seen: set[str] = set()
        self._queue: asyncio.Queue[Event] = asyncio.Queue(config.queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # budget -> (last line, since then)

    def would_refuse(self, counter: BudgetCounter, value: int) -> None:
        budget = counter.budget
        self._metrics.budget_would_refuse.labels(budget.name).inc()
        now = time.monotonic()
        last, quiet = self._logged.get(budget.name, (-_LOG_EVERY_S, 0))
        if now - last < _LOG_EVERY_S:
            self._logged[budget.name] = (last, quiet + 1)
            return
        self._logged[budget.name] = (now, 0)
        log.warning(
            "budget would refuse (shadow mode) budget=%s scope=%s subject=%s value=%d limit=%d "
            "unlogged_since_last=%d",
            budget.name,
            budget.scope,
            counter.subject,
            value,
            budget.limit,
            quiet,
        )

    def reached(
        self, counter: BudgetCounter, threshold: int, period_key: str, value: int, end_ms: int
    ) -> None:
        key = keys.alert_key(period_key, threshold)
        if key in self._seen:
            return
        if len(self._seen) >= _SEEN_SIZE:
            self._seen.clear()
        budget = counter.budget
        now = self._clock_ms()
        body = {
            "type": "budget.threshold_reached",
            "budget": budget.name,
            "scope": budget.scope,
            "subject": counter.subject,
            "unit": budget.unit,
            "limit": budget.limit,
            "threshold_percent": threshold,
            "value": value,
            "mode": "enforce" if budget.enforce else "shadow",
            "period": period_key.rpartition(":")[2] if budget.calendar else budget.period_name,
            "period_end": _rfc3339(end_ms),
            "time": _rfc3339(now),
        }
        event = Event(key, max(1, end_ms - now) + PERIOD_GRACE_MS, budget.name, threshold, body)
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.budget_events.labels("dropped").inc()
            return  # not remembered: a later request may queue it again
        self._seen.add(key)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def depth(self) -> int:
        return self._queue.qsize()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Deliver what is queued within ``timeout_s``, then stop."""
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            except Exception as exc:  # a task of our own: nobody else would see it
                log.error("budget event failed: %s budget=%s", type(exc).__name__, event.budget)
            finally:
                self._queue.task_done()

    async def _deliver(self, event: Event) -> None:
        claimed = await self._claim(event)
        if not claimed:
            return  # another replica (or this one, earlier) sent it
        self._metrics.budget_threshold_crossed.labels(event.budget, str(event.threshold)).inc()
        body = event.body
        log.info(
            "budget threshold reached budget=%s subject=%s threshold=%d%% value=%d limit=%d",
            event.budget,
            body["subject"],
            event.threshold,
            body["value"],
            body["limit"],
        )
        if self._config.webhook_url:
            sent = await self._post(event)
            self._metrics.budget_events.labels("sent" if sent else "failed").inc()

    async def _claim(self, event: Event) -> bool:
        backoff = self._backoff_s
        for attempt in range(self._config.attempts):
            try:
                return await self._store.claim(event.key, event.ttl_ms, self._clock_ms())
            except StoreUnavailable:
                if attempt + 1 < self._config.attempts:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)
        log.warning("budget event not claimed (store unavailable) budget=%s", event.budget)
        return False

    async def _post(self, event: Event) -> bool:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        data = json.dumps(event.body, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "idempotency-key": event.key}
        backoff = self._backoff_s
        status = "none"
        for attempt in range(self._config.attempts):
            try:
                async with self._session.post(
                    self._config.webhook_url, data=data, headers=headers
                ) as reply:
                    status = str(reply.status)
                    if 200 <= reply.status < 300:
                        return True
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status = type(exc).__name__
            if attempt + 1 < self._config.attempts:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
        log.warning(
            "budget webhook failed budget=%s attempts=%d last=%s",
            event.budget,
            self._config.attempts,
            status,
        )
        return False
