"""Settles finished responses in tasks of their own: a charge, once known, is never lost to a cancel.

Envoy resets an ext_proc stream as soon as it has its last reply, and grpc.aio then cancels the
handler at whatever it was awaiting (CONTRACTS §11). So the settle never runs in the handler: it
runs in a task the charger owns, the handler waits for it only a moment, and shutdown waits for
every task still running (``drain``). Metrics and the Kuadrant report are taken from the settled
outcome, after the store has applied the charge or spooled it for replay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from extproc.accounting.pricing import NO_PRICES, PriceBook, priced
from extproc.domain import Charge
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.charge")


class ChargeSink(Protocol):
    """Takes a copy of every charge without blocking (the Kuadrant reporter queues it)."""

    def submit(self, charge: Charge) -> None: ...


class FanOut:
    """Hands every charge to each of several sinks, in order (the Kuadrant reporter, telemetry)."""

    def __init__(self, *sinks: ChargeSink) -> None:
        self._sinks = sinks

    def submit(self, charge: Charge) -> None:
        for sink in self._sinks:
            sink.submit(charge)


def fan_out(*sinks: ChargeSink | None) -> ChargeSink | None:
    """One sink for the given ones that are set: None, the only one, or a ``FanOut``."""
    present = tuple(sink for sink in sinks if sink is not None)
    if len(present) < 2:
        return present[0] if present else None
    return FanOut(*present)


async def _within(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for ``task`` at most ``timeout_s``: what ``asyncio.wait((task,), timeout=...)`` does
    for one task, without its argument checks and result sets (a few µs on every settle). A
    cancel ends the wait only: ``task`` keeps running."""
    loop = task.get_loop()
    waiter = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(timeout_s, wake, None)
    task.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)


class Charger:
    def __init__(
        self,
        limiter: Limiter,
        metrics: Metrics,
        reports: ChargeSink | None = None,
        *,
        wait_s: float = 0.1,
        prices: PriceBook = NO_PRICES,
    ) -> None:
        self._limiter = limiter
        self._prices = prices
        self._metrics = metrics
        self._reports = reports
        self._wait_s = wait_s
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, charge: Charge) -> asyncio.Task[None]:
        """Price ``charge`` (once, here), then settle it in a task that outlives the caller;
        returns at once."""
        task = asyncio.get_running_loop().create_task(self._settle(priced(charge, self._prices)))
        self._tasks.add(task)
        self._metrics.charges_pending.inc()
        task.add_done_callback(self._done)
        return task

    async def charge(self, charge: Charge) -> None:
        """Start the settle, then wait for it up to ``wait_s``; a cancel here never cancels it."""
        task = self.start(charge)
        if self._wait_s > 0:
            await _within(task, self._wait_s)

    async def drain(self) -> None:
        """Wait for every settle still running (graceful stop), including ones started meanwhile."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._metrics.charges_pending.dec()

    async def _settle(self, charge: Charge) -> None:
        try:
            applied = await self._limiter.settle(charge)
        except Exception as exc:  # a task of our own: nobody else would see it
            self._metrics.internal_errors.labels("settle").inc()
            log.error(
                "charge not settled: %s user=%s tokens=%d",
                type(exc).__name__,
                charge.userid,
                charge.usage.total(),
            )
            return
        if not applied:
            return  # the store had this request's charge already: count it once
        self._metrics.charged(charge)
        if charge.reserved_tokens and charge.usage.total() > charge.reserved_tokens:
            self._metrics.reservation_exceeded.labels(charge.plan).inc()
        if self._reports is not None:
            self._reports.submit(charge)  # only enqueues: reports leave the hot path
