"""Which HTTPRoute a request goes through: Kuadrant's limit namespace, and the budget of route scope.

Kuadrant turns a Gateway-level (Token)RateLimitPolicy into one Limitador limit per HTTPRoute, in
the namespace ``<route namespace>/<route name>`` (kuadrant-operator
``internal/controller/ratelimit_workflow_helpers.go`` at ae698811, ``LimitsNamespaceFromRoute``).
KServe gives each LLMInferenceService its own HTTPRoute, named ``kmeta.ChildName(<name>,
"-kserve-route")`` and labelled ``app.kubernetes.io/component: llminferenceservice-router`` and
``app.kubernetes.io/name: <name>`` (kserve ``pkg/controller/v1alpha2/llmisvc/router.go`` at
aaac4e29). That route serves both the path form ``/<namespace>/<name>/v1/...`` and, by exact
``X-Gateway-Model-Name`` header matches, the body-model form ``/v1/...`` (kserve
``config/llmisvcconfig/config-llm-router-route.yaml``). Routes a user supplies keep their own
names: the watched routes and the static maps cover those.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.config import KuadrantConfig

log = logging.getLogger("extproc.kuadrant")

ROUTER_SELECTOR = "app.kubernetes.io/component=llminferenceservice-router"
SERVICE_LABEL = "app.kubernetes.io/name"
_LONGEST = 63  # a Kubernetes object name
_MD5_HEX = 32
_PLAIN_SUFFIX = re.compile(r"^\{name\}([^{}]*)$")


def child_name(parent: str, suffix: str) -> str:
    """knative's ``kmeta.ChildName`` (knative/pkg ``kmeta/names.go`` at 4a022ed9, the version
    KServe pins): ``parent + suffix``, or past 63 characters the head of ``parent``, the md5 of
    ``parent`` and ``suffix``; a suffix of 31 characters or more hashes the whole name."""
    if len(parent) + len(suffix) <= _LONGEST:
        return parent + suffix
    head = _LONGEST - _MD5_HEX
    if head - len(suffix) <= 0:
        joined = parent[:head] + _md5(parent + suffix)
        joined += suffix[: max(0, _LONGEST - len(joined))]
        return re.sub(r"[^a-zA-Z0-9]+$", "", joined)
    return parent[: head - len(suffix)] + _md5(parent) + suffix


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def templated_route(template: str, namespace: str, name: str) -> str:
    """``route_template`` for a path route; a name part ``{name}<suffix>`` is built as KServe
    builds it (``child_name``), so long model names get the hashed route name."""
    namespace_part, _, name_part = template.partition("/")
    plain = _PLAIN_SUFFIX.match(name_part)
    route = (
        child_name(name, plain[1]) if plain else name_part.format(namespace=namespace, name=name)
    )
    return f"{namespace_part.format(namespace=namespace, name=name)}/{route}"


@dataclass(frozen=True, slots=True)
class RouteIndex:
    """HTTPRoutes by the LLMInferenceService they serve and by the model header they match."""

    by_service: Mapping[tuple[str, str], str] = field(
        default_factory=dict
    )  # (ns, name) -> ns/route
    by_model: Mapping[str, str] = field(default_factory=dict)  # header value -> ns/route


def index_routes(
    routes: Iterable[Mapping[str, Any]], model_header: str
) -> tuple[RouteIndex, list[str]]:
    """The index of KServe router HTTPRoutes, and one problem per name claimed by two routes
    (those names are left out: a request must never be counted in a guessed route)."""
    services: dict[tuple[str, str], set[str]] = {}
    models: dict[str, set[str]] = {}
    header = model_header.lower()
    for route in routes:
        meta = route.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if not (namespace and name):
            continue
        domain = f"{namespace}/{name}"
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if isinstance(service, str) and service:
            services.setdefault((namespace, service), set()).add(domain)
        for value in _model_header_values(route, header):
            models.setdefault(value, set()).add(domain)
    problems = [
        f"{what} {key!r} is claimed by {sorted(found)}"
        for what, table in (("service", services), ("model", models))
        for key, found in table.items()
        if len(found) > 1
    ]
    index = RouteIndex(
        by_service={k: next(iter(v)) for k, v in services.items() if len(v) == 1},
        by_model={k: next(iter(v)) for k, v in models.items() if len(v) == 1},
    )
    return index, problems


def _model_header_values(route: Mapping[str, Any], header: str) -> set[str]:
    """Every value an exact match on ``header`` selects, across the route's rules."""
    values: set[str] = set()
    spec = route.get("spec") or {}
    for rule in spec.get("rules") or []:
        for match in (rule or {}).get("matches") or []:
            for condition in (match or {}).get("headers") or []:
                if not isinstance(condition, Mapping):
                    continue
                exact = condition.get("type", "Exact") == "Exact"
                named = str(condition.get("name", "")).lower() == header
                if exact and named and isinstance(condition.get("value"), str):
                    values.add(condition["value"])
    return values


class RouteDomains:
    """``<namespace>/<name>`` of the HTTPRoute a request goes through, "" when unknown.

    Path routes ``/<ns>/<name>/v1/...``: the watched route of that LLMInferenceService, else
    ``kuadrant.route_template``. Body-model routes: the watched route whose model header matches
    the body's ``model``, else ``kuadrant.model_routes``, else the path route of
    ``access.body_models[model]``, else ``kuadrant.default_route``.
    """

    def __init__(
        self,
        config: KuadrantConfig,
        body_models: Iterable[tuple[str, str]] = (),
        watched: Callable[[], RouteIndex] | None = None,
    ) -> None:
        self._template = config.route_template
        self._model_routes = dict(config.model_routes)
        self._body_models = {model: tuple(target.split("/", 1)) for model, target in body_models}
        self._default = config.default_route
        self._watched = watched or RouteIndex

    def domain(self, namespace: str, name: str, model: str) -> str:
        index = self._watched()
        if name:
            return index.by_service.get((namespace, name)) or templated_route(
                self._template, namespace, name
            )
        if not model:
            return self._default
        if found := index.by_model.get(model) or self._model_routes.get(model):
            return found
        if (target := self._body_models.get(model)) is not None:
            return self.domain(target[0], target[1], "")
        return self._default
