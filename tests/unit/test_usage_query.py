"""Usage periods, retention, grouping and rendering shared by the usage CLI and API."""

from __future__ import annotations

import datetime as dt

import pytest

from extproc.errors import ConfigError
from extproc.observability.usage_query import (
    check_retention,
    days_between,
    parse_group_by,
    parse_period,
    summarize,
    to_csv,
    to_table,
    usage_document,
)
from extproc.store.base import LedgerRow

TODAY = dt.date(2025, 3, 10)
# No request reported the informational kinds or was priced: null, not 0 (issue #16).
NOT_REPORTED = {
    "cached_tokens": None,
    "cache_creation_tokens": None,
    "reasoning_tokens": None,
    "cost_micros": None,
    "priced_requests": 0,
}
ROWS = [
    LedgerRow("20250309", "llama", 10, 5, 15, 0, 1),
    LedgerRow("20250309", "opt", 3, 4, 7, 7, 2),
    LedgerRow("20250310", "opt", 1, 1, 2, 0, 1),
]


def test_a_period_defaults_to_today_and_lists_every_day() -> None:
    assert parse_period(None, None, TODAY).days == ["20250310"]
    period = parse_period("2025-02-27", "2025-03-02", TODAY)
    assert period.days == ["20250227", "20250228", "20250301", "20250302"]
    assert period.length == 4
    assert days_between("2025-03-09", None, TODAY) == ["20250309", "20250310"]


@pytest.mark.parametrize(
    ("start", "end", "key"),
    [
        ("2025-13-01", None, "from"),
        ("20250301", None, "from"),  # fromisoformat would take it; the API documents YYYY-MM-DD
        (None, "yesterday", "to"),
        ("2025-03-10", "2025-03-09", "to"),
    ],
)
def test_a_bad_period_names_its_parameter(start: str | None, end: str | None, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_period(start, end, TODAY)
    assert caught.value.key == key


def test_the_cli_names_its_flags() -> None:
    with pytest.raises(ConfigError, match=r"^--to: expected a day on or after --from"):
        days_between("2025-03-10", "2025-03-01", TODAY)


def test_retention_refuses_a_period_starting_too_early_or_too_long() -> None:
    check_retention(parse_period("2025-03-04", "2025-03-10", TODAY), TODAY, 7)
    with pytest.raises(ConfigError, match="on or after 2025-03-04"):
        check_retention(parse_period("2025-03-03", "2025-03-05", TODAY), TODAY, 7)
    with pytest.raises(ConfigError, match=r"at most store\.retention_days \(7\) days"):
        check_retention(parse_period("2025-03-04", "2025-03-11", TODAY), TODAY, 7)


def test_group_by_defaults_to_day_and_refuses_others() -> None:
    assert parse_group_by(None) == "day"
    assert parse_group_by("model") == "model"
    with pytest.raises(ConfigError, match=r"^group_by: expected one of day, model, got 'week'$"):
        parse_group_by("week")


def test_rows_group_by_day_and_by_model_with_the_same_totals() -> None:
    by_day, totals = summarize(ROWS, "day")
    assert [row["day"] for row in by_day] == ["2025-03-09", "2025-03-10"]
    assert (by_day[0]["total_tokens"], by_day[0]["requests"]) == (22, 3)
    by_model, same_totals = summarize(ROWS, "model")
    assert [(row["model"], row["total_tokens"]) for row in by_model] == [("llama", 15), ("opt", 9)]
    assert (
        totals
        == same_totals
        == {
            "prompt_tokens": 14,
            "completion_tokens": 10,
            "total_tokens": 24,
            "estimated_tokens": 7,
            "requests": 4,
            "unsettled_tokens": 0,
            "unsettled_requests": 0,
            **NOT_REPORTED,
        }
    )


def test_an_empty_period_has_no_rows_and_zero_totals() -> None:
    document = usage_document("alice", parse_period(None, None, TODAY), "day", [])
    assert document["rows"] == []
    assert document["totals"] == {
        **dict.fromkeys(
            (
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "estimated_tokens",
                "requests",
                "unsettled_tokens",
                "unsettled_requests",
            ),
            0,
        ),
        **NOT_REPORTED,
    }


def test_csv_and_table_render_the_grouped_rows() -> None:
    grouped, totals = summarize(ROWS, "model")
    assert to_csv(grouped, "model").splitlines() == [
        "model,prompt_tokens,completion_tokens,total_tokens,estimated_tokens,requests,"
        "unsettled_tokens,unsettled_requests,cached_tokens,cache_creation_tokens,"
        "reasoning_tokens,cost_micros,priced_requests",
        "llama,10,5,15,0,1,0,0,,,,,0",
        "opt,4,5,9,7,3,0,0,,,,,0",
    ]
    table = to_table(grouped, totals, "model").splitlines()
    assert table[0].split() == [
        "model",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "estimated_tokens",
        "requests",
        "unsettled_tokens",
        "unsettled_requests",
        "cached_tokens",
        "cache_creation_tokens",
        "reasoning_tokens",
        "cost_micros",
        "priced_requests",
    ]
    assert table[-1].split() == ["total", "14", "10", "24", "7", "4", "0", "0", *"----", "0"]


def test_kinds_and_cost_are_null_only_where_nothing_reported_them() -> None:
    day = "20250310"
    rows = [
        LedgerRow(day, "opt", 10, 5, 15, 0, 1, cached_tokens=0, cached_reported=1),
        LedgerRow(day, "opt", 8, 4, 12, 0, 1, reasoning_tokens=3, reasoning_reported=1,
                  cost_micros=2**60 + 1, priced_requests=1),
        LedgerRow(day, "llama", 1, 1, 2, 0, 1),
    ]  # fmt: skip
    by_model, totals = summarize(rows, "model")
    llama, opt = by_model
    kinds = ("cached_tokens", "cache_creation_tokens", "reasoning_tokens", "cost_micros")
    assert [llama[k] for k in kinds] == [None, None, None, None]
    assert [opt[k] for k in kinds] == [0, None, 3, 2**60 + 1]  # exact, however large
    assert [totals[k] for k in kinds] == [0, None, 3, 2**60 + 1]
    assert (opt["priced_requests"], llama["priced_requests"]) == (1, 0)
    assert not any(name.endswith("_reported") for name in totals)
