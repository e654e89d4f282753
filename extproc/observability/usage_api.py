"""The usage query API: per-user ledger rows and totals over HTTP, behind the admission bearer tokens.

``GET /v1/usage?user=&from=&to=&group_by=day|model&format=json|csv`` answers one user's usage;
``GET /v1/usage/users?from=&to=`` lists every user's totals (members of the admin group only).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping

from aiohttp import web

from extproc.authz.base import IdentitySource
from extproc.domain import Identity
from extproc.errors import ConfigError, Unavailable
from extproc.observability.usage_query import (
    GROUPS,
    GroupBy,
    Period,
    Row,
    add_amounts,
    check_retention,
    parse_group_by,
    parse_period,
    shown,
    summarize,
    to_csv,
    usage_document,
    utc_today,
    zero_totals,
)
from extproc.store.base import CounterStore, LedgerRow

log = logging.getLogger("extproc.usage")

_FORMATS = ("json", "csv")
_USAGE_PARAMS = frozenset({"user", "from", "to", "group_by", "format"})
_USERS_PARAMS = frozenset({"from", "to", "format"})


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
    ) -> None:
        self._store = store
        self._identities = identities
        self._retention_days = retention_days
        self._admin_group = admin_group
        self._today = today
        self._groups = groups  # the groupings ``group_by`` takes (the era's)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/usage", self._usage)
        app.router.add_get("/v1/usage/users", self._users)
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
            query = _query(request, _USAGE_PARAMS)
            period, fmt = self._period_and_format(request, query)
            try:
                group_by = parse_group_by(query.get("group_by"), groups=self._groups)
            except ConfigError as exc:
                raise _bad(exc) from exc
            user = query.get("user") or caller.userid
            if user != caller.userid and not self._is_admin(caller):
                raise _Refusal(
                    403,
                    "forbidden",
                    f"only members of {self._admin_group!r} may read another user's usage",
                )
            rows = await self._ledger(user, period)
        except _Refusal as refusal:
            return _refused(refusal)
        if fmt == "csv":
            grouped, _ = summarize(rows, group_by)
            return _csv(to_csv(grouped, group_by))
        return web.json_response(usage_document(user, period, group_by, rows))

    async def _users(self, request: web.Request) -> web.Response:
        try:
            caller = await self._caller(request)
            query = _query(request, _USERS_PARAMS)
            period, fmt = self._period_and_format(request, query)
            if not self._is_admin(caller):
                raise _Refusal(
                    403, "forbidden", f"only members of {self._admin_group!r} may list users"
                )
            users = await self._ledger_users(period)
            rows: list[Row] = []
            totals = zero_totals()
            for user in users:
                row: Row = {"user": user, **zero_totals()}
                for ledger_row in await self._ledger(user, period):
                    add_amounts(row, ledger_row)
                add_amounts(totals, row)
                rows.append(shown(row))
            totals = shown(totals)
        except _Refusal as refusal:
            return _refused(refusal)
        if fmt == "csv":
            return _csv(to_csv(rows, "user"))
        document = {
            "from": period.first.isoformat(),
            "to": period.last.isoformat(),
            "rows": rows,
            "totals": totals,
        }
        return web.json_response(document)

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

    async def _ledger_users(self, period: Period) -> list[str]:
        try:
            return await self._store.ledger_users(period.days)
        except Unavailable as exc:
            log.warning("usage query refused: store unavailable: %s", exc)
            raise _Refusal(503, "unavailable", "the usage store is unavailable") from exc


def _query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each at most once; unknown ones are refused rather than ignored."""
    query: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            expected = "one of " + ", ".join(sorted(allowed))
            raise _bad(ConfigError(name, f"a known parameter, {expected}"))
        if name in query:
            raise _bad(ConfigError(name, "at most once"))
        query[name] = value
    return query


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


def _csv(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8")
