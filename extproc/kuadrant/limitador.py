"""Limitador's limits, read from its HTTP API and matched to the policy limit a tier reports into."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.errors import Unavailable
from extproc.kuadrant.descriptors import Entries, parse_condition, parse_variable

log = logging.getLogger("extproc.kuadrant")


class LimitadorUnavailable(Unavailable):
    """Limitador's HTTP API did not answer with a list of limits."""


@dataclass(frozen=True, slots=True)
class LimitadorLimit:
    """One limit as Limitador lists it (``GET /limits/<namespace>``)."""

    namespace: str
    max_value: int
    seconds: int
    name: str = ""
    conditions: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> LimitadorLimit:
        return cls(
            namespace=str(item.get("namespace", "")),
            max_value=int(item.get("max_value", 0)),
            seconds=int(item.get("seconds", 0)),
            name=str(item.get("name") or ""),
            conditions=tuple(str(c) for c in item.get("conditions") or ()),
            variables=tuple(str(v) for v in item.get("variables") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "max_value": self.max_value,
            "seconds": self.seconds,
            "name": self.name or None,
            "conditions": list(self.conditions),
            "variables": list(self.variables),
        }


@dataclass(frozen=True, slots=True)
class Target:
    """A discovered limit we may report into, or why we may not (``reason`` set, never reported)."""

    identifier: str
    variables: tuple[str, ...] = ()  # descriptor keys of the counter, in Limitador's order
    reason: str = ""  # "" when reportable, else e.g. "no_limit", "conditions", "variables"


def match_limit(
    limits: Sequence[LimitadorLimit], identifier: str, counter_expression: str
) -> Target:
    """The limit that applies exactly when ``identifier`` is "1", with variables we can fill.

    Only a limit whose conditions are just ``descriptors[0]["<identifier>"] == "1"`` is taken; a
    counter variable other than ``counter_expression`` cannot be filled in, so it is not either.
    """
    flagged = [
        limit
        for limit in limits
        if any(parse_condition(c) == (identifier, "1") for c in limit.conditions)
    ]
    if not flagged:
        return Target(identifier, reason="no_limit")
    for limit in flagged:
        if len(limit.conditions) != 1:
            continue
        keys = tuple(parse_variable(v) for v in limit.variables)
        if all(k == counter_expression for k in keys):
            return Target(identifier, tuple(k for k in keys if k is not None))
    any_plain = any(len(limit.conditions) == 1 for limit in flagged)
    return Target(identifier, reason="variables" if any_plain else "conditions")


def counter_entries(target: Target, values: Mapping[str, str]) -> Entries:
    """The counter's descriptor entries: each variable key with its value for this request."""
    return tuple((key, values[key]) for key in target.variables)


class LimitadorLimits:
    """Per-domain limits from Limitador's HTTP API, fetched on first need and after ``refresh_s``.

    A failed fetch keeps serving the last answer for that domain; with none, it raises
    ``LimitadorUnavailable`` so the caller retries later instead of reporting blind.
    """

    def __init__(
        self,
        base_url: str,
        *,
        refresh_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._refresh_s = refresh_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._cache: dict[str, tuple[float, tuple[LimitadorLimit, ...]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def limits(self, domain: str) -> tuple[LimitadorLimit, ...]:
        cached = self._cache.get(domain)
        if cached is not None and self._clock() - cached[0] < self._refresh_s:
            return cached[1]
        async with self._lock:  # one fetch per domain at a time
            cached = self._cache.get(domain)
            if cached is not None and self._clock() - cached[0] < self._refresh_s:
                return cached[1]
            try:
                fetched = await self._fetch(domain)
            except LimitadorUnavailable:
                if cached is None:
                    raise
                log.warning("limitador limits refresh failed, keeping the last: domain=%s", domain)
                return cached[1]
            if cached is None or cached[1] != fetched:
                log.info("limitador limits loaded: domain=%s limits=%d", domain, len(fetched))
            self._cache[domain] = (self._clock(), fetched)
            return fetched

    async def _fetch(self, domain: str) -> tuple[LimitadorLimit, ...]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self._base}/limits/{urllib.parse.quote(domain, safe='')}"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise LimitadorUnavailable(f"GET {url}: HTTP {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LimitadorUnavailable(f"GET {url}: {type(exc).__name__}") from None
        if not isinstance(body, list):
            raise LimitadorUnavailable(f"GET {url}: not a list of limits")
        return tuple(LimitadorLimit.from_json(item) for item in body if isinstance(item, dict))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
