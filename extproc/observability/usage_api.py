"""The usage query API: per-user ledger rows and totals over HTTP, behind the admission bearer tokens.

``GET /v1/usage`` answers one user's usage; ``GET /v1/usage/users`` lists every user's totals
(members of the admin group only); ``GET /v1/usage/keys`` lists usage per API key, paged and
sorted; ``GET /v1/usage/openapi.json`` describes them all. Routes and parameters come from one
table (``usage_routes``), which the OpenAPI document is written from as well.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Mapping

from aiohttp import web

from extproc.authz.base import IdentitySource
from extproc.domain import Identity
from extproc.errors import ConfigError, Unavailable
from extproc.observability.usage_listing import (
    Entries,
    PageToken,
    Query,
    Snapshot,
    SnapshotCache,
    aggregate,
)
from extproc.observability.usage_openapi import openapi_document
from extproc.observability.usage_query import (
    AMOUNTS,
    GROUPS,
    Filters,
    GroupBy,
    Period,
    Row,
    check_retention,
    check_span,
    parse_group_by,
    parse_period,
    shown,
    summarize,
    to_csv,
    usage_document,
    utc_today,
)
from extproc.observability.usage_routes import (
    DEFAULT_LIMIT,
    LISTING_MAX_DAYS,
    MAX_LIMIT,
    MAX_TOKEN_CHARS,
    MAX_VALUE_CHARS,
    ROUTE,
    Route,
)
from extproc.store.base import CounterStore, LedgerRow

log = logging.getLogger("extproc.usage")

_FORMATS = ("json", "csv")
_ORDERS = ("asc", "desc")
_LIMIT = re.compile(r"[0-9]{1,7}")


class _Refusal(Exception):
    """An answer other than 200, raised from deep in a handler and turned into a JSON reply."""

    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"code": code, "message": message, **extra}}


def _bad(error: ConfigError) -> _Refusal:
    return _Refusal(400, "bad_parameter", str(error), parameter=error.key)


class UsageApi:
    """Answers usage queries from the store with the caller authenticated by ``identities``."""

    def __init__(
        self,
        store: CounterStore,
        identities: IdentitySource,
        *,
        retention_days: int,
        admin_group: str,
        today: Callable[[], dt.date] = utc_today,
        groups: tuple[GroupBy, ...] = GROUPS,
        snapshots: SnapshotCache | None = None,
    ) -> None:
        self._store = store
        self._identities = identities
        self._retention_days = retention_days
        self._admin_group = admin_group
        self._today = today
        self._groups = groups  # the groupings ``group_by`` takes (the era's)
        # Listings of every user (admins) and of one user's keys are cached apart, so that many
        # small listings never push out the snapshot an admin is paging through. Two of every
        # user at most: about 50 MB each at 100,000 users (docs/benchmarks.md).
        self._every_user = snapshots or SnapshotCache()
        self._one_user = SnapshotCache(max_snapshots=256)
        self._scanning = asyncio.Lock()  # one scan of every user at a time
        self._openapi = json.dumps(openapi_document(groups))
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/usage", self._usage)
        app.router.add_get("/v1/usage/users", self._users)
        app.router.add_get("/v1/usage/keys", self._keys)
        app.router.add_get("/v1/usage/openapi.json", self._describe)
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (in the running event loop) until ``stop``."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------------------- handlers

    async def _usage(self, request: web.Request) -> web.Response:
        try:
            caller = await self._caller(request)
            query = _query(request, ROUTE["/v1/usage"])
            period, fmt = self._period_and_format(request, query)
            try:
                group_by = parse_group_by(query.get("group_by"), groups=self._groups)
            except ConfigError as exc:
                raise _bad(exc) from exc
            filters = _filters(query)
            user = query.get("user") or caller.userid
            if user != caller.userid and not self._is_admin(caller):
                raise _Refusal(
                    403,
                    "forbidden",
                    f"only members of {self._admin_group!r} may read another user's usage",
                )
            rows = [row for row in await self._ledger(user, period) if filters.admits(row)]
        except _Refusal as refusal:
            return _refused(refusal)
        if fmt == "csv":
            grouped, _ = summarize(rows, group_by)
            return _csv(to_csv(grouped, group_by))
        return web.json_response(usage_document(user, period, group_by, rows))

    async def _users(self, request: web.Request) -> web.Response:
        route = ROUTE["/v1/usage/users"]
        try:
            caller = await self._caller(request)
            query = _query(request, route)
            if not self._is_admin(caller):
                raise _Refusal(
                    403, "forbidden", f"only members of {self._admin_group!r} may list users"
                )
            return await self._listing(request, route, query, None)
        except _Refusal as refusal:
            return _refused(refusal)

    async def _keys(self, request: web.Request) -> web.Response:
        route = ROUTE["/v1/usage/keys"]
        try:
            caller = await self._caller(request)
            query = _query(request, route)
            user = query.get("user")
            if self._is_admin(caller):
                users = None if user is None else (user,)
            elif user is None or user == caller.userid:
                users = (caller.userid,)
            else:
                raise _Refusal(
                    403,
                    "forbidden",
                    f"only members of {self._admin_group!r} may read another user's keys",
                )
            return await self._listing(request, route, query, users)
        except _Refusal as refusal:
            return _refused(refusal)

    async def _describe(self, request: web.Request) -> web.Response:
        try:
            _query(request, ROUTE["/v1/usage/openapi.json"])
        except _Refusal as refusal:
            return _refused(refusal)
        return web.Response(text=self._openapi, content_type="application/json")

    async def _listing(
        self,
        request: web.Request,
        route: Route,
        query: Mapping[str, str],
        users: tuple[str, ...] | None,
    ) -> web.Response:
        """One page of a listing: of every user (``users`` None) or of the users given."""
        period, fmt = self._period_and_format(request, query)
        if users is None:
            try:
                check_span(period, LISTING_MAX_DAYS)
            except ConfigError as exc:
                raise _bad(exc) from exc
        sort = _choice(query, "sort", route.columns + AMOUNTS)
        order = _choice(query, "order", _ORDERS)
        limit = _limit(query)
        selected = Query(
            route.path, users, tuple(period.days), _filters(query), _text(query, "user_prefix")
        )
        fingerprint = selected.fingerprint(sort, order)
        cache = self._every_user if users is None else self._one_user
        offset = 0
        if "page_token" in query:
            token = _page_token(query["page_token"], fingerprint)
            found = cache.find(token.snapshot, selected)
            if found is None:
                raise _bad(
                    ConfigError(
                        "page_token",
                        "a token whose listing was read in the last 5 minutes; this one"
                        " expired: start again without page_token",
                    )
                )
            snapshot, offset = found, token.offset
        else:
            per_key = "key" in route.columns
            snapshot = await self._snapshot(cache, selected, route, per_key)
        view = snapshot.ordered(sort, order)
        if offset > len(view):
            raise _bad(ConfigError("page_token", "a next_page_token of a previous page"))
        rows = [shown(snapshot.row(i)) for i in view[offset : offset + limit]]
        following = offset + limit
        next_token = (
            PageToken(snapshot.id, following, fingerprint).encode()
            if following < len(view)
            else None
        )
        headers = {}
        if next_token is not None:
            following_url = request.rel_url.update_query(page_token=next_token)
            headers["Link"] = f'<{following_url}>; rel="next"'
        if fmt == "csv":
            return _csv(to_csv(rows, route.columns), headers)
        document = {
            "from": period.first.isoformat(),
            "to": period.last.isoformat(),
            "filters": selected.filters.given()
            | ({"user_prefix": selected.user_prefix} if selected.user_prefix else {}),
            "sort": sort,
            "order": order,
            "limit": limit,
            "count": len(view),
            "rows": rows,
            "totals": shown(snapshot.totals),
            "next_page_token": next_token,
        }
        return web.json_response(document, headers=headers)

    async def _snapshot(
        self, cache: SnapshotCache, selected: Query, route: Route, per_key: bool
    ) -> Snapshot:
        async def build() -> tuple[Entries, Row]:
            if selected.users is not None:
                return await aggregate(self._store, selected.users, selected, per_key)
            async with self._scanning:
                users = await self._store.ledger_users(selected.days)
                if selected.user_prefix:
                    users = [u for u in users if u.startswith(selected.user_prefix)]
                return await aggregate(self._store, users, selected, per_key)

        try:
            return await cache.take(selected, route.columns, build)
        except Unavailable as exc:
            log.warning("usage query refused: store unavailable: %s", exc)
            raise _Refusal(503, "unavailable", "the usage store is unavailable") from exc

    # -------------------------------------------------------------------------------- helpers

    async def _caller(self, request: web.Request) -> Identity:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("a bearer token is required")
        try:
            identity = await self._identities.authenticate(token)
        except Unavailable as exc:
            log.warning("usage query refused: identity source unavailable: %s", exc)
            raise _Refusal(503, "unavailable", "the identity source is unavailable") from exc
        if identity is None:
            raise _unauthenticated("the bearer token is not valid")
        return identity

    def _is_admin(self, caller: Identity) -> bool:
        return bool(self._admin_group) and self._admin_group in caller.groups

    def _period_and_format(
        self, request: web.Request, query: Mapping[str, str]
    ) -> tuple[Period, str]:
        today = self._today()
        try:
            period = parse_period(query.get("from"), query.get("to"), today)
            check_retention(period, today, self._retention_days)
        except ConfigError as exc:
            raise _bad(exc) from exc
        fmt = query.get("format")
        if fmt is None:
            fmt = "csv" if "text/csv" in request.headers.get("Accept", "") else "json"
        if fmt not in _FORMATS:
            raise _bad(ConfigError("format", "one of " + ", ".join(_FORMATS), fmt))
        return period, fmt

    async def _ledger(self, user: str, period: Period) -> list[LedgerRow]:
        try:
            return await self._store.ledger(user, period.days)
        except Unavailable as exc:
            log.warning("usage query refused: store unavailable: %s", exc)
            raise _Refusal(503, "unavailable", "the usage store is unavailable") from exc


def _query(request: web.Request, route: Route) -> dict[str, str]:
    """The query parameters of ``route``, each at most once; unknown ones are refused rather
    than ignored."""
    query: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in route.params:
            expected = "one of " + ", ".join(sorted(route.params)) if route.params else "none"
            raise _bad(ConfigError(name, f"a known parameter, {expected}"))
        if name in query:
            raise _bad(ConfigError(name, "at most once"))
        if len(value) > MAX_VALUE_CHARS:
            raise _bad(ConfigError(name, f"text of at most {MAX_VALUE_CHARS} characters"))
        query[name] = value
    return query


def _text(query: Mapping[str, str], name: str) -> str:
    return query.get(name, "")


def _filters(query: Mapping[str, str]) -> Filters:
    return Filters(query.get("model"), query.get("subscription"), query.get("key"))


def _choice(query: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = query.get(name, choices[0])
    if value not in choices:
        raise _bad(ConfigError(name, "one of " + ", ".join(choices), value))
    return value


def _limit(query: Mapping[str, str]) -> int:
    value = query.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise _bad(ConfigError("limit", f"a whole number from 1 to {MAX_LIMIT}", value))
    return int(value)


def _page_token(value: str, fingerprint: str) -> PageToken:
    if len(value) > MAX_TOKEN_CHARS:
        raise _bad(ConfigError("page_token", "a next_page_token of a previous page"))
    try:
        token = PageToken.decode(value)
    except ConfigError as exc:
        raise _bad(exc) from exc
    if token.fingerprint != fingerprint:
        raise _bad(
            ConfigError(
                "page_token",
                "a token of this listing (the same parameters; only limit may change)",
                value,
            )
        )
    return token


def _unauthenticated(message: str) -> _Refusal:
    return _Refusal(401, "unauthenticated", message)


def _refused(refusal: _Refusal) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="maas"'} if refusal.status == 401 else None
    return web.Response(
        status=refusal.status,
        text=json.dumps(refusal.body),
        content_type="application/json",
        headers=headers,
    )


def _csv(text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8", headers=headers)
