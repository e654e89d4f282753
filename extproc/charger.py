"""Settles finished responses: swaps reservations for actual usage, records metrics, never raises."""

from __future__ import annotations

import logging
from typing import Protocol

from extproc.domain import Charge
from extproc.errors import StoreUnavailable
from extproc.limits.limiter import Limiter
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.charge")


class ChargeSink(Protocol):
    """Takes a copy of every charge without blocking (the Kuadrant reporter queues it)."""

    def submit(self, charge: Charge) -> None: ...


class Charger:
    def __init__(
        self, limiter: Limiter, metrics: Metrics, reports: ChargeSink | None = None
    ) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._reports = reports

    async def charge(self, charge: Charge) -> None:
        self._metrics.charged(charge)
        if self._reports is not None:
            self._reports.submit(charge)  # only enqueues: reports leave the hot path
        try:
            await self._limiter.settle(charge)
        except StoreUnavailable:
            self._metrics.store_errors.labels("settle").inc()
            log.error(
                "charge lost: store unavailable user=%s tokens=%d",
                charge.userid,
                charge.usage.total(),
            )
