"""The usage API's OpenAPI document: valid OpenAPI 3.1 (openapi-spec-validator), served at
/v1/usage/openapi.json, and true to the running server: the same routes, every documented
parameter taken and no other, and answers that match its schemas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from extproc.authz.api_keys import ApiKeyIdentities
from extproc.observability.usage_api import UsageApi
from extproc.observability.usage_openapi import openapi_document
from extproc.observability.usage_query import GROUPS, SUBSCRIPTION_GROUPS, GroupBy
from extproc.observability.usage_routes import PARAMS
from extproc.store.memory import MemoryStore
from tests.helpers import LOCAL
from tests.integration.test_usage_api import RETENTION_DAYS, seed
from tests.redis_fixtures import free_port

ADMIN = {"Authorization": "Bearer demo-admin-key"}
ERAS = {"tiers": GROUPS, "subscriptions": SUBSCRIPTION_GROUPS}


@pytest.fixture(params=list(ERAS))
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[UsageApi, httpx.AsyncClient]]:
    store = MemoryStore(retention_days=RETENTION_DAYS)
    await seed(store)
    api = UsageApi(
        store,
        ApiKeyIdentities.from_file(LOCAL / "api-keys.yaml"),
        retention_days=RETENTION_DAYS,
        admin_group="maas-admins",
        groups=ERAS[request.param],
    )
    port = free_port()
    await api.start("127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            yield api, http
    finally:
        await api.stop()


@pytest.mark.parametrize("groups", list(ERAS.values()))
def test_the_document_is_valid_openapi_3_1(groups: tuple[GroupBy, ...]) -> None:
    validate(openapi_document(groups))  # raises on any error


async def test_served_without_a_token(served: tuple[UsageApi, httpx.AsyncClient]) -> None:
    _, http = served
    response = await http.get("/v1/usage/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["openapi"] == "3.1.0"
    validate(response.json())


def served_paths(api: UsageApi) -> set[str]:
    return {route.resource.canonical for route in api.app().router.routes() if route.resource}


async def test_the_same_routes_as_the_server(served: tuple[UsageApi, httpx.AsyncClient]) -> None:
    api, http = served
    document = (await http.get("/v1/usage/openapi.json")).json()
    assert set(document["paths"]) == served_paths(api)
    for path in served_paths(api):
        assert (await http.get(path, headers=ADMIN)).status_code == 200


def example(name: str, operation: dict[str, Any]) -> str:
    """A value of parameter ``name`` the document allows (its enum's first, or its example)."""
    (param,) = [p for p in operation["parameters"] if p["name"] == name]
    enum = param["schema"].get("enum")
    return str(enum[0]) if enum else PARAMS[name].example


async def test_every_documented_parameter_is_taken_and_no_other(
    served: tuple[UsageApi, httpx.AsyncClient],
) -> None:
    _, http = served
    document = (await http.get("/v1/usage/openapi.json")).json()
    every_name = set(PARAMS) | {"limit_", "page", "offset", "cursor"}
    for path, item in document["paths"].items():
        operation = item["get"]
        documented = {p["name"] for p in operation["parameters"]}
        for name in sorted(every_name):
            value = example(name, operation) if name in documented else "1"
            if name == "page_token":
                continue  # a token comes from an answer; the pages test follows one
            response = await http.get(path, params={name: value}, headers=ADMIN)
            unknown = (
                response.status_code == 400
                and response.json()["error"]["parameter"] == name
                and "a known parameter" in response.json()["error"]["message"]
            )
            assert unknown == (name not in documented), (path, name, response.text)


def checker(document: dict[str, Any], name: str) -> jsonschema.protocols.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


async def test_answers_match_the_documented_schemas(
    served: tuple[UsageApi, httpx.AsyncClient],
) -> None:
    _, http = served
    document = (await http.get("/v1/usage/openapi.json")).json()
    asked = [
        ("/v1/usage", {"group_by": "model"}),
        ("/v1/usage/users", {"limit": "1", "sort": "total_tokens"}),
        ("/v1/usage/keys", {"model": "opt"}),
        ("/v1/usage/openapi.json", {}),
    ]
    for path, params in asked:
        operation = document["paths"][path]["get"]
        response = await http.get(path, params=params, headers=ADMIN)
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        checker(document, schema["$ref"].rsplit("/", 1)[1]).validate(response.json())
    refused = await http.get("/v1/usage/users", params={"limit": "0"}, headers=ADMIN)
    checker(document, "Error").validate(refused.json())
    listing = (await http.get("/v1/usage/users", params={"limit": "1"}, headers=ADMIN)).json()
    assert listing["rows"]
    assert listing["next_page_token"]
