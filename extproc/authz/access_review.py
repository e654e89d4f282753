"""Model access by SubjectAccessReview (post on llminferenceservices), cached per user and model."""

from __future__ import annotations

import time
from collections.abc import Callable

from kubernetes import client

from extproc.authz.cache import ExpiringCache, SingleFlight
from extproc.authz.kube import Kube
from extproc.config import AccessConfig
from extproc.domain import Identity
from extproc.errors import AccessUnavailable
from extproc.observability.metrics import Metrics

CACHE = "access_review"
MAX_ENTRIES = 100_000
API_GROUP = "serving.kserve.io"
RESOURCE = "llminferenceservices"
VERB = "post"


class SubjectAccessReviewAccess:
    """``allowed`` asks the API server whether the caller may ``post`` to the model's llmisvc.

    Path routes give ``namespace`` and ``name``. Body-model routes call with namespace "" and
    the body's model: it maps through ``access.body_models`` to ``<ns>/<name>``, and a model not
    listed there is not checked. Answers are cached ``cache_ttl_s`` per (username, ns/name);
    when the API server fails, cached answers keep working and others raise AccessUnavailable.
    """

    def __init__(
        self,
        kube: Kube,
        settings: AccessConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._kube = kube
        self._ttl_s = settings.cache_ttl_s
        self._body_models = dict(settings.body_models)
        self._metrics = metrics
        self._cache: ExpiringCache[tuple[str, str], bool] = ExpiringCache(max_entries, clock)
        self._flights: SingleFlight[tuple[str, str], bool] = SingleFlight()
        self._closed = False
        self._lookups = {
            result: metrics.cache_lookups.labels(CACHE, result)
            for result in ("hit", "miss", "shared")
        }

    async def allowed(self, identity: Identity, namespace: str, name: str) -> bool:
        if not namespace:
            target = self._body_models.get(name)
            if target is None:
                return True
            namespace, name = target.split("/", 1)
        key = (identity.username, f"{namespace}/{name}")
        if (cached := self._cache.get(key)) is not None:
            self._lookups["hit"].inc()
            return cached.value
        self._lookups["shared" if self._flights.joining(key) else "miss"].inc()
        try:
            return await self._flights.run(key, lambda: self._review(identity, namespace, name))
        except AccessUnavailable:
            self._metrics.unavailable.labels("access").inc()
            raise

    async def _review(self, identity: Identity, namespace: str, name: str) -> bool:
        review = client.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1",
            kind="SubjectAccessReview",
            spec=client.V1SubjectAccessReviewSpec(
                user=identity.username,
                groups=list(identity.groups),
                resource_attributes=client.V1ResourceAttributes(
                    group=API_GROUP,
                    resource=RESOURCE,
                    verb=VERB,
                    namespace=namespace,
                    name=name,
                ),
            ),
        )
        answer = await self._kube.call(
            lambda: self._kube.authorization.create_subject_access_review(
                review, _request_timeout=self._kube.timeout
            ),
            AccessUnavailable,
            "SubjectAccessReview",
        )
        allowed = bool(answer.status is not None and answer.status.allowed)
        self._cache.put((identity.username, f"{namespace}/{name}"), allowed, self._ttl_s)
        return allowed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._flights.close()
        self._cache.clear()
        await self._kube.release()
