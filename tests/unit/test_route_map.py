"""Which HTTPRoute a request goes through: KServe's route names, the route map, the fallbacks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import KuadrantConfig
from extproc.kuadrant.route_map import (
    RouteDomains,
    RouteIndex,
    child_name,
    index_routes,
    templated_route,
)

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
LONG = "granite-3-1-8b-instruct-quantized-w4a16-for-the-long-name-test"
OPT_MODEL = "publishers/llm/models/facebook/opt-125m"
GRANITE_MODEL = "publishers/llm/models/ibm-granite/granite-3.1-8b-instruct"


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((UPSTREAM / name).read_text())
    return loaded


def kserve_routes() -> list[dict[str, Any]]:
    return [
        fixture("kserve-httproute-facebook-opt-125m-simulated.yaml"),
        fixture("kserve-httproute-long-name.yaml"),
    ]


def test_route_names_are_built_as_kserve_builds_them() -> None:
    assert child_name("facebook-opt-125m-simulated", "-kserve-route") == (
        "facebook-opt-125m-simulated-kserve-route"
    )
    # Past 63 characters: the head of the name, the md5 of the whole name, the suffix
    # (knative/pkg kmeta/names.go), as the fixture's route is named.
    md5 = hashlib.md5(LONG.encode(), usedforsecurity=False).hexdigest()
    assert child_name(LONG, "-kserve-route") == f"{LONG[:18]}{md5}-kserve-route"
    assert (
        child_name(LONG, "-kserve-route")
        == fixture("kserve-httproute-long-name.yaml")["metadata"]["name"]
    )
    assert len(child_name(LONG, "-kserve-route")) == 63
    assert len(child_name("x" * 40, "-" + "s" * 40)) <= 63  # a suffix past 31: all hashed


def test_the_route_template_hashes_long_names_and_keeps_custom_templates() -> None:
    template = KuadrantConfig().route_template
    assert templated_route(template, "llm", "opt") == "llm/opt-kserve-route"
    assert templated_route(template, "llm", LONG) == (
        "llm/" + fixture("kserve-httproute-long-name.yaml")["metadata"]["name"]
    )
    assert templated_route("gw/{namespace}-{name}", "llm", "opt") == "gw/llm-opt"


def test_kserve_routes_are_indexed_by_service_and_by_model_header() -> None:
    index, problems = index_routes(kserve_routes(), "X-Gateway-Model-Name")
    assert problems == []
    opt = "llm/facebook-opt-125m-simulated-kserve-route"
    granite = "llm/" + child_name(LONG, "-kserve-route")
    assert dict(index.by_service) == {
        ("llm", "facebook-opt-125m-simulated"): opt,
        ("llm", LONG): granite,
    }
    assert dict(index.by_model) == {OPT_MODEL: opt, GRANITE_MODEL: granite}
    # The header name is matched case-insensitively, as HTTP header names are.
    lower, _ = index_routes(kserve_routes(), "x-gateway-model-name")
    assert lower == index


def test_a_name_two_routes_claim_is_left_out() -> None:
    first, second = kserve_routes()
    copy = {**first, "metadata": {**first["metadata"], "name": "user-chosen-route"}}
    index, problems = index_routes([first, second, copy], "X-Gateway-Model-Name")
    assert OPT_MODEL not in index.by_model
    assert ("llm", "facebook-opt-125m-simulated") not in index.by_service
    assert GRANITE_MODEL in index.by_model
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("namespace", "name", "model", "expected"),
    [
        ("llm", "facebook-opt-125m-simulated", "", "llm/facebook-opt-125m-simulated-kserve-route"),
        ("llm", "not-watched", "", "llm/not-watched-kserve-route"),  # the template
        ("", "", OPT_MODEL, "llm/facebook-opt-125m-simulated-kserve-route"),  # watched header
        ("", "", "static-model", "team/static-route"),  # kuadrant.model_routes
        ("", "", "reviewed-model", "llm/reviewed-kserve-route"),  # access.body_models
        ("", "", "unknown-model", "maas/default-route"),  # kuadrant.default_route
        ("", "", "", "maas/default-route"),
    ],
)
def test_each_request_finds_its_route_in_order(
    namespace: str, name: str, model: str, expected: str
) -> None:
    index, _ = index_routes(kserve_routes(), "X-Gateway-Model-Name")
    config = KuadrantConfig(
        model_routes=(("static-model", "team/static-route"), (OPT_MODEL, "wrong/route")),
        default_route="maas/default-route",
    )
    domains = RouteDomains(config, (("reviewed-model", "llm/reviewed"),), lambda: index)
    assert domains.domain(namespace, name, model) == expected


def test_without_a_watch_or_a_default_an_unknown_model_has_no_route() -> None:
    domains = RouteDomains(KuadrantConfig())
    assert domains.domain("", "", "some-model") == ""
    assert domains.domain("llm", "opt", "") == "llm/opt-kserve-route"
    assert RouteIndex() == RouteIndex()
