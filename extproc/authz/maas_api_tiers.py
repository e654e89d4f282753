"""Tiers from maas-api's ``POST /v1/tiers/lookup`` (HTTP, or HTTPS verified by a CA), per username."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from extproc.authz.cache import ExpiringCache, SingleFlight
from extproc.config import TiersConfig
from extproc.domain import Identity, Tier
from extproc.errors import ConfigError, TierUnavailable
from extproc.observability.metrics import Metrics

CACHE = "tier_lookup"
LOOKUP_PATH = "/v1/tiers/lookup"
MAX_ENTRIES = 100_000


class MaasApiTiers:
    """``tier_for`` asks maas-api which tier the caller's groups are in.

    200 ``{"tier": name, "displayName": ...}`` gives the tier (its level is not told: 0);
    404 means no tier (a 403 for the caller); both are cached ``cache_ttl_s`` per username.
    Any other status, a malformed body or a connection error raises ``TierUnavailable``.

    An ``https://`` URL is verified against ``ca_file`` (on Open Data Hub maas-api serves
    ``https://maas-api.opendatahub.svc:8443`` with a certificate from OpenShift's service CA:
    models-as-a-service ``deployment/base/maas-api/overlays/tls`` at ae050cb6), else against the
    system's CAs; the host name is always checked. A certificate that does not verify is a
    connection error like any other: ``TierUnavailable``.
    """

    def __init__(
        self,
        settings: TiersConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 2.0,
        max_entries: int = MAX_ENTRIES,
        ca_file: Path | None = None,
    ) -> None:
        self._url = settings.maas_api_url.rstrip("/") + LOOKUP_PATH
        self._ssl = client_tls(ca_file) if self._url.startswith("https://") else None
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
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else None
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
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


def client_tls(ca_file: Path | None, key: str = "tiers.maas_api_ca_file") -> ssl.SSLContext:
    """A verifying client context: the CA bundle ``ca_file`` (PEM), else the system's CAs."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(key, "a readable PEM CA bundle", reason) from exc
    return context
