"""Identity in the subscription era: ``sk-oai-*`` API keys validated by maas-api, other tokens elsewhere.

As MaaS's gateway AuthPolicy does it (``maas-controller/pkg/controller/maas/
maasauthpolicy_controller.go`` at c0639b1b): a bearer ``sk-oai-…`` is an API key, checked with
``POST /internal/v1/api-keys/validate``; any other bearer goes to the token source (TokenReview
with the cluster issuer's audience). ``auth.identity.userid`` is the key owner's ``username``
(``celUsername``), so our counters and Limitador's share their key; the groups are those stored
with the key when it was minted, and the key stays bound to the subscription it was minted for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from extproc.authz.api_keys import token_hash
from extproc.authz.base import IdentitySource
from extproc.authz.cache import CachedChecks
from extproc.config import SubscriptionsConfig
from extproc.domain import Identity
from extproc.errors import IdentityUnavailable
from extproc.observability.metrics import Metrics
from extproc.subscriptions.maas_api import Json, MaasApi

log = logging.getLogger("extproc.identity")

KEY_PREFIX = "sk-oai-"  # maas-api/internal/api_keys/keygen.go KeyPrefix
CACHE = "api_key_validate"
MAX_ENTRIES = 100_000
MAX_NEGATIVE_ENTRIES = 10_000


def identity_of(answer: Json) -> Identity | None:
    """The caller a ValidationResult names; None unless it is valid and names a user."""
    username = answer.get("username")
    if answer.get("valid") is not True or not isinstance(username, str) or not username:
        return None
    groups = answer.get("groups")
    texts = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []

    def text(name: str) -> str:
        value = answer.get(name)
        return value if isinstance(value, str) else ""

    return Identity(
        userid=username,
        username=username,
        groups=tuple(texts),
        key_id=text("keyId"),
        key_name=text("keyName"),
        subscription=text("subscription"),
    )


class MaasApiKeys:
    """``authenticate``: API keys through maas-api, cached by sha256; other tokens by ``tokens``.

    A valid answer is kept ``api_key_cache_ttl_s`` (a revoked key keeps working that long, as
    behind Authorino's 60 s cache), an invalid one ``api_key_negative_cache_ttl_s``; concurrent
    first requests with one key share one call. When maas-api fails, cached keys keep working and
    uncached ones raise ``IdentityUnavailable``.
    """

    def __init__(
        self,
        api: MaasApi,
        tokens: IdentitySource,
        settings: SubscriptionsConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._api = api
        self._tokens = tokens
        self._settings = settings
        self._metrics = metrics
        lookups = {
            result: metrics.cache_lookups.labels(CACHE, result)
            for result in ("hit", "negative_hit", "miss", "shared")
        }
        self._checks: CachedChecks[str, Identity] = CachedChecks(
            lookups, clock, max_entries, MAX_NEGATIVE_ENTRIES
        )

    async def authenticate(self, token: str) -> Identity | None:
        if not token.startswith(KEY_PREFIX):
            return await self._tokens.authenticate(token)
        key = token_hash(token)
        try:
            return await self._checks.get(key, lambda: self._validate(token, key))
        except IdentityUnavailable:
            self._metrics.unavailable.labels("identity").inc()
            raise

    async def _validate(self, token: str, key: str) -> Identity | None:
        answer = await self._api.validate(token, IdentityUnavailable)
        identity = identity_of(answer)
        if identity is None:
            reason = answer.get("reason")
            log.info("api key refused by maas-api: %s", reason if isinstance(reason, str) else "")
            self._checks.refuse(key, self._settings.api_key_negative_cache_ttl_s)
            return None
        self._checks.keep(key, identity, self._settings.api_key_cache_ttl_s)
        return identity

    async def close(self) -> None:
        await self._checks.close()
        await self._tokens.close()
        await self._api.close()
