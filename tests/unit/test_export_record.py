"""The charge record's codec, its CSV and JSONL lines, and the Cluster slot tags of its streams."""

from __future__ import annotations

import csv
import io
import json

import pytest
from redis.crc import key_slot

from extproc.domain import Charge, Usage
from extproc.export import record
from extproc.export.cli import CSV_COLUMNS, csv_lines, json_line
from extproc.export.stream import Entry
from extproc.store import keys

T = 1_796_127_018_372  # 2026-12-01T12:10:18.372Z


def charge(**kw: object) -> Charge:
    base: dict[str, object] = {
        "userid": "bob",
        "tier": "premium",
        "model": "facebook/opt-125m",
        "usage": Usage(prompt_tokens=30, completion_tokens=40, total_tokens=70),
        "request_id": "r-1",
        "reserved_tokens": 296,
    }
    return Charge(**{**base, **kw})  # type: ignore[arg-type]


def test_a_record_round_trips_whole_with_not_reported_apart_from_zero() -> None:
    usage = Usage(prompt_tokens=0, completion_tokens=5, cached_tokens=0, estimated=True)
    whole = record.of(charge(usage=usage, disconnected=True, status=499), T)
    assert whole["time"] == "2026-12-01T12:10:18.372Z"
    assert list(whole) == ["v", *record.FIELDS]
    back = record.decode(record.encode(whole))
    assert back == whole
    assert back["prompt_tokens"] == 0
    assert back["cached_tokens"] == 0
    assert back["total_tokens"] is None
    assert back["reasoning_tokens"] is None
    assert back["charged_tokens"] == 5
    assert back["estimated"] is True
    assert json.loads(record.encode(whole))["prompt_tokens"] == 0  # a 0 is stored, never dropped


def test_the_subscription_era_fills_its_attribution() -> None:
    whole = record.of(
        charge(
            tier="",
            subscription="team-a/gold",
            key_name="ci-key",
            organization_id="org-7",
            cost_center="cc-42",
        ),
        T,
    )
    assert (whole["era"], whole["plan"], whole["key_name"]) == (
        "subscriptions",
        "team-a/gold",
        "ci-key",
    )
    assert record.decode(record.encode(whole)) == whole


def test_the_token_kinds_and_the_cost_reach_the_record() -> None:
    usage = Usage(
        prompt_tokens=100,
        completion_tokens=50,
        total_tokens=150,
        cached_tokens=60,
        cache_creation_tokens=20,
        reasoning_tokens=30,
    )
    whole = record.of(charge(usage=usage, cost_micros=1_234_567, priced=True), T)
    got = {k: whole[k] for k in ("cached_tokens", "cache_creation_tokens", "reasoning_tokens")}
    assert got == {"cached_tokens": 60, "cache_creation_tokens": 20, "reasoning_tokens": 30}
    assert (whole["cost_micros"], whole["priced"]) == (1_234_567, True)
    assert record.decode(record.encode(whole)) == whole


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"usage": Usage(total_tokens=0, estimated=True, invalid="negative"), "route": "ns/r"},
        {"usage": Usage(0, 0, 0, 0, 0, 0), "disconnected": True, "reserved_tokens": 0},
        {"tier": "", "subscription": "a/b", "key_name": "k", "organization_id": "o",
         "cost_center": "c", "cost_micros": 5, "priced": True},
    ],
)  # fmt: skip
def test_the_settles_fast_encoding_is_the_records_stored_form(kw: dict[str, object]) -> None:
    c = charge(**kw)
    assert record.encode_charge(c, T) == record.encode(record.of(c, T))


def test_the_stored_form_leaves_defaults_out() -> None:
    stored = json.loads(record.encode(record.of(charge(), T)))
    assert "time" not in stored
    assert "key_name" not in stored
    assert "cached_tokens" not in stored
    assert stored["v"] == 1
    assert stored["time_ms"] == T


@pytest.mark.parametrize(
    "text",
    [None, "", "not json", "[1]", '{"v": 0, "time_ms": 1}', '{"v": true, "time_ms": 1}',
     '{"v": 1}', '{"v": 1, "time_ms": -5}', '{"v": 1, "time_ms": 1e400}',
     '{"v": 1, "time_ms": 99999999999999999999}'],
)  # fmt: skip
def test_anything_else_is_a_bad_record(text: str | None) -> None:
    with pytest.raises(record.BadRecord):
        record.decode(text)


def test_a_newer_version_keeps_its_extra_fields() -> None:
    back = record.decode('{"v": 2, "time_ms": 5, "user": "u", "new_field": [1]}')
    assert back["v"] == 2
    assert back["new_field"] == [1]
    assert back["user"] == "u"


def test_csv_cells_cannot_start_a_formula_and_nulls_stay_empty() -> None:
    whole = record.decode(record.encode(record.of(charge(userid="=HYPERLINK(1)", model="+m"), T)))
    text = csv_lines([(Entry("maas:export", "1-0", None), whole)], header=True)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(CSV_COLUMNS)
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["user"] == "'=HYPERLINK(1)"
    assert row["model"] == "'+m"
    assert row["cached_tokens"] == ""
    assert row["prompt_tokens"] == "30"
    assert row["estimated"] == "false"
    assert row["stream_id"] == "1-0"


def test_a_json_line_carries_the_stream_id() -> None:
    whole = record.of(charge(), T)
    line = json_line(Entry("maas:export", "7-1", None), whole)
    assert line.endswith("\n")
    assert "\n" not in line[:-1]
    assert json.loads(line) == {"stream": "maas:export", "stream_id": "7-1", **whole}


def test_every_slot_has_a_tag_that_hashes_to_it() -> None:
    for slot in range(keys.CLUSTER_SLOTS):
        tag = keys.slot_tag(slot)
        assert "{" not in tag
        assert "}" not in tag
        assert key_slot(("{" + tag + "}").encode()) == slot


@pytest.mark.parametrize("user", ["bob", "al{i}ce", "", "x:y", "ü", "=cmd"])
def test_a_users_stream_is_on_the_slot_of_the_users_keys(user: str) -> None:
    stream = keys.export_stream_key("maas:export", user, cluster=True)
    assert key_slot(stream.encode()) == key_slot(keys.ledger_key(user, "20260101").encode())
    assert keys.export_stream_key("maas:export", user) == "maas:export"
