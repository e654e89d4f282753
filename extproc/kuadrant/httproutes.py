"""KServe's model HTTPRoutes across the cluster, watched so each request is counted in its own route.

Lists and watches ``gateway.networking.k8s.io/v1`` HTTPRoutes labelled
``app.kubernetes.io/component=llminferenceservice-router`` in every namespace (as MaaS finds
them: by label, not by name) and keeps a ``RouteIndex`` of them for ``RouteDomains``. A name two
routes claim is left out, logged and counted in ``maas_httproute_conflicts_total``.
"""

from __future__ import annotations

import logging

from extproc.authz.kube import Kube
from extproc.kuadrant.objects import Collection, ObjectWatch, Snapshot
from extproc.kuadrant.route_map import ROUTER_SELECTOR, RouteIndex, index_routes
from extproc.observability.metrics import Metrics

log = logging.getLogger("extproc.kuadrant")

HTTP_ROUTES = Collection(
    "gateway.networking.k8s.io", "v1", "httproutes", label_selector=ROUTER_SELECTOR
)


class WatchedRoutes:
    """The current ``RouteIndex``; empty until the first list, the last good one after that."""

    def __init__(
        self,
        kube: Kube,
        model_header: str,
        metrics: Metrics,
        *,
        watch_timeout_s: int = 300,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._kube = kube
        self._model_header = model_header
        self._metrics = metrics
        self._index = RouteIndex()
        self._problems: frozenset[str] = frozenset()
        self._closed = False
        self._watch = ObjectWatch(
            kube,
            [HTTP_ROUTES],
            self._rebuild,
            watch_timeout_s=watch_timeout_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )

    def index(self) -> RouteIndex:
        return self._index

    def _rebuild(self, objects: Snapshot) -> None:
        index, problems = index_routes((obj for _, obj in objects), self._model_header)
        for problem in sorted(set(problems) - self._problems):  # once each, while it lasts
            self._metrics.httproute_conflicts.inc()
            log.warning("httproute left out: %s", problem)
        self._problems = frozenset(problems)
        if index != self._index:
            self._index = index
            log.info(
                "httproutes loaded: services=%d models=%d",
                len(index.by_service),
                len(index.by_model),
            )

    async def close(self) -> None:
        """Stop the watch thread (idempotent), then release the client."""
        if self._closed:
            return
        self._closed = True
        await self._watch.close()
        await self._kube.release()
