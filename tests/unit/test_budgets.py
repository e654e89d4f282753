"""Budget rules: config validation, calendar periods in a time zone (DST days), keys, hand-over,
and the quota refusal's reply."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from extproc import config
from extproc.domain import Decision, Identity, Outcome, Plan
from extproc.envoy import handover, replies
from extproc.errors import ConfigError
from extproc.limits.periods import period_of
from extproc.store import keys

PARIS = ZoneInfo("Europe/Paris")


def ms(text: str) -> int:
    """An RFC 3339 instant in ms."""
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def parse(budgets: Any, era: str = "tiers") -> config.Config:
    raw: dict[str, Any] = {"limits": {"budgets": budgets}}
    if era == "subscriptions":
        raw["maas"] = {"era": era}
        raw["access"] = {"check": "none"}
    return config.parse(raw, serving=False)


def test_a_budget_is_parsed_with_its_defaults() -> None:
    (budget,) = parse([{"name": "monthly", "limit": 1000, "period": "month"}]).limits.budgets
    assert (budget.scope, budget.unit, budget.calendar, budget.time_zone) == (
        "user",
        "tokens",
        "month",
        "UTC",
    )
    assert budget.enforce
    assert budget.soft == ()


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"name": "b", "limit": -1, "period": "day"}, "limits.budgets[0].limit"),
        ({"name": "b", "limit": 0, "period": "day"}, "limits.budgets[0].limit"),
        ({"name": "b", "limit": True, "period": "day"}, "limits.budgets[0].limit"),
        ({"name": "b", "limit": 1, "period": "year"}, "limits.budgets[0].period"),
        (
            {"name": "b", "limit": 1, "period": {"rolling": "0s"}},
            "limits.budgets[0].period.rolling",
        ),
        (
            {"name": "b", "limit": 1, "period": "day", "time_zone": "Mars/Olympus"},
            "limits.budgets[0].time_zone",
        ),
        (
            {"name": "b", "limit": 1, "period": "day", "time_zone": "../../etc/passwd"},
            "limits.budgets[0].time_zone",
        ),
        ({"name": "b", "limit": 1, "period": "day", "scope": "team"}, "limits.budgets[0].scope"),
        ({"name": "b", "limit": 1, "period": "day", "scope": "group"}, "limits.budgets[0].groups"),
        ({"name": "b", "limit": 1, "period": "day", "groups": ["g"]}, "limits.budgets[0].groups"),
        ({"name": "b", "limit": 1, "period": "day", "unit": "dollars"}, "limits.budgets[0].unit"),
        ({"name": "b", "limit": 1, "period": "day", "soft": [0]}, "limits.budgets[0].soft"),
        ({"name": "b", "limit": 1, "period": "day", "mode": "dry"}, "limits.budgets[0].mode"),
        (
            {"name": "b", "limit": 1, "period": "day", "match": {"users": ["x"]}},
            "limits.budgets[0].match.users",
        ),
        ({"name": "a b", "limit": 1, "period": "day"}, "limits.budgets[0].name"),
        ({"name": "b", "limit": 1, "period": "day", "extra": 1}, "limits.budgets[0].extra"),
        (
            {"name": "b", "limit": 1, "period": "day", "scope": "organization"},
            "limits.budgets[0].scope",
        ),
    ],
)
def test_a_bad_budget_is_a_config_error_naming_its_key(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse([spec])
    assert caught.value.key == key


def test_two_budgets_cannot_share_a_name() -> None:
    with pytest.raises(ConfigError) as caught:
        parse([{"name": "b", "limit": 1, "period": "day"}] * 2)
    assert caught.value.key == "limits.budgets[1].name"


def test_organizations_are_a_subscription_era_scope() -> None:
    spec = {"name": "org", "scope": "organization", "limit": 1, "period": "month"}
    (budget,) = parse([spec], era="subscriptions").limits.budgets
    assert budget.scope == "organization"


@pytest.mark.parametrize(
    ("alerts", "key"),
    [
        ({"webhook_url": "ftp://x"}, "limits.alerts.webhook_url"),
        ({"timeout": "-1s"}, "limits.alerts.timeout"),
        ({"attempts": 0}, "limits.alerts.attempts"),
        ({"queue_size": "big"}, "limits.alerts.queue_size"),
        ({"url": "http://x"}, "limits.alerts.url"),
    ],
)
def test_bad_alert_settings_are_config_errors(alerts: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse({"limits": {"alerts": alerts}}, serving=False)
    assert caught.value.key == key


def test_a_month_in_paris_starts_at_local_midnight_while_utc_is_still_in_the_old_month() -> None:
    # 00:30 on February 1st in Paris is 23:30 on January 31st in UTC.
    period = period_of("month", PARIS, ms("2026-01-31T23:30:00+00:00"))
    assert period.label == "m202602"
    assert period.start_ms == ms("2026-02-01T00:00:00+01:00")
    assert period.end_ms == ms("2026-03-01T00:00:00+01:00")
    assert period_of("month", ZoneInfo("UTC"), ms("2026-01-31T23:30:00+00:00")).label == "m202601"


def test_a_day_with_a_daylight_saving_change_lasts_23_or_25_hours() -> None:
    spring = period_of("day", PARIS, ms("2026-03-29T12:00:00+02:00"))
    autumn = period_of("day", PARIS, ms("2026-10-25T12:00:00+01:00"))
    assert spring.end_ms - spring.start_ms == 23 * 3_600_000
    assert autumn.end_ms - autumn.start_ms == 25 * 3_600_000
    assert spring.start_ms == ms("2026-03-29T00:00:00+01:00")
    assert autumn.end_ms == ms("2026-10-26T00:00:00+01:00")


def test_a_week_starts_on_monday_in_its_zone() -> None:
    # Sunday 2026-11-29 23:30 in UTC is already Monday in Tokyo.
    tokyo = period_of("week", ZoneInfo("Asia/Tokyo"), ms("2026-11-29T23:30:00+00:00"))
    utc = period_of("week", ZoneInfo("UTC"), ms("2026-11-29T23:30:00+00:00"))
    assert (tokyo.label, utc.label) == ("w20261130", "w20261123")
    assert tokyo.end_ms - tokyo.start_ms == 7 * 86_400_000


def test_where_midnight_is_skipped_the_day_starts_at_its_first_instant() -> None:
    # America/Santiago springs forward at 00:00 (to 01:00) on 2026-09-06.
    santiago = ZoneInfo("America/Santiago")
    day = period_of("day", santiago, ms("2026-09-06T12:00:00-03:00"))
    assert day.label == "d20260906"
    assert day.start_ms == ms("2026-09-06T01:00:00-03:00")
    assert day.end_ms - day.start_ms == 23 * 3_600_000


def test_shared_budgets_have_their_own_hash_tag_that_no_user_can_take() -> None:
    group = keys.budget_key("team", "group", "eng")
    user_named_like_it = keys.budget_key("team", "user", "g:eng")
    assert keys.hash_tag(group) == "g:eng"
    assert keys.hash_tag(user_named_like_it) == "g%3Aeng"
    assert keys.hash_tag(keys.budget_key("mine", "user", "alice")) == keys.hash_tag(
        keys.tokens_key("alice", "free")
    )
    assert keys.hash_tag(keys.budget_key("x", "model", "a}b{c")) == "m:a%7Db%7Bc"


def test_the_handover_carries_the_budget_groups_and_stays_as_it_was_without_budgets() -> None:
    decision = Decision(
        Outcome.ALLOW,
        identity=Identity("alice", "alice", ("eng", "ops")),
        tier=Plan("free"),
        model="m",
        charged=True,
        request_id="r1",
        budgets_held=True,
        budget_groups=("eng", 'we"ird,'),
    )
    billing = handover.Billing.from_decision(decision, "/v1/chat/completions")
    assert billing is not None
    text = handover.to_text(billing)
    assert handover.from_text(text) == billing
    plain = handover.Billing.from_decision(
        Decision(Outcome.ALLOW, identity=decision.identity, tier=Plan("free"), charged=True),
        "/v1/chat/completions",
    )
    assert plain is not None
    assert "budgets" not in json.loads(handover.to_text(plain))
    hostile = json.loads(text) | {"bgroups": "[" * 100_000}
    assert handover.from_text(json.dumps(hostile)) is None


def quota_refusal(retry_after_s: int) -> Decision:
    return Decision(
        Outcome.QUOTA_EXCEEDED,
        "budget monthly used up: limit 1000",
        Identity("alice", "alice"),
        Plan("free"),
        limit_kind="budget",
        limit=1000,
        remaining=0,
        reset_s=retry_after_s,
        retry_after_s=retry_after_s,
    )


def test_a_quota_refusal_is_a_429_that_says_when_and_stops_sdk_retries() -> None:
    reply = replies.check_response(quota_refusal(86_000), "/v1/chat/completions")
    denied = reply.denied_response
    headers = {o.header.key: o.header.value for o in denied.headers}
    assert denied.status.code == 429
    assert headers["retry-after"] == "86000"
    assert headers["x-should-retry"] == "false"
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("1000", "0")
    error = json.loads(denied.body)["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "quota_exceeded"
    assert "budget monthly" in error["message"]
    assert error["retry_after"] == 86_000


def test_a_short_quota_refusal_leaves_sdk_retries_alone() -> None:
    denied = replies.check_response(quota_refusal(30), "/").denied_response
    assert "x-should-retry" not in {o.header.key for o in denied.headers}
