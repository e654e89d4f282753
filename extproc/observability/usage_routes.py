"""The usage API's routes and query parameters: the one table that the handlers take parameters
from and that the OpenAPI document is written from, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# The longest period a listing across every user may read: a month of (user, day) hashes is
# what one listing reads (docs/benchmarks.md, "Usage API").
LISTING_MAX_DAYS = 31
MAX_VALUE_CHARS = 512  # a filter value or user id longer than this names nothing we keep
MAX_TOKEN_CHARS = 256

Schema = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    schema: Schema
    example: str  # a value the server takes (the drift test sends it)


_DAY = {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
_TEXT = {"type": "string", "maxLength": MAX_VALUE_CHARS}

PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "user",
            "The user whose usage to read; default: the caller. Another user's needs the admin"
            " group (`observability.admin_group`).",
            _TEXT,
            "alice",
        ),
        Param("from", "First day, UTC, included; default: today.", _DAY, "2026-01-01"),
        Param("to", "Last day, UTC, included; default: today.", _DAY, "2026-01-02"),
        Param(
            "group_by",
            "One row per day, model, subscription or API key.",
            {"type": "string"},
            "model",
        ),
        Param(
            "format",
            "`json` (default) or `csv`; `Accept: text/csv` asks for CSV too.",
            {"type": "string", "enum": ["json", "csv"]},
            "json",
        ),
        Param("model", "Only ledger rows of this model.", _TEXT, "facebook/opt-125m"),
        Param(
            "subscription",
            'Only rows booked to this subscription (`<namespace>/<name>`; `""`: none, the tier era).',
            _TEXT,
            "models-as-a-service/premium-subscription",
        ),
        Param("key", 'Only rows booked to this API key name (`""`: tokens).', _TEXT, "alice-ci"),
        Param("user_prefix", "Only users whose id starts with this.", _TEXT, "al"),
        Param(
            "sort",
            "The column to order rows by; ties are ordered by the naming columns.",
            {"type": "string"},
            "total_tokens",
        ),
        Param(
            "order",
            "`asc` (default) or `desc`.",
            {"type": "string", "enum": ["asc", "desc"]},
            "desc",
        ),
        Param(
            "limit",
            f"Rows per page, 1 to {MAX_LIMIT}; default {DEFAULT_LIMIT}.",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
            "10",
        ),
        Param(
            "page_token",
            "`next_page_token` of the previous page, with the same other parameters (`limit`"
            " may change). Pages come from one snapshot of the listing, taken with its first page,"
            " so writes meanwhile neither repeat nor skip a row; a token expires 5 minutes after"
            " its snapshot was last read, or once two other listings of every user were read"
            " since (`400`, start again).",
            {"type": "string", "maxLength": MAX_TOKEN_CHARS},
            "",
        ),
    )
}

_FILTERS = ("model", "subscription", "key")
_PAGES = ("sort", "order", "limit", "page_token")


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    operation_id: str
    summary: str
    params: tuple[str, ...]
    document: str  # the schema (components) of its 200 answer
    columns: tuple[str, ...] = ()  # the naming columns of a listing's rows (sortable)
    authenticated: bool = True


ROUTES: tuple[Route, ...] = (
    Route(
        "/v1/usage",
        "getUsage",
        "One user's usage, grouped by day, model, subscription or API key, with totals.",
        ("user", "from", "to", "group_by", "format", *_FILTERS),
        "Usage",
    ),
    Route(
        "/v1/usage/users",
        "listUsers",
        "Every user with usage in the period, one row each (admin group only).",
        ("from", "to", "format", *_FILTERS, "user_prefix", *_PAGES),
        "Listing",
        columns=("user",),
    ),
    Route(
        "/v1/usage/keys",
        "listKeys",
        "Usage per API key: one row per (user, key, subscription). Without `user`, every"
        " user's (admin group only); a caller outside it sees their own keys.",
        ("user", "from", "to", "format", *_FILTERS, "user_prefix", *_PAGES),
        "Listing",
        columns=("user", "key", "subscription"),
    ),
    Route(
        "/v1/usage/openapi.json",
        "getOpenApi",
        "This API's OpenAPI 3.1 description (no token needed).",
        (),
        "OpenApi",
        authenticated=False,
    ),
)

ROUTE = {route.path: route for route in ROUTES}
