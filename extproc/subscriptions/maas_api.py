"""maas-api's internal endpoints the gateway calls: API-key validation and subscription selection.

Both are POSTs of JSON to maas-api's internal routes (``maas-api/cmd/main.go`` at c0639b1b), over
HTTPS verified against a CA bundle (on OpenShift, the service CA that signed maas-api's serving
certificate):

- ``/internal/v1/api-keys/validate`` ``{key}`` -> 200 ``ValidationResult`` ``{valid, userId,
  username, keyId, keyName, groups, subscription, tenant, reason}``, invalid keys included
  (``maas-api/internal/api_keys/handler.go`` ``ValidateAPIKeyHandler``, ``types.go``);
- ``/internal/v1/subscriptions/select`` ``{groups, username, requestedSubscription,
  requestedModel}`` -> always 200 ``SelectResponse``: the subscription, or ``error`` and
  ``message`` (``maas-api/internal/subscription/handler.go``, ``types.go``).

Any other status, a body that is not a JSON object, a timeout or a certificate that does not
verify raises the caller's ``Unavailable``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from extproc.authz.maas_api_tiers import client_tls
from extproc.errors import Unavailable

VALIDATE_PATH = "/internal/v1/api-keys/validate"
SELECT_PATH = "/internal/v1/subscriptions/select"
MAX_BODY_BYTES = 1 << 20  # a validation or selection answer is a few hundred bytes

Json = Mapping[str, Any]


class MaasApi:
    """One HTTP client session for both endpoints, opened on first use."""

    def __init__(
        self, base_url: str, *, ca_file: Path | None = None, timeout_s: float = 2.0
    ) -> None:
        self._base = base_url.rstrip("/")
        https = self._base.startswith("https://")
        self._ssl = client_tls(ca_file, "subscriptions.maas_api_ca_file") if https else None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def validate(self, key: str, failure: type[Unavailable]) -> Json:
        """maas-api's ValidationResult for ``key`` (``valid`` may be false)."""
        return await self._post(VALIDATE_PATH, {"key": key}, failure)

    async def select(self, request: Json, failure: type[Unavailable]) -> Json:
        """maas-api's SelectResponse: a subscription, or ``error`` and ``message``."""
        return await self._post(SELECT_PATH, request, failure)

    async def _post(self, path: str, body: Json, failure: type[Unavailable]) -> Json:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else None
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        try:
            async with self._session.post(self._base + path, json=dict(body)) as response:
                status = response.status
                raw = await response.content.read(MAX_BODY_BYTES + 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise failure(f"maas-api {path}: {type(exc).__name__}") from None
        if status != 200:
            raise failure(f"maas-api {path} answered {status}")
        try:
            if len(raw) > MAX_BODY_BYTES:
                raise ValueError("too long")
            answer: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise failure(f"maas-api {path} answered 200 without a JSON body") from None
        if not isinstance(answer, Mapping):
            raise failure(f"maas-api {path} answered 200 without a JSON object")
        return answer

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
