"""Tiers from maas-api's ``POST /v1/tiers/lookup``, cached per username."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp

from extproc.authz.cache import ExpiringCache, SingleFlight
from extproc.config import TiersConfig
from extproc.domain import Identity, Tier
from extproc.errors import TierUnavailable
from extproc.observability.metrics import Metrics

CACHE = "tier_lookup"
LOOKUP_PATH = "/v1/tiers/lookup"
MAX_ENTRIES = 100_000


class MaasApiTiers:
    """``tier_for`` asks maas-api which tier the caller's groups are in.

    200 ``{"tier": name, "displayName": ...}`` gives the tier (its level is not told: 0);
    404 means no tier (a 403 for the caller); both are cached ``cache_ttl_s`` per username.
    Any other status, a malformed body or a connection error raises ``TierUnavailable``.
    """

    def __init__(
        self,
        settings: TiersConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 2.0,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._url = settings.maas_api_url.rstrip("/") + LOOKUP_PATH
        self._ttl_s = settings.cache_ttl_s
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._cache: ExpiringCache[str, Tier | None] = ExpiringCache(max_entries, clock)
        self._flights: SingleFlight[str, Tier | None] = SingleFlight()
        self._session: aiohttp.ClientSession | None = None
        self._lookups = {
            result: metrics.cache_lookups.labels(CACHE, result)
            for result in ("hit", "miss", "shared")
        }

    async def tier_for(self, identity: Identity) -> Tier | None:
        key = identity.username
        if (cached := self._cache.get(key)) is not None:
            self._lookups["hit"].inc()
            return cached.value
        self._lookups["shared" if self._flights.joining(key) else "miss"].inc()
        try:
            return await self._flights.run(key, lambda: self._lookup(identity))
        except TierUnavailable:
            self._metrics.unavailable.labels("tiers").inc()
            raise

    async def _lookup(self, identity: Identity) -> Tier | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self._url, json={"groups": list(identity.groups)}
            ) as response:
                status = response.status
                body: Any = await response.json(content_type=None) if status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise TierUnavailable(f"maas-api tier lookup failed: {type(exc).__name__}") from None
        if status == 404:
            self._cache.put(identity.username, None, self._ttl_s)
            return None
        if status != 200:
            raise TierUnavailable(f"maas-api tier lookup answered {status}")
        name = body.get("tier") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise TierUnavailable("maas-api tier lookup answered 200 without a tier name")
        display = body.get("displayName")
        tier = Tier(name, 0, frozenset(), display if isinstance(display, str) else "")
        self._cache.put(identity.username, tier, self._ttl_s)
        return tier

    async def close(self) -> None:
        await self._flights.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
