"""Pushes charge records as CloudEvents over HTTP, from the export stream, off the request path.

Structured content mode of the CloudEvents HTTP binding: one POST per event, the whole event
(attributes and ``data``) in a JSON body with ``Content-Type: application/cloudevents+json``
(cloudevents/spec, cloudevents/bindings/http-protocol-binding.md §3.2 and
cloudevents/formats/json-format.md, commit 83a8bd9150de032b4788be72341c5f5f767df92e; spec 1.0:
``id``, ``source``, ``specversion`` and ``type`` are required, ``time`` is RFC 3339).

The pusher reads the stream with a consumer group of its own (``export.cloudevents.group``), so
the stream is the spool: a record is acknowledged only once the receiver took it (2xx) or refused
its content for good (400, 413, 415, 422: dropped and counted). Anything else (no connection, a
timeout, 408, 429, 5xx, and statuses that mean a wrong URL or credentials) is retried with
exponential backoff, for as long as the stream keeps the record; a sidecar that stops or dies
leaves its unacknowledged records pending, and reads them first when it starts again. At most
``spool_size`` records are held in memory at once (read in batches of up to 100), and
``concurrency`` POSTs are in flight (1: one at a time, in the stream's order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

import aiohttp

from extproc.config import CloudEventsConfig, redact_url
from extproc.errors import StoreUnavailable
from extproc.export import record as charge_record
from extproc.export.stream import Entry, GroupReader, NoGroup, RecordStream
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.export.cloudevents")

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
REFUSED = frozenset({400, 413, 415, 422})  # the receiver will never take this event's content
_BLOCK_MS = 1000


def to_event(record: dict[str, Any], entry: Entry, settings: CloudEventsConfig) -> dict[str, Any]:
    """The CloudEvent of one record: ``id`` is the request id (the stream entry without one)."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": record.get("request_id") or f"{entry.stream}/{entry.id}",
        "source": settings.source,
        "type": settings.type,
        "datacontenttype": "application/json",
    }
    if isinstance(record.get("time"), str):
        event["time"] = record["time"]
    event["data"] = record
    return event


class CloudEventsPusher:
    """One background task: read a batch, POST each record until it is taken or refused (up to
    ``concurrency`` at once), acknowledge each as it is done, read the next batch."""

    def __init__(
        self,
        source: RecordStream,
        settings: CloudEventsConfig,
        metrics: Metrics,
        *,
        close_source: bool = True,
    ) -> None:
        self._source = source
        self._settings = settings
        self._metrics = metrics
        self._close_source = close_source
        self._consumer = settings.consumer or socket.gethostname() or "maas-extproc"
        self._reader = GroupReader(
            source,
            settings.group,
            self._consumer,
            from_start=settings.from_start,
            claim_idle_ms=int(settings.claim_idle_s * 1000),
            batch=min(settings.spool_size, 100),
        )
        self._where = redact_url(str(settings.url))
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failing = 0  # consecutive failed attempts: one log line when a streak starts
        self._trimmed = 0  # of the reader's trimmed records, those counted already
        self._slots = asyncio.Semaphore(settings.concurrency)  # POSTs in flight

    async def start(self) -> None:
        """Create the group before the first request, so no record of this run comes before it
        (a new group starts at the newest record); a store down now leaves that to the task."""
        try:
            await self._reader.prepare()
        except StoreUnavailable as exc:
            log.warning("cloudevents: export stream unavailable at start: %s", exc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cloudevents")

    async def close(self) -> None:
        """Stop now; what was read and not acknowledged stays pending for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._close_source:
            await self._source.close()
        self._metrics.cloudevents_spool.set(0)

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s)
        )
        while True:
            try:
                await self._push()
            except Exception as exc:  # a task of our own: nobody else would see it
                self._metrics.internal_errors.labels("cloudevents").inc()
                log.error("cloudevents: pusher failed: %s: restarting", type(exc).__name__)
                await asyncio.sleep(self._settings.retry_max_s)

    async def _push(self) -> None:
        delay = self._settings.retry_initial_s
        while True:
            try:
                entries = await self._reader.next_batch(_BLOCK_MS)
            except StoreUnavailable as exc:
                log.warning("cloudevents: export stream unavailable: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max_s)
                continue
            delay = self._settings.retry_initial_s
            if self._reader.trimmed > self._trimmed:
                lost, self._trimmed = self._reader.trimmed - self._trimmed, self._reader.trimmed
                self._metrics.cloudevents.labels("dropped").inc(lost)
                log.error("cloudevents: %d records trimmed before they were pushed", lost)
            self._metrics.cloudevents_spool.set(len(entries))
            if self._settings.concurrency == 1:
                for entry in entries:
                    await self._handle(entry)
            else:
                await asyncio.gather(*(self._handle(entry) for entry in entries))

    async def _handle(self, entry: Entry) -> None:
        async with self._slots:
            await self._deliver(entry)
            await self._ack(entry)
            self._metrics.cloudevents_spool.dec()

    async def _deliver(self, entry: Entry) -> None:
        try:
            record = charge_record.decode(entry.record)
        except charge_record.BadRecord as exc:
            self._metrics.cloudevents.labels("dropped").inc()
            log.error("cloudevents: entry %s dropped: %s", entry.id, exc)
            return
        body = json.dumps(to_event(record, entry, self._settings)).encode()
        delay = self._settings.retry_initial_s
        while True:
            wait = await self._post(body, entry.id)
            if wait is None:
                return
            await asyncio.sleep(max(delay, wait))
            delay = min(delay * 2, self._settings.retry_max_s)

    async def _post(self, body: bytes, entry_id: str) -> float | None:
        """One attempt: None when done (sent or refused), else the Retry-After to honour (0)."""
        assert self._session is not None
        try:
            async with self._session.post(
                str(self._settings.url),
                data=body,
                headers={"Content-Type": CONTENT_TYPE},
                allow_redirects=False,
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After", "")
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(f"{type(exc).__name__}")
            return 0.0
        if 200 <= status < 300:
            self._metrics.cloudevents.labels("sent").inc()
            if self._failing:
                log.info("cloudevents: delivering again after %d failed attempts", self._failing)
                self._failing = 0
            return None
        if status in REFUSED:
            self._metrics.cloudevents.labels("dropped").inc()
            log.error("cloudevents: %s refused entry %s: HTTP %d", self._where, entry_id, status)
            return None
        self._failed(f"HTTP {status}")
        seconds = retry_after.strip()
        return min(float(seconds), self._settings.retry_max_s) if seconds.isdigit() else 0.0

    def _failed(self, why: str) -> None:
        self._metrics.cloudevents.labels("failed").inc()
        self._failing += 1
        if self._failing == 1:
            log.warning("cloudevents: %s failed: %s: retrying with backoff", self._where, why)

    async def _ack(self, entry: Entry) -> None:
        delay = self._settings.retry_initial_s
        while True:
            try:
                await self._reader.ack([entry])
                return
            except NoGroup:
                return  # the group went with the stream (a Redis without persistence restarted)
            except StoreUnavailable as exc:
                log.warning("cloudevents: acknowledge failed (retrying): %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max_s)
