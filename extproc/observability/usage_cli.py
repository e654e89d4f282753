"""`maas-extproc usage`: one user's ledger rows for a period, read straight from the store."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import sys
from dataclasses import asdict

from extproc.config import Config
from extproc.errors import ConfigError
from extproc.store.base import LedgerRow


def days_between(start: str | None, end: str | None, today: dt.date) -> list[str]:
    """Every day from ``start`` to ``end`` (YYYY-MM-DD, inclusive) in the ledger's YYYYMMDD form."""
    first = _day("--from", start, today)
    last = _day("--to", end, today)
    if last < first:
        raise ConfigError("--to", f"a day on or after --from ({first.isoformat()})", end)
    count = (last - first).days + 1
    return [(first + dt.timedelta(days=i)).strftime("%Y%m%d") for i in range(count)]


def _day(flag: str, value: str | None, today: dt.date) -> dt.date:
    if value is None:
        return today
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(flag, "a day as YYYY-MM-DD", value) from exc


def render(rows: list[LedgerRow], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(row) for row in rows], indent=2)
    names = list(LedgerRow.__dataclass_fields__)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([getattr(row, name) for name in names] for row in rows)
        return out.getvalue().rstrip("\n")
    table = [names, *([str(getattr(row, name)) for name in names] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


async def _rows(config: Config, user: str, days: list[str]) -> list[LedgerRow]:
    from extproc.app import build_inner_store

    store = build_inner_store(config)
    try:
        return await store.ledger(user, days)
    finally:
        await store.close()


def run_usage(config: Config, user: str, start: str | None, end: str | None, fmt: str) -> int:
    days = days_between(start, end, dt.datetime.now(tz=dt.UTC).date())
    if str(config.store.url).startswith("memory:"):
        print(
            "note: the store is memory://, which a separate process cannot read; "
            "set store.url or MAAS_EXTPROC_STORE_URL to the sidecar's Redis",
            file=sys.stderr,
        )
    rows = asyncio.run(_rows(config, user, days))
    print(render(rows, fmt))
    return 0
