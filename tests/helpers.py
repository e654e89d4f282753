"""Builders shared by tests: the local demo files, admission over real in-memory parts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from extproc.admission import Admission
from extproc.authz.api_keys import ApiKeyIdentities
from extproc.authz.base import AllowAll
from extproc.authz.tiers import FileTiers
from extproc.config import Config, load
from extproc.kuadrant.route_map import RouteDomains
from extproc.limits.limiter import Limiter
from extproc.routes import RouteTable
from extproc.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "deploy" / "local"
CHAT = "/llm/facebook-opt-125m-simulated/v1/chat/completions"
KEYS = {
    "free": "demo-free-key",
    "premium": "demo-premium-key",
    "enterprise": "demo-enterprise-key",
    "none": "demo-notier-key",
}


class Clock:
    """A settable millisecond clock for window tests."""

    def __init__(self, now_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def local_config(environ: dict[str, str] | None = None) -> Config:
    return load(LOCAL / "config.yaml", environ or {})


def build_admission(
    config: Config | None = None,
    clock: Callable[[], int] | None = None,
    limiter: Limiter | None = None,
) -> tuple[Admission, Limiter, MemoryStore]:
    """Admission over the local files; its limiter on a fresh memory store unless given one."""
    config = config or local_config()
    store = MemoryStore()
    limiter = limiter or Limiter(store, config.limits, clock or Clock())
    admission = Admission(
        RouteTable(config.routes),
        ApiKeyIdentities.from_file(config.path(config.identity.api_keys_file)),
        FileTiers.from_file(config.path(config.tiers.file), config.tiers.instance),
        AllowAll(),
        limiter,
        spoofed_headers=config.routes.spoofed_headers,
        unclassified=config.routes.unclassified,
        store_failure=config.store.failure_policy,
        route_of=RouteDomains(config.kuadrant, config.access.body_models).domain,
        max_request_tokens=config.limits.max_request_tokens,
    )
    return admission, limiter, store


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition another thread brings about (a bounded poll, not a timing assertion)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")
