"""The usage API's OpenAPI 3.1 document, written from the route table (``usage_routes``) and the
row columns (``usage_query``), so that it describes exactly what the server takes and answers."""

from __future__ import annotations

from typing import Any

from extproc import __version__
from extproc.observability.usage_query import AMOUNTS, COLUMNS, REPORTED_BY, GroupBy
from extproc.observability.usage_routes import PARAMS, ROUTES, Route

_ERRORS = {
    "400": "A parameter is malformed, unknown, repeated or out of range; `parameter` names it.",
    "401": "No bearer token, or one the identity source does not accept.",
    "403": "The caller may not read this (another user's usage, or a listing of every user).",
    "503": "The usage store or the identity source is unavailable.",
}


def openapi_document(groups: tuple[GroupBy, ...]) -> dict[str, Any]:
    """The document for a server whose ``group_by`` takes ``groups`` (the era's)."""
    names = sorted({c for g in groups for c in COLUMNS[g]} | {"user", "key", "subscription"})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maas-extproc usage API",
            "version": __version__,
            "description": "Token usage from the sidecar's ledger (per user, UTC day, model,"
            " and in the subscription era subscription and API key). Every answer other than"
            ' 200 is `{"error": {"code", "message", "parameter"?}}`.',
        },
        "paths": {route.path: {"get": _operation(route, groups)} for route in ROUTES},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Amounts": _object({name: _amount(name) for name in AMOUNTS}),
                "Row": {
                    "type": "object",
                    "properties": {
                        **{name: {"type": "string"} for name in names},
                        **{name: _amount(name) for name in AMOUNTS},
                    },
                    "required": list(AMOUNTS),
                    "additionalProperties": False,
                },
                "Usage": _object(
                    {
                        "user": {"type": "string"},
                        "from": {"type": "string", "format": "date"},
                        "to": {"type": "string", "format": "date"},
                        "group_by": {"type": "string", "enum": list(groups)},
                        "rows": {"type": "array", "items": {"$ref": "#/components/schemas/Row"}},
                        "totals": {"$ref": "#/components/schemas/Amounts"},
                    }
                ),
                "Listing": _object(
                    {
                        "from": {"type": "string", "format": "date"},
                        "to": {"type": "string", "format": "date"},
                        "filters": {"type": "object", "additionalProperties": {"type": "string"}},
                        "sort": {"type": "string"},
                        "order": {"type": "string", "enum": ["asc", "desc"]},
                        "limit": {"type": "integer"},
                        "count": {"type": "integer", "description": "Rows in every page."},
                        "rows": {"type": "array", "items": {"$ref": "#/components/schemas/Row"}},
                        "totals": {"$ref": "#/components/schemas/Amounts"},
                        "next_page_token": {"type": ["string", "null"]},
                    }
                ),
                "OpenApi": {"type": "object"},
                "Error": _object(
                    {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "parameter": {"type": "string"},
                            },
                            "required": ["code", "message"],
                        }
                    }
                ),
            },
        },
    }


def _amount(name: str) -> dict[str, Any]:
    """An amount column: null where no request of the row reported the kind (or was priced)."""
    if name in REPORTED_BY:
        return {"type": ["integer", "null"]}
    return {"type": "integer"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _operation(route: Route, groups: tuple[GroupBy, ...]) -> dict[str, Any]:
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{route.document}"}}
    }
    if route.document != "OpenApi":
        content["text/csv"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": route.summary, "content": content}}
    if route.columns:
        responses["200"]["headers"] = {
            "Link": {
                "description": 'The next page: `<URL>; rel="next"` (RFC 8288).',
                "schema": {"type": "string"},
            }
        }
    errors = _ERRORS if route.authenticated else {"400": _ERRORS["400"]}
    for status, description in errors.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "parameters": [_parameter(name, route, groups) for name in route.params],
        "responses": responses,
    }
    operation["security"] = [{"bearer": []}] if route.authenticated else []
    return operation


def _parameter(name: str, route: Route, groups: tuple[GroupBy, ...]) -> dict[str, Any]:
    param = PARAMS[name]
    schema = dict(param.schema)
    if name == "group_by":
        schema["enum"] = list(groups)
    elif name == "sort":
        schema["enum"] = [*route.columns, *AMOUNTS]
        schema["default"] = route.columns[0]
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": param.description,
        "schema": schema,
    }
