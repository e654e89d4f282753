"""The CloudEvents pusher against a local receiver that fails its first attempts.

The receiver is written from the CloudEvents spec, not from our encoder: structured content mode
of the HTTP binding (cloudevents/spec, cloudevents/bindings/http-protocol-binding.md §3.2.1: the
Content-Type is the event format's media type, ``application/cloudevents+json``; commit
83a8bd9150de032b4788be72341c5f5f767df92e), and spec 1.0's required attributes ``id``, ``source``,
``specversion`` ("1.0") and ``type``, non-empty strings (cloudevents/spec.md, "Required
Attributes"), ``id`` + ``source`` identifying an event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from extproc.config import CloudEventsConfig, ExportStreamConfig, Secret, StoreConfig
from extproc.domain import Charge, Usage
from extproc.export import record
from extproc.export.cloudevents import CloudEventsPusher
from extproc.export.stream import GroupReader, MemoryRecords, redis_records
from extproc.observability.metrics import Metrics
from extproc.store import ledger
from extproc.store.base import CounterStore
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.redis_fixtures import RedisServer

REQUIRED = ("id", "source", "specversion", "type")


@dataclass
class Receiver:
    """Takes structured-mode CloudEvents; answers ``failures`` first (then 2xx)."""

    failures: list[int] = field(default_factory=list)  # statuses to answer, in order, first
    events: list[dict[str, Any]] = field(default_factory=list)  # accepted
    attempts: int = 0
    delay_s: float = 0.0  # answer this late
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.failures:
            return web.Response(status=self.failures.pop(0))
        media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media != "application/cloudevents+json":
            return web.Response(status=415)
        event = json.loads(body)
        if not all(isinstance(event.get(a), str) and event[a] for a in REQUIRED):
            return web.Response(status=400)
        if event["specversion"] != "1.0":
            return web.Response(status=400)
        self.events.append(event)
        return web.Response(status=202)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    app = web.Application()
    app.router.add_post("/events", made.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    made.url = f"http://127.0.0.1:{port}/events"
    yield made
    await runner.cleanup()


def settings(url: str, **kw: Any) -> CloudEventsConfig:
    base: dict[str, Any] = {
        "url": Secret(url),
        "consumer": "sidecar-0",
        "concurrency": 1,  # one at a time: the stream's order
        "retry_initial_s": 0.01,
        "retry_max_s": 0.05,
        "timeout_s": 10.0,  # a loaded test machine: a timed-out POST is sent again
    }
    return CloudEventsConfig(**{**base, **kw})


async def charge(store: CounterStore, request_id: str, now: int = 1_796_127_018_372) -> None:
    c = Charge("bob", "premium", "m1", Usage(2, 3, 5), request_id=request_id)
    entry = ledger.entry_for(c, now)
    await store.settle([], entry, now, request_id=request_id, record=record.encode_charge(c, now))


async def until(check: Any, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def count(metrics: Metrics, result: str) -> float:
    return metrics.cloudevents.labels(result)._value.get()


def done(metrics: Metrics, sent: int) -> bool:
    """``sent`` events taken and every record read acknowledged (the receiver keeps an event
    before it answers, so its list alone runs ahead of the pusher)."""
    return count(metrics, "sent") == sent and metrics.cloudevents_spool._value.get() == 0


async def test_events_are_retried_until_taken_and_each_is_taken_once(receiver: Receiver) -> None:
    records = MemoryRecords()
    store = MemoryStore(records=records)
    metrics = Metrics()
    receiver.failures = [503, 500, 429]
    pusher = CloudEventsPusher(records, settings(receiver.url), metrics)
    await pusher.start()
    try:
        for n in range(5):
            await charge(store, f"r{n}")
        await until(lambda: done(metrics, 5))
    finally:
        await pusher.close()
    assert [e["id"] for e in receiver.events] == [f"r{n}" for n in range(5)]  # in order, once
    event = receiver.events[0]
    assert event["type"] == "io.maas.usage.charge.v1"
    assert event["source"] == "/maas-extproc"
    assert event["time"] == "2026-12-01T12:10:18.372Z"
    assert event["datacontenttype"] == "application/json"
    assert event["data"]["request_id"] == "r0"
    assert event["data"]["charged_tokens"] == 5
    assert event["data"]["cached_tokens"] is None
    assert (count(metrics, "sent"), count(metrics, "dropped")) == (5, 0)
    # The three refusals, and any attempt lost on a kept-alive connection the server closed.
    assert count(metrics, "failed") >= 3
    assert receiver.attempts >= 8


async def test_an_event_the_receiver_refuses_is_dropped_and_counted(receiver: Receiver) -> None:
    records = MemoryRecords()
    store = MemoryStore(records=records)
    metrics = Metrics()
    receiver.failures = [400]
    pusher = CloudEventsPusher(records, settings(receiver.url), metrics)
    await pusher.start()
    try:
        records.append("not a record", 1)  # dropped as well: it never becomes an event
        await charge(store, "refused")
        await charge(store, "taken")
        await until(lambda: done(metrics, 1))
    finally:
        await pusher.close()
    assert [e["id"] for e in receiver.events] == ["taken"]
    assert count(metrics, "dropped") == 2


async def test_a_sidecar_restart_while_the_receiver_is_down_loses_nothing(
    receiver: Receiver, redis_server: RedisServer
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/5"
    redis_server.cli_command("-n", "5", "flushdb")
    store = RedisStore.from_config(StoreConfig(url=Secret(url)), ExportStreamConfig())
    receiver.failures = [503] * 1000  # down until we say so
    first = CloudEventsPusher(
        redis_records(url, "maas:export", 5.0), settings(receiver.url), Metrics()
    )
    await first.start()
    try:
        for n in range(3):
            await charge(store, f"r{n}")
        await until(lambda: receiver.attempts >= 3)
    finally:
        await first.close()  # the sidecar stops with r0 read and never delivered
    await charge(store, "r3")  # charged while no pusher runs
    receiver.failures = []
    metrics = Metrics()
    second = CloudEventsPusher(
        redis_records(url, "maas:export", 5.0), settings(receiver.url), metrics
    )
    await second.start()
    try:
        await until(lambda: done(metrics, 4))
        await asyncio.sleep(0.2)  # nothing more comes
    finally:
        await second.close()
        await store.close()
    assert [e["id"] for e in receiver.events] == ["r0", "r1", "r2", "r3"]
    pending = redis_server.cli_command("-n", "5", "xpending", "maas:export", "cloudevents")
    assert pending.split()[0] == "0"


async def test_several_events_are_in_flight_at_once_and_each_is_taken_once(
    receiver: Receiver,
) -> None:
    records = MemoryRecords()
    store = MemoryStore(records=records)
    metrics = Metrics()
    receiver.delay_s = 0.05
    receiver.failures = [503, 503]
    pusher = CloudEventsPusher(records, settings(receiver.url, concurrency=4), metrics)
    await pusher.start()
    try:
        for n in range(12):
            await charge(store, f"c{n}")
        await until(lambda: done(metrics, 12))
    finally:
        await pusher.close()
    assert sorted(e["id"] for e in receiver.events) == sorted(f"c{n}" for n in range(12))
    assert 1 < receiver.most_in_flight <= 4
    assert count(metrics, "sent") == 12


async def test_the_sidecars_pusher_reads_the_memory_stores_stream(receiver: Receiver) -> None:
    from extproc.app import build_pusher, build_store
    from extproc.config import parse

    config = parse(
        {"export": {"cloudevents": {"url": receiver.url, "retry_initial_s": 0.01}}},
        serving=False,
    )
    metrics = Metrics()
    store = build_store(config, metrics)  # memory://, behind the failure policy
    pusher = build_pusher(config, store, metrics)
    assert pusher is not None
    await pusher.start()
    try:
        await charge(store, "wired")
        await until(lambda: len(receiver.events) == 1)
    finally:
        await pusher.close()
        await store.close()
    assert receiver.events[0]["id"] == "wired"


async def test_records_trimmed_before_they_were_pushed_are_counted_dropped(
    receiver: Receiver, redis_server: RedisServer
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/6"
    redis_server.cli_command("-n", "6", "flushdb")
    store = RedisStore.from_config(StoreConfig(url=Secret(url)), ExportStreamConfig(maxlen=0))
    # The pusher's group is made (as its start does), then the sidecar is gone for a while.
    # No pusher runs it here: a cancelled blocking read could still take entries in Redis.
    source = redis_records(url, "maas:export", 5.0)
    await GroupReader(source, "cloudevents", "sidecar-0").prepare()
    await source.close()
    for n in range(30):
        await charge(store, f"t{n}")
    await store.close()
    redis_server.cli_command("-n", "6", "xtrim", "maas:export", "MAXLEN", "10")
    metrics = Metrics()
    second = CloudEventsPusher(
        redis_records(url, "maas:export", 5.0), settings(receiver.url), metrics
    )
    await second.start()
    try:
        await until(lambda: len(receiver.events) == 10)
    finally:
        await second.close()
    assert [e["id"] for e in receiver.events] == [f"t{n}" for n in range(20, 30)]
    assert count(metrics, "dropped") == 20
