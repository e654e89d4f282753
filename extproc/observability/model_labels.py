"""The `model` metric label: a model the sidecar knows, else ``other``, so clients cannot mint series.

The body's ``model`` is any string a client sends; as a label it would make the number of series
(and Prometheus's memory) unbounded. The sidecar knows:

- models named in its config: ``limits.models.<tier>.<model>`` and ``access.body_models`` (names
  and their ``<namespace>/<name>`` targets);
- with ``access.check: subject_access_review``, the ``<namespace>/<name>`` of a path route
  (``/<ns>/<name>/v1/...``): the API server allowed the caller to post to that
  LLMInferenceService. RBAC granted on a whole namespace also allows names that do not exist,
  so these are kept to the first ``max_routes``; later ones count as ``other``;
- in the subscription era, the MaaSModelRef ``<namespace>/<name>`` the selected subscription
  names for the request (admins write those, clients only pick among them), within the same
  bound.

The ledger keeps the exact model string per user; only the metric label is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from extproc.config import Config
from extproc.paths import model_route

log = logging.getLogger("extproc.metrics")

OTHER = "other"
MAX_ROUTES = 256


class ModelLabels:
    def __init__(
        self,
        known: Iterable[str] = (),
        *,
        routes_checked: bool = False,
        max_routes: int = MAX_ROUTES,
    ) -> None:
        self._known = frozenset(known)
        self._routes_checked = routes_checked
        self._routes: set[str] = set()
        self._max_routes = max_routes
        self._full_logged = False

    @classmethod
    def from_config(cls, config: Config) -> ModelLabels:
        known = {model for per_tier in config.limits.models.values() for model in per_tier}
        for model, target in config.access.body_models:
            known.update((model, target))
        return cls(known, routes_checked=config.access.check == "subject_access_review")

    def label(self, model: str, path: str, *, subscribed: bool = False) -> str:
        """``model`` if known, else a subscription's model or the access-checked path route,
        else ``other``."""
        if model in self._known:
            return model
        if subscribed:
            return self._bounded(model)
        if not self._routes_checked:
            return OTHER
        namespace, name = model_route(path)
        if not name:
            return OTHER
        return self._bounded(f"{namespace}/{name}")

    def _bounded(self, route: str) -> str:
        """``route`` while fewer than ``max_routes`` were seen, else ``other``."""
        if route in self._known or route in self._routes:
            return route
        if len(self._routes) < self._max_routes:
            self._routes.add(route)
            return route
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "model label limit of %d routes reached: later ones count as other",
                self._max_routes,
            )
        return OTHER
