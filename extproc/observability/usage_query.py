"""Usage queries shared by the CLI and the HTTP API: periods, retention, grouping and rendering."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from extproc.errors import ConfigError
from extproc.store.base import LedgerRow

GroupBy = Literal["day", "model", "subscription", "key"]
GROUPS: tuple[GroupBy, ...] = ("day", "model")  # the tier era's
# The subscription era books usage to subscriptions and API keys as well.
SUBSCRIPTION_GROUPS: tuple[GroupBy, ...] = (*GROUPS, "subscription", "key")
AMOUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "estimated_tokens",
    "requests",
    # Reservations of admitted requests whose charge has not come (see store/ledger.py).
    "unsettled_tokens",
    "unsettled_requests",
    # Issue #16: the informational token kinds (parts of prompt or completion), the cost in
    # micro-units of the pricing's currency and how many requests a price applied to.
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cost_micros",
    "priced_requests",
)
# An amount shown as null when no request of the row reported it (or was priced): summed along
# with the amounts, then dropped by ``shown``.
REPORTED_BY = {
    "cached_tokens": "cached_reported",
    "cache_creation_tokens": "cache_creation_reported",
    "reasoning_tokens": "reasoning_reported",
    "cost_micros": "priced_requests",
}
_SUMMED = (*AMOUNTS, *(n for n in REPORTED_BY.values() if n not in AMOUNTS))
# The columns that name a row, per grouping: the subscription era's rows carry the subscription
# with its tokenMetadata (organization id, cost center), or the API key with its subscription.
COLUMNS: dict[str, tuple[str, ...]] = {
    "day": ("day",),
    "model": ("model",),
    "subscription": ("subscription", "organization_id", "cost_center"),
    "key": ("key", "subscription"),
}

Row = dict[str, str | int | None]


def utc_today() -> dt.date:
    return dt.datetime.now(tz=dt.UTC).date()


@dataclass(frozen=True, slots=True)
class Period:
    """Whole UTC days from ``first`` to ``last``, both included."""

    first: dt.date
    last: dt.date

    @property
    def length(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def days(self) -> list[str]:
        """Every day in the ledger's YYYYMMDD form."""
        return [(self.first + dt.timedelta(days=i)).strftime("%Y%m%d") for i in range(self.length)]


def parse_period(
    start: str | None,
    end: str | None,
    today: dt.date,
    *,
    start_key: str = "from",
    end_key: str = "to",
) -> Period:
    """The period from two YYYY-MM-DD strings (None: today); errors name ``start_key``/``end_key``."""
    first = _day(start_key, start, today)
    last = _day(end_key, end, today)
    if last < first:
        raise ConfigError(end_key, f"a day on or after {start_key} ({first.isoformat()})", end)
    return Period(first, last)


def _day(key: str, value: str | None, today: dt.date) -> dt.date:
    if value is None:
        return today
    try:
        if len(value) != 10:  # fromisoformat also takes 20240101 and week dates
            raise ValueError(value)
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(key, "a day as YYYY-MM-DD", value) from exc


def days_between(start: str | None, end: str | None, today: dt.date) -> list[str]:
    """Every day from ``start`` to ``end`` (YYYY-MM-DD, inclusive) in the ledger's YYYYMMDD form."""
    return parse_period(start, end, today, start_key="--from", end_key="--to").days


def check_retention(
    period: Period, today: dt.date, retention_days: int, *, start_key: str = "from"
) -> None:
    """Refuse a period the ledger no longer (fully) holds, rather than answer it cut short."""
    oldest = today - dt.timedelta(days=retention_days - 1)
    if period.length > retention_days:
        raise ConfigError(
            start_key,
            f"a period of at most store.retention_days ({retention_days}) days",
            f"{period.length} days",
        )
    if period.first < oldest:
        raise ConfigError(
            start_key,
            f"a day on or after {oldest.isoformat()} (store.retention_days is {retention_days})",
            period.first.isoformat(),
        )


def check_span(period: Period, max_days: int, *, start_key: str = "from") -> None:
    """Refuse a period longer than ``max_days``: what a listing across every user may read."""
    if period.length > max_days:
        raise ConfigError(
            start_key,
            f"a period of at most {max_days} days for this listing",
            f"{period.length} days",
        )


@dataclass(frozen=True, slots=True)
class Filters:
    """Which ledger rows count: ``None`` takes any value; ``""`` is a value too (a tier-era row
    has no subscription, a token no key name)."""

    model: str | None = None
    subscription: str | None = None
    key: str | None = None

    def admits(self, row: LedgerRow) -> bool:
        booked = row.attribution
        return (
            (self.model is None or row.model == self.model)
            and (self.subscription is None or booked.subscription == self.subscription)
            and (self.key is None or booked.key == self.key)
        )

    def given(self) -> dict[str, str]:
        """The filters set, by name (what a listing answers with)."""
        return {
            name: value
            for name, value in (
                ("model", self.model),
                ("subscription", self.subscription),
                ("key", self.key),
            )
            if value is not None
        }


def parse_group_by(
    value: str | None, key: str = "group_by", groups: tuple[GroupBy, ...] = GROUPS
) -> GroupBy:
    for choice in groups:
        if value is None or value == choice:
            return choice
    raise ConfigError(key, "one of " + ", ".join(groups), value)


def iso_day(day: str) -> str:
    """YYYYMMDD (the ledger's form) as YYYY-MM-DD."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def zero_totals() -> Row:
    """Every summed amount at 0 (``shown`` makes it what is answered)."""
    return dict.fromkeys(_SUMMED, 0)


def add_amounts(into: Row, row: LedgerRow | Mapping[str, str | int | None]) -> None:
    for name in _SUMMED:
        amount = row[name] if isinstance(row, Mapping) else getattr(row, name)
        into[name] = int(into[name] or 0) + int(amount or 0)


def shown(row: Row) -> Row:
    """A summed row as answered: a kind no request reported (a cost no request was priced for)
    is null, not 0; the reported counts behind that are left out."""
    out = {name: value for name, value in row.items() if name in AMOUNTS or name not in _SUMMED}
    for name, counter in REPORTED_BY.items():
        if not row.get(counter):
            out[name] = None
    return out


def _names(row: LedgerRow, group_by: GroupBy) -> tuple[str, ...]:
    """The values of ``COLUMNS[group_by]`` for one ledger row ("" where the tier era has none)."""
    booked = row.attribution
    if group_by == "day":
        return (iso_day(row.day),)
    if group_by == "model":
        return (row.model,)
    if group_by == "subscription":
        return (booked.subscription, booked.organization_id, booked.cost_center)
    return (booked.key, booked.subscription)


def summarize(rows: Iterable[LedgerRow], group_by: GroupBy) -> tuple[list[Row], Row]:
    """One row per day, model, subscription or API key (sorted), and the totals over the period."""
    groups: dict[tuple[str, ...], Row] = {}
    totals = zero_totals()
    for row in rows:
        names = _names(row, group_by)
        group = groups.setdefault(
            names, {**dict(zip(COLUMNS[group_by], names, strict=True)), **zero_totals()}
        )
        add_amounts(group, row)
        add_amounts(totals, row)
    return [shown(groups[names]) for names in sorted(groups)], shown(totals)


def usage_document(
    user: str, period: Period, group_by: GroupBy, rows: Iterable[LedgerRow]
) -> dict[str, object]:
    """What ``GET /v1/usage`` answers and ``maas-extproc usage --format json`` prints."""
    grouped, totals = summarize(rows, group_by)
    return {
        "user": user,
        "from": period.first.isoformat(),
        "to": period.last.isoformat(),
        "group_by": group_by,
        "rows": grouped,
        "totals": totals,
    }


def to_json(document: Mapping[str, object]) -> str:
    return json.dumps(document, indent=2)


# A text cell starting with one of these is a formula to spreadsheets (OWASP, "CSV Injection":
# https://owasp.org/www-community/attacks/CSV_Injection); model names and user ids are chosen by
# clients, and the admin who opens the export would run them.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str | int | None) -> str | int | None:
    """A text cell that cannot start a formula: OWASP's advice, a leading single quote."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_START):
        return "'" + cell
    return cell


def columns_of(key: str | tuple[str, ...]) -> tuple[str, ...]:
    """The naming columns of a grouping (``COLUMNS``), the one column ``key`` (``user``), or
    the columns given (a listing's)."""
    if isinstance(key, tuple):
        return key
    return COLUMNS.get(key, (key,))


def to_csv(rows: Sequence[Row], key: str | tuple[str, ...]) -> str:
    """A header line and one line per row; totals are left out so that columns sum cleanly.
    A null amount (not reported) is an empty cell.

    The one CSV writer of the usage API and the CLI: every text cell is ``spreadsheet_safe``.
    Lines end in CRLF (RFC 4180, Python's default), so a cell holding a bare CR is quoted too:
    with LF endings the csv module leaves it bare, and a spreadsheet starts a new row there.
    """
    names = columns_of(key)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow((*names, *AMOUNTS))
    writer.writerows([spreadsheet_safe(row[n]) for n in (*names, *AMOUNTS)] for row in rows)
    return out.getvalue()


def _cell(value: str | int | None) -> str:
    return "-" if value is None else str(value)  # "-": not reported


def to_table(rows: Sequence[Row], totals: Row, key: str) -> str:
    """Aligned columns for a terminal, with a ``total`` line at the end."""
    names = columns_of(key)
    lines = [[*names, *AMOUNTS]]
    lines += [
        [*(str(row[n]) for n in names), *(_cell(row[name]) for name in AMOUNTS)] for row in rows
    ]
    lines.append(["total", *([""] * (len(names) - 1)), *(_cell(totals[name]) for name in AMOUNTS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < len(names) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )
