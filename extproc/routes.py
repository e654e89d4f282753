"""Classifies a request path: is it metered, exempt, and which model (namespace/name) it targets."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.config import RoutesConfig


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # without the query string
    charged: bool  # a completions-like POST: limited and billed
    exempt: bool  # e.g. /v1/models: authenticated, never limited or billed
    namespace: str = ""  # path-based routes: /<namespace>/<name>/v1/...
    name: str = ""

    @property
    def model(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else ""


class RouteTable:
    def __init__(self, config: RoutesConfig) -> None:
        self._charged = config.charged_suffixes
        self._exempt = config.exempt_suffixes

    def classify(self, method: str, raw_path: str) -> Route:
        path = raw_path.split("?", 1)[0]
        namespace = name = ""
        index = path.find("/v1/")
        if index > 0:
            segments = path[1:index].split("/")
            if len(segments) == 2 and all(segments):
                namespace, name = segments
        exempt = path.endswith(self._exempt)
        charged = not exempt and method == "POST" and path.endswith(self._charged)
        return Route(path, charged, exempt, namespace, name)
