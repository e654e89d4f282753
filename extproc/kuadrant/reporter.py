"""Reports charges to Limitador off the hot path: queued, summed per counter, sent with retries.

``submit`` is all the charge path does: it filters by mode and appends to a bounded queue. A
background task wakes on new charges, waits ``batch_interval_s`` so that hits of one counter
(domain, tier, user, model) are summed into one ``Report``, resolves each counter against the
limits Limitador lists for the domain (never blind: no discovered limit, no report), and sends the
Reports concurrently. UNAVAILABLE and transport errors keep the hits for a retry with backoff;
meanwhile new charges wait in the queue, and what no longer fits is dropped and counted. Other
errors, and DEADLINE_EXCEEDED (the hits may have landed: a retry could count them twice), give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from extproc.config import KuadrantConfig
from extproc.domain import Charge
from extproc.kuadrant import service
from extproc.kuadrant.descriptors import (
    Entries,
    limit_identifier,
    metric_labels,
    report_entries,
    subscription_limit,
)
from extproc.kuadrant.limitador import (
    LimitadorLimits,
    LimitadorUnavailable,
    counter_entries,
    match_limit,
)
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.kuadrant")

MAX_HITS_ADDEND = 2**32 - 1  # hits_addend is a uint32
MAX_CONCURRENT_REPORTS = 16
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def is_gap(charge: Charge) -> bool:
    """Whether Kuadrant's wasm filter charges this response 0 while we charge it tokens.

    The wasm filter's Report action takes ``hits_addend`` from ``usage.total_tokens`` of the
    response body once the body has ended, whatever the status (kuadrant-operator
    ``internal/controller/ratelimit_workflow_helpers.go`` at ae698811,
    ``wasmActionSpecsFromTokenLimit``; wasm-shim ``crates/kuadrant-filter/src/kuadrant/pipeline/
    tasks/token_usage.rs`` at af0f9b45, which waits for the end of stream). So only aborted
    streams and responses without usage (our flagged estimates) cost it nothing: an upstream
    error that reports usage is already charged by Kuadrant.
    """
    return charge.disconnected or charge.usage.estimated


@dataclass(frozen=True, slots=True)
class Counter:
    """One Limitador counter to add hits to, before its limit is looked up."""

    domain: str
    tier: str
    userid: str
    model: str
    # The subscription era: the subscription "<ns>/<name>" and its tokenMetadata (labels).
    subscription: str = ""
    organization_id: str = ""
    cost_center: str = ""


# selected_subscription_key -> (policy "<namespace>/<name>", limit) the watched policies declare
DeclaredLimit = Callable[[str], "tuple[str, str] | None"]


class Reporter:
    """Feeds charges into Kuadrant's Limitador (``kuadrant.mode`` gaps or all)."""

    def __init__(
        self,
        config: KuadrantConfig,
        metrics: Metrics,
        limits: LimitadorLimits,
        limit_name_for: Callable[[str], str],
        *,
        declared: DeclaredLimit = lambda _key: None,
        channel: grpc.aio.Channel | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._limits = limits
        self._limit_name_for = limit_name_for
        self._declared = declared
        self._channel = channel
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._all = config.mode == "all"
        self._queue: deque[tuple[Counter, int]] = deque()
        self._pending: dict[Counter, int] = {}  # summed hits waiting to be sent (or retried)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()  # set by close: cuts the batch wait short
        self._warned: set[tuple[str, str, str]] = set()
        self._stub: service.RateLimitServiceStub | None = None
        self._dropped = metrics.kuadrant_reports.labels("dropped")

    # ------------------------------------------------------------------ the hot path

    def submit(self, charge: Charge) -> None:
        """Queue a finished response's tokens, if this mode reports it. Never blocks, never raises."""
        tokens = charge.usage.total()
        if tokens <= 0 or self._closing:  # Report counts 0 as 1: nothing to say
            return
        if not (self._all or is_gap(charge)):
            return
        if len(self._queue) >= self._config.queue_size:
            self._dropped.inc()
            return
        counter = Counter(
            charge.route,
            charge.tier,
            charge.userid,
            charge.model,
            charge.subscription,
            charge.organization_id,
            charge.cost_center,
        )
        self._queue.append((counter, tokens))
        if self._task is None:
            self.start()
        if not self._wake.is_set():
            self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the sending task on the running loop (idempotent)."""
        if self._task is None:
            if self._channel is None:
                self._channel = grpc.aio.insecure_channel(self._config.limitador_grpc)
            self._stub = service.RateLimitServiceStub(self._channel)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="kuadrant-reporter"
            )

    @property
    def depth(self) -> int:
        """Charges queued plus counters waiting to be sent."""
        return len(self._queue) + len(self._pending)

    async def close(self) -> None:
        """Deliver what is queued within ``flush_timeout_s``; count the rest as dropped."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._config.flush_timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.depth:
                log.warning("kuadrant reports dropped at shutdown: pending=%d", self.depth)
                self._dropped.inc(self.depth)
                self._queue.clear()
                self._pending.clear()
            self._update_depth()
        if self._channel is not None:
            await self._channel.close()
        await self._limits.close()

    # ------------------------------------------------------------------ the sending task

    async def _run(self) -> None:
        backoff = self._backoff_s
        while True:
            if not self._queue and not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                with contextlib.suppress(TimeoutError):  # let hits gather, unless closing
                    await asyncio.wait_for(self._closed.wait(), self._config.batch_interval_s)
            if not self._pending:  # while retrying, new charges wait in the bounded queue
                self._take_queue()
            self._update_depth()
            retry = await self._send_pending()
            self._update_depth()
            if retry:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            else:
                backoff = self._backoff_s

    def _take_queue(self) -> None:
        while self._queue:
            key, tokens = self._queue.popleft()
            self._pending[key] = self._pending.get(key, 0) + tokens

    async def _send_pending(self) -> bool:
        """Send every pending counter once; True when some must be retried."""
        limit = asyncio.Semaphore(MAX_CONCURRENT_REPORTS)

        async def one(key: Counter, hits: int) -> bool:
            async with limit:
                return await self._send(key, hits)

        batch = list(self._pending.items())
        results = await asyncio.gather(*(one(key, hits) for key, hits in batch))
        return not all(results)

    async def _send(self, key: Counter, hits: int) -> bool:
        """Report one counter's hits; True when done with it (sent or given up)."""
        try:
            request = await self._request(key, hits)
        except LimitadorUnavailable as exc:
            self._note(key, "limits_unavailable", str(exc))
            return False
        if request is None:
            del self._pending[key]
            return True
        assert self._stub is not None
        try:
            while hits > 0:
                addend = min(hits, MAX_HITS_ADDEND)
                request.hits_addend = addend
                await self._stub.Report(request, timeout=self._config.timeout_s)
                hits -= addend
                self._pending[key] = hits
                self._metrics.kuadrant_reports.labels("sent").inc()
        except grpc.aio.AioRpcError as exc:
            self._metrics.kuadrant_reports.labels("failed").inc()
            if exc.code() in _RETRYABLE:
                self._note(key, "unavailable", exc.code().name)
                return False
            log.error(
                "kuadrant report failed, not retried: domain=%s user=%s tokens=%d code=%s",
                key.domain,
                key.userid,
                hits,
                exc.code().name,
            )
            self._dropped.inc()
        del self._pending[key]
        return True

    async def _request(self, key: Counter, hits: int) -> rls_pb2.RateLimitRequest | None:
        """The Report for a counter, or None (counted as skipped) when no discovered limit fits."""
        config = self._config
        if not key.domain:
            return self._skip(key, "no_route")
        if not key.userid:
            return self._skip(key, "no_user")
        policy_namespace, policy_name, limit_name = self._limit_of(key)
        if not limit_name:
            return self._skip(key, "no_limit")
        identifier = limit_identifier(policy_namespace, policy_name, limit_name)
        target = match_limit(
            await self._limits.limits(key.domain), identifier, config.counter_expression
        )
        if target.reason:
            return self._skip(key, target.reason, identifier)
        counters = counter_entries(target, {config.counter_expression: key.userid})
        labels = metric_labels(
            key.userid,
            key.tier,
            key.model,
            key.subscription,
            key.organization_id,
            key.cost_center,
        )
        return build_request(key.domain, report_entries(identifier, counters), labels, hits)

    def _limit_of(self, key: Counter) -> tuple[str, str, str]:
        """(policy namespace, policy name, limit name) the counter's tokens go into ("" limit:
        none). Tier era: the configured policy's limit for the tier. Subscription era: the model's
        policy, as the watched policies declare it, else as MaaS's controller names it."""
        if not key.subscription:
            config = self._config
            return config.policy_namespace, config.policy_name, self._limit_name_for(key.tier)
        declared = self._declared(f"{key.subscription}@{key.model}")
        if declared is not None:
            (namespace, _, name), limit = declared[0].partition("/"), declared[1]
            return namespace, name, limit
        if not key.model:
            return "", "", ""  # the unsubscribed: the default deny, nothing to report into
        return subscription_limit(key.subscription, key.model, key.domain)

    def _skip(
        self, key: Counter, reason: str, identifier: str = ""
    ) -> rls_pb2.RateLimitRequest | None:
        """Count and log a counter that cannot be reported; always None."""
        self._metrics.kuadrant_skipped.labels(reason).inc()
        self._note(key, reason, identifier)
        return None

    def _note(self, key: Counter, reason: str, detail: str) -> None:
        """Log the first occurrence per (domain, tier, reason): one line, not one per charge."""
        seen = (key.domain, key.subscription or key.tier, reason)
        if seen in self._warned:
            return
        self._warned.add(seen)
        log.warning(
            "kuadrant report held back: reason=%s domain=%s %s=%s detail=%s",
            reason,
            key.domain or "-",
            "subscription" if key.subscription else "tier",
            key.subscription or key.tier,
            detail,
        )

    def _update_depth(self) -> None:
        self._metrics.kuadrant_queue_depth.set(self.depth)


def build_request(
    domain: str, counters: Entries, labels: Entries, hits: int
) -> rls_pb2.RateLimitRequest:
    """A RateLimitRequest: descriptors[0] the counter, descriptors[1] the metric labels."""
    descriptors = [_descriptor(counters)]
    if labels:
        descriptors.append(_descriptor(labels))
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


def _descriptor(entries: Entries) -> ratelimit_pb2.RateLimitDescriptor:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    return ratelimit_pb2.RateLimitDescriptor(entries=[entry(key=k, value=v) for k, v in entries])
