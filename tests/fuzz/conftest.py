"""One real sidecar per fuzz property: the app's Server on a loopback port, memory store, usage API.

Nothing is mocked: Check and Process are driven by a grpc.aio client as Envoy would drive them,
the usage API by an HTTP client. ``Running.counters`` reads the token windows and the ledger
through the store's own interface, for the "no counter ever lowered" invariant.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import pytest

from extproc.app import Server, Sidecar, now_ms
from extproc.config import Config
from extproc.domain import Limits
from extproc.limits.limiter import Limiter
from extproc.observability.usage_api import UsageApi
from extproc.store.base import WindowCounter
from tests.helpers import local_config
from tests.redis_fixtures import free_port

# (userid, tier) of every demo key that has a tier: the counters a request may touch.
USERS = (("alice", "free"), ("admin", "free"), ("bob", "premium"), ("carol", "enterprise"))
# Status codes a client may get from admission here: the store is up, no dependency is down,
# so neither 503 nor 500 is ever a defined answer. 404: a model path that is no route of ours
# (routes.unclassified: refuse).
CHECK_STATUSES = frozenset({200, 400, 401, 403, 404, 429})


def fuzz_config() -> Config:
    """The demo config, with premium and enterprise practically unlimited so most requests go
    through to the response path; free keeps its tiny limits so 429s happen too."""
    config = local_config()
    big = Limits(requests=0, tokens=10**12, tokens_window_s=60)
    tiers = {**config.limits.tiers, "premium": big, "enterprise": big}
    return replace(config, limits=replace(config.limits, tiers=tiers))


@dataclass
class Snapshot:
    """Each user's token windows as (value, window start) and their ledger total for today."""

    windows: dict[tuple[str, str], tuple[tuple[int, int], ...]]
    ledger: dict[str, int]

    def not_lowered_from(self, before: Snapshot) -> list[str]:
        """Every counter that went down (a window that restarted in between is not compared)."""
        problems = []
        for who, states in self.windows.items():
            for (value, start), (old, old_start) in zip(states, before.windows[who], strict=True):
                if start == old_start and value < old:
                    problems.append(f"window {who}: {old} -> {value}")
        for user, total in self.ledger.items():
            if total < before.ledger[user]:
                problems.append(f"ledger {user}: {before.ledger[user]} -> {total}")
        return problems


@dataclass(repr=False)  # a short repr: Hypothesis prints it with every falsifying example
class Running:
    sidecar: Sidecar
    server: Server
    channel: grpc.aio.Channel
    usage_url: str
    limiter: Limiter  # the sidecar's counter layout, to read its windows

    def __repr__(self) -> str:
        return f"Running(grpc=127.0.0.1:{self.server.port}, usage={self.usage_url})"

    async def counters(self) -> Snapshot:
        await self.sidecar.charger.drain()  # charges settling in the background first
        store, now = self.sidecar.store, now_ms()
        windows = {}
        for userid, tier in USERS:
            states = []
            for key, window_ms in self.limiter.token_counters(userid, tier, ""):
                # A limit of 0 refuses at once: a read that adds nothing.
                probe = await store.admit([WindowCounter(key, 0, window_ms, 0)], now)
                states.append((probe.states[0].value, probe.states[0].window_start_ms))
            windows[(userid, tier)] = tuple(states)
        today = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
        ledger = {}
        for userid, _ in USERS:
            ledger[userid] = sum(row.total_tokens for row in await store.ledger(userid, [today]))
        return Snapshot(windows, ledger)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    config = fuzz_config()
    sidecar = Sidecar.build(config)
    await sidecar.start()
    server = Server(sidecar, "127.0.0.1", 0)
    await server.start()
    usage = UsageApi(
        sidecar.store,
        sidecar.identities,
        retention_days=config.store.retention_days,
        admin_group=config.observability.admin_group,
    )
    port = free_port()
    await usage.start("127.0.0.1", port)
    limiter = Limiter(sidecar.store, config.limits, now_ms)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Running(sidecar, server, channel, f"http://127.0.0.1:{port}", limiter)
    finally:
        await channel.close()
        await usage.stop()
        await server.stop(1)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Log records that carry a traceback: an exception that escaped to a log."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.exc_info is not None or r.exc_text or "Traceback" in r.getMessage()
    ]
