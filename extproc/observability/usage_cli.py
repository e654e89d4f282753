"""`maas-extproc usage`: one user's usage for a period, read straight from the store."""

from __future__ import annotations

import asyncio
import sys

from extproc.config import Config
from extproc.errors import StoreUnavailable
from extproc.observability.usage_query import (
    GROUPS,
    SUBSCRIPTION_GROUPS,
    check_retention,
    parse_group_by,
    parse_period,
    summarize,
    to_csv,
    to_json,
    to_table,
    usage_document,
    utc_today,
)
from extproc.store.base import LedgerRow


async def _rows(config: Config, user: str, days: list[str]) -> list[LedgerRow]:
    from extproc.app import build_inner_store

    store = build_inner_store(config)
    try:
        return await store.ledger(user, days)
    finally:
        await store.close()


def run_usage(
    config: Config,
    user: str,
    start: str | None,
    end: str | None,
    fmt: str,
    group_by: str | None = None,
) -> int:
    """Print the same rows and totals as ``GET /v1/usage``; bad options raise ConfigError (exit 2)."""
    today = utc_today()
    period = parse_period(start, end, today, start_key="--from", end_key="--to")
    check_retention(period, today, config.store.retention_days, start_key="--from")
    era_groups = SUBSCRIPTION_GROUPS if config.maas.era == "subscriptions" else GROUPS
    by = parse_group_by(group_by, "--group-by", era_groups)
    if str(config.store.url).startswith("memory:"):
        print(
            "note: the store is memory://, which a separate process cannot read; "
            "set store.url or MAAS_EXTPROC_STORE_URL to the sidecar's Redis",
            file=sys.stderr,
        )
    try:
        rows = asyncio.run(_rows(config, user, period.days))
    except StoreUnavailable as exc:
        print(f"maas-extproc: store unavailable: {exc}", file=sys.stderr)
        return 1
    grouped, totals = summarize(rows, by)
    if fmt == "json":
        out = to_json(usage_document(user, period, by, rows)) + "\n"
    elif fmt == "csv":
        out = to_csv(grouped, by)
    else:
        out = to_table(grouped, totals, by) + "\n"
    sys.stdout.write(out)
    return 0
