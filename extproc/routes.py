"""Classifies a request path: is it metered, exempt, and which model (namespace/name) it targets."""

from __future__ import annotations

from dataclasses import dataclass

from extproc import paths
from extproc.config import RoutesConfig


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # normalized (extproc.paths), without the query string; "" when it has no reading
    charged: bool  # a completions-like POST: limited and billed
    exempt: bool  # e.g. /v1/models: authenticated, never limited or billed
    namespace: str = ""  # path-based routes: /<namespace>/<name>/v1/...
    name: str = ""
    invalid: bool = False  # no single reading (encoded slash, `..;x`, bad escape, ...)
    unclassified: bool = False  # under a model prefix, but neither charged nor exempt

    @property
    def model(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else ""


_INVALID = Route("", charged=False, exempt=False, invalid=True)
_SEEN_SIZE = 4096  # (method, path) pairs remembered; emptied when full (any path may come)
# Only paths up to this length are remembered: a client's path may be as long as Envoy's header
# limit (60 KiB by default), and 4,096 of those would hold about 250 MB.
_SEEN_PATH_CHARS = 512


class RouteTable:
    def __init__(self, config: RoutesConfig) -> None:
        self._charged = config.charged_suffixes
        self._exempt = config.exempt_suffixes
        self._exempt_prefixes = tuple(suffix + "/" for suffix in config.exempt_suffixes)
        # A route depends on the method, the path and this table only: each pair is read once
        # (normalizing costs more than the rest of the lookup), not on every request.
        self._seen: dict[tuple[str, str], Route] = {}

    def classify(self, method: str, raw_path: str) -> Route:
        route = self._seen.get((method, raw_path))
        if route is None:
            route = self._classify(method, raw_path)
            if len(raw_path) <= _SEEN_PATH_CHARS:
                if len(self._seen) >= _SEEN_SIZE:
                    self._seen.clear()
                self._seen[(method, raw_path)] = route
        return route

    def _classify(self, method: str, raw_path: str) -> Route:
        path = paths.normalize(raw_path)
        if path is None:
            return _INVALID
        namespace, name = paths.model_route(path)
        charged = method == "POST" and path.endswith(self._charged)
        # /v1/models and /v1/models/<id> (model ids may hold slashes); a charged path never is.
        exempt = not charged and (
            path.endswith(self._exempt) or any(p in path for p in self._exempt_prefixes)
        )
        unclassified = not charged and not exempt and paths.under_model_prefix(path)
        return Route(path, charged, exempt, namespace, name, unclassified=unclassified)
