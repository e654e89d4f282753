"""Identity from Kubernetes service-account tokens, validated by TokenReview and cached by hash."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client

from extproc.authz.api_keys import token_hash
from extproc.authz.cache import CachedChecks
from extproc.authz.kube import Kube
from extproc.config import IdentityConfig
from extproc.domain import Identity
from extproc.errors import IdentityUnavailable
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.identity")

SA_PREFIX = "system:serviceaccount:"
CACHE = "token_review"
MAX_ENTRIES = 100_000
MAX_NEGATIVE_ENTRIES = 10_000


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying anything: used to bound a cache TTL only."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims: Any = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def userid_for(username: str) -> str | None:
    """Kuadrant's ``auth.identity.userid``: the SA name, the 4th ``:`` part; None if not an SA."""
    if not username.startswith(SA_PREFIX):
        return None
    parts = username.split(":")
    if len(parts) != 4 or not parts[2] or not parts[3]:
        return None
    return parts[3]


class KubernetesIdentities:
    """``authenticate`` runs a TokenReview, once per token per TTL, keyed by the token's sha256.

    A valid answer is kept ``min(cache_ttl_s, exp - now)``; an invalid one ``negative_cache_ttl_s``.
    Concurrent first requests with one token share one TokenReview. When the API server fails,
    cached answers keep working and uncached tokens raise ``IdentityUnavailable``.
    """

    def __init__(
        self,
        kube: Kube,
        settings: IdentityConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        full_username: bool = False,
    ) -> None:
        self._kube = kube
        self._settings = settings
        # The subscription era counts by the whole username (MaaS's gateway AuthPolicy sets
        # auth.identity.userid to auth.identity.user.username for tokens); the tier era by the
        # service-account name.
        self._full_username = full_username
        self._audiences = list(settings.audiences)
        self._metrics = metrics
        self._clock = clock  # wall clock: compared with the tokens' exp
        lookups = {
            result: metrics.cache_lookups.labels(CACHE, result)
            for result in ("hit", "negative_hit", "miss", "shared")
        }
        self._checks: CachedChecks[str, Identity] = CachedChecks(
            lookups, clock, max_entries, MAX_NEGATIVE_ENTRIES
        )
        self._closed = False

    async def authenticate(self, token: str) -> Identity | None:
        key = token_hash(token)
        try:
            return await self._checks.get(key, lambda: self._review(token, key))
        except IdentityUnavailable:
            self._metrics.unavailable.labels("identity").inc()
            raise

    async def _review(self, token: str, key: str) -> Identity | None:
        review = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=self._audiences or None),
        )
        answer = await self._kube.call(
            lambda: self._kube.authentication.create_token_review(
                review, _request_timeout=self._kube.timeout
            ),
            IdentityUnavailable,
            "TokenReview",
        )
        identity = self._identity(answer.status)
        if identity is None:
            self._checks.refuse(key, self._settings.negative_cache_ttl_s)
            return None
        ttl = self._settings.cache_ttl_s
        exp = token_expiry(token)
        if exp is not None:
            ttl = min(ttl, exp - self._clock())
        self._checks.keep(key, identity, ttl)
        return identity

    def _identity(self, status: Any) -> Identity | None:
        if status is None or not status.authenticated or status.user is None:
            return None
        if self._audiences and not set(status.audiences or ()) & set(self._audiences):
            return None  # an API server that ignored spec.audiences must not widen them
        username = str(status.user.username or "")
        if not username:
            return None
        userid = username if self._full_username else userid_for(username)
        if userid is None:
            if self._settings.non_service_account == "reject":
                log.info("refused a non-service-account identity (identity.non_service_account)")
                return None
            userid = username
        groups = tuple(str(g) for g in status.user.groups or ())
        return Identity(userid=userid, username=username, groups=groups)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._checks.close()
        await self._kube.release()
